//! From a message to a row: decode and validate the event, render the
//! statement's parameters.

pub mod direct;
pub mod event;
pub mod template;
pub mod validate;
