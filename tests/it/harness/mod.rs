//! Test harness shared by the integration tests of `ingestd` and by its
//! benchmark (`benches/bench.rs`, which includes this module by path).
//!
//! The tests run the real binary against the machine's NATS (JetStream) and
//! PostgreSQL, in parallel. Everything a test touches on those servers is
//! therefore named after a per-test id ([`TestEnv`]): its own database, its own
//! stream, subjects and durable consumer. Nothing here sleeps to synchronise:
//! every wait polls a condition against a deadline ([`wait_for`]).

// Each suite, and the benchmark (`benches/bench.rs`), uses only part of the
// harness.
#![allow(dead_code)]

pub mod batching;
pub mod bench;
pub mod cluster;
pub mod exactly_once;
pub mod faults;
pub mod generator;
pub mod operations;
pub mod reload;
pub mod scale;
pub mod statements;

mod engine;
mod env;
mod events;
mod files;
mod nats;
mod postgres;
mod proxy;
mod scrape;
mod wait;

pub use engine::*;
pub use env::*;
pub use events::*;
pub use files::*;
pub use nats::*;
pub use postgres::*;
pub use proxy::*;
pub use scrape::*;
pub use wait::*;

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Display;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::context::PublishAckFuture;
use async_nats::jetstream::{self, consumer, stream};
use serde_json::Value;
use sqlx::postgres::{PgPool, PgPoolOptions};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};
