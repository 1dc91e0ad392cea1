//! The set of running pipelines: started from the pipelines directory and
//! changed with it.

pub mod engine;
mod reconcile;
pub mod watch;
