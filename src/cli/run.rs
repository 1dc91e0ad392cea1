//! `ingestd run`: the engine, its HTTP endpoints and its watcher, until
//! SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::Duration;

use tokio_util::task::TaskTracker;

use super::compat;
use crate::source::nats::NatsOptions;
use crate::topology::engine::{self, Settings};

#[derive(clap::Args)]
pub struct RunArgs {
    /// Directory of pipeline files.
    #[arg(long, default_value = "pipelines")]
    pipelines: PathBuf,
    /// Default database of every pipeline (a pipeline may override it).
    #[arg(long, env = "DATABASE_URL", default_value = compat::DATABASE_URL, hide_env_values = true)]
    database_url: String,
    /// HTTP port of /metrics and the health endpoints.
    #[arg(long, env = "PORT", default_value_t = 3001)]
    port: u16,
    /// HTTP listen address.
    #[arg(long, env = "LISTEN_ADDR", default_value = "0.0.0.0")]
    listen_addr: std::net::IpAddr,
    /// NATS connection name (default: collector-$HOSTNAME, see the compatibility defaults).
    #[arg(long, env = "NATS_NAME")]
    nats_name: Option<String>,
    /// How long shutdown waits for in-flight batches (the process exits at
    /// most a few seconds later, whatever it is doing).
    #[arg(long, env = "SHUTDOWN_GRACE", default_value = "25s", value_parser = humantime::parse_duration)]
    shutdown_grace: Duration,
    /// Connections of each database's pool, shared by every pipeline that
    /// writes there (a pipeline may have a pool of its own: `sink.postgres.pool: own`).
    #[arg(long, env = "DATABASE_POOL_SIZE", default_value_t = crate::sink::postgres::DEFAULT_POOL_SIZE,
          value_parser = clap::value_parser!(u32).range(1..))]
    db_pool_size: u32,
    /// Threads that run the pipelines (default: half the CPUs, at least
    /// one).
    #[arg(long, env = "INGESTD_WORKER_THREADS")]
    worker_threads: Option<NonZeroUsize>,
    #[command(flatten)]
    nats: NatsOptions,
}

pub fn main(args: RunArgs) -> anyhow::Result<()> {
    let hostname = std::env::var("HOSTNAME").unwrap_or_else(|_| "local".into());
    let settings = Settings {
        pipelines_dir: args.pipelines,
        database_url: args.database_url,
        nats_name: args
            .nats_name
            .unwrap_or_else(|| compat::nats_name(&hostname)),
        nats: args.nats,
        listen: SocketAddr::new(args.listen_addr, args.port),
        shutdown_grace: args.shutdown_grace,
        db_pool_size: args.db_pool_size,
    };
    let threads = args.worker_threads.unwrap_or_else(default_worker_threads);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.get())
        .enable_all()
        .build()?
        .block_on(run(settings))
}

/// Half the CPUs this process may use, at least one. A pipeline's work is
/// one sequence (collect, prepare, write, settle) with waits on NATS and
/// the database, so a thread per CPU mostly adds wake-ups: with the
/// shipped pipeline on two CPUs shared with NATS and PostgreSQL, one
/// thread used 15 % less CPU per event than two and drained as fast.
/// Many busy pipelines on one host want more (`--worker-threads`).
fn default_worker_threads() -> NonZeroUsize {
    let cpus = std::thread::available_parallelism().map_or(1, NonZeroUsize::get);
    NonZeroUsize::new(cpus / 2).unwrap_or(NonZeroUsize::MIN)
}

/// Starts every pipeline, serves HTTP, reloads on changes and SIGHUP, and
/// stops cleanly on SIGINT or SIGTERM. Any pipeline that cannot start
/// fails the start-up.
pub async fn run(settings: Settings) -> anyhow::Result<()> {
    let engine = engine::start(&settings).await?;
    let worker_threads = tokio::runtime::Handle::current().metrics().num_workers();
    tracing::info!(worker_threads, "engine started");
    let tasks = TaskTracker::new();
    let mut http = tasks.spawn(crate::http::serve(settings.listen, engine.clone()));
    tasks.spawn(crate::topology::watch::watch(engine.clone()));
    tasks.close();
    let served = tokio::select! {
        _ = shutdown_signal() => {
            tracing::info!("shutting down: finishing in-flight batches");
            None
        }
        res = &mut http => Some(res),
    };
    exit_after(settings.shutdown_grace + SHUTDOWN_MARGIN);
    // Cancels the HTTP server, the watcher (a reload under way ends at its
    // next build; a swap finishes) and every pipeline at once.
    engine.shutdown.cancel();
    if tokio::time::timeout(settings.shutdown_grace, engine.stop_all())
        .await
        .is_err()
    {
        tracing::warn!("in-flight batches did not finish in time; they will be redelivered");
    }
    tasks.wait().await;
    match served {
        Some(res) => res?,
        None => Ok(()),
    }
}

/// What shutdown may take beyond `shutdown_grace` before the process exits
/// regardless (abandoning a reload, closing connections).
const SHUTDOWN_MARGIN: Duration = Duration::from_secs(4);

/// Ends the process after `limit` whatever the engine is doing: a stop
/// request must stop it in bounded time even if some task ignores it. A
/// thread, not a task, so that a busy or stuck runtime cannot delay it.
fn exit_after(limit: Duration) {
    std::thread::spawn(move || {
        std::thread::sleep(limit);
        tracing::error!(
            ?limit,
            "shutdown took too long: exiting now; unacknowledged messages will be redelivered"
        );
        std::process::exit(1);
    });
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
