//! What the engine reports about itself: logs, Prometheus metrics, the
//! pipelines' problems (health) and their lag.

pub mod health;
pub mod lag;
pub mod logging;
pub mod metrics;
