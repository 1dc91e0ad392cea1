//! Helpers every component may use: they depend on no other module.

pub mod backoff;
pub mod redact;
pub mod rfc3339;
pub mod testhook;
pub mod text;
