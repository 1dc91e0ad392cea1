//! ingestd: runs the NATS JetStream → PostgreSQL pipelines declared in
//! `pipelines/*.yaml`.
//!
//! The modules follow the data: a [`source`] delivers messages, a
//! [`transform`] turns each into a row, a [`sink`] writes the rows, and a
//! [`pipeline`] wires the three together; the [`topology`] owns the
//! running pipelines, [`http`] and [`telemetry`] report on them, [`config`]
//! describes them and [`cli`] is the command line. ARCHITECTURE.md gives
//! the dependency rules between them.

pub mod cli;
pub mod config;
pub mod http;
pub mod pipeline;
pub mod sink;
pub mod source;
pub mod telemetry;
pub mod topology;
pub mod transform;
pub mod util;
