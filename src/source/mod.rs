//! Where messages come from.

pub mod nats;
