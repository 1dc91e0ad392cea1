//! The integration tests of `ingestd`, one binary: a module per suite, the
//! shared harness in [`harness`]. Run one suite with
//! `cargo test --test it SUITE::`.

mod harness;

mod batching;
mod cluster;
mod config_and_tools;
mod dead_letters;
mod docs;
mod exactly_once;
mod faults;
mod hot_reload;
mod nats_auth;
mod operations;
mod panics;
mod scale;
mod statements;
mod tiktok_contract;
mod tooling;
mod world;
