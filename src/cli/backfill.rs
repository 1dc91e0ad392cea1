//! `ingestd backfill`: re-reads a stream from a sequence or a time into a
//! pipeline, on a durable consumer of its own (`<durable>-backfill`), so the
//! live consumer's position and the running engine are left alone.
//!
//! The pipeline file is used as it is, except for the name (`<name>-backfill`,
//! for logs and metric labels), the durable and its deliver policy. Rows the
//! live pipeline already stored come again: the template must be idempotent
//! (`ON CONFLICT DO NOTHING`), as it must be for redeliveries anyway, unless
//! the pipeline has `exactly_once`: then the backfill claims the live
//! durable's ledger entries, and what is stored already is skipped. The
//! backfill ends once its consumer has acknowledged everything up to the
//! stream's last sequence at start (or `--to-sequence`), and deletes its
//! consumer; interrupted, it resumes where it stopped when run again with
//! the same start. `ingestd audit --repair` runs it over the missing ranges.

use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::config::{self, ConfigError, DeliverPolicy, PipelineFile};
use crate::pipeline::{Deps, Pipeline};
use crate::source::nats::{self, NatsOptions};
use crate::telemetry::metrics::Metrics;

/// How often the backfill consumer's progress is read.
const PROGRESS_POLL: Duration = Duration::from_millis(200);

#[derive(clap::Args)]
#[command(group = clap::ArgGroup::new("start").required(true))]
pub struct Args {
    /// The pipeline file whose stream, validation and insert to use.
    pub file: PathBuf,
    /// First stream sequence to re-read.
    #[arg(long, group = "start")]
    pub from_sequence: Option<u64>,
    /// Re-read messages published at or after this time (RFC 3339).
    #[arg(long, group = "start", value_parser = config::parse_time)]
    pub from_time: Option<OffsetDateTime>,
    /// Last stream sequence to re-read (default: the stream's last at start).
    #[arg(long)]
    pub to_sequence: Option<u64>,
    #[arg(long, env = "DATABASE_URL", default_value = crate::cli::compat::DATABASE_URL, hide_env_values = true)]
    pub database_url: String,
    #[command(flatten)]
    pub nats: NatsOptions,
}

#[derive(Debug, thiserror::Error)]
pub enum BackfillError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0:#}")]
    Setup(anyhow::Error),
    /// Any of the client's errors (each call has its own error type).
    #[error("NATS: {0}")]
    Nats(#[source] async_nats::Error),
}

/// A client error met while reading the stream or the consumer.
fn nats(e: impl std::error::Error + Send + Sync + 'static) -> BackfillError {
    BackfillError::Nats(Box::new(e))
}

/// What a backfill did.
pub struct Summary {
    pub stored: u64,
    pub failed: u64,
}

/// Runs a backfill to completion and prints its counts.
pub fn main(args: Args) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let summary = rt.block_on(run(args))?;
    println!(
        "backfill done: {} events stored (or already stored), {} failed",
        summary.stored, summary.failed
    );
    Ok(())
}

/// A backfill stops once caught up, with nothing in flight but its last
/// batch; on a database that stopped answering that batch is released after
/// this long (as `run` would with its default shutdown grace).
const BACKFILL_STOP_PATIENCE: Duration = Duration::from_secs(12);

pub async fn run(args: Args) -> Result<Summary, BackfillError> {
    let mut file = PipelineFile::load(&args.file)?;
    retarget(&mut file, &args);
    let stream_name = file.pipeline.source.nats.stream.name.clone();
    let metrics = Arc::new(Metrics::new().map_err(BackfillError::Setup)?);
    let name = format!("ingestd-{}", file.pipeline.name);
    let client = nats::connect(&args.nats, &name, metrics.clone())
        .await
        .map_err(BackfillError::Setup)?;
    let js = jetstream::new(client);
    let deps = Deps::new(
        js.clone(),
        metrics,
        args.database_url,
        crate::sink::postgres::DEFAULT_POOL_SIZE,
        BACKFILL_STOP_PATIENCE,
    )
    .map_err(BackfillError::Setup)?;
    let pipeline = Pipeline::build(file, &deps, Arc::default())
        .await
        .map_err(|e| BackfillError::Setup(e.into()))?;
    let pipeline = Arc::new(pipeline);
    let mut stream = js.get_stream(&stream_name).await.map_err(nats)?;
    let last = stream
        .info()
        .await
        .map_err(nats)?
        .state
        .last_sequence
        .min(args.to_sequence.unwrap_or(u64::MAX));
    let durable = pipeline.durable().to_string();
    tracing::info!(pipeline = %pipeline.name, %durable, last, "backfill running");
    let stop = CancellationToken::new();
    let caught_up = async {
        let caught_up = wait_caught_up(&stream, &durable, last).await;
        stop.cancel();
        caught_up
    };
    let ((), caught_up) = tokio::join!(pipeline.clone().run(stop.clone(), None), caught_up);
    caught_up?;
    stream.delete_consumer(&durable).await.map_err(nats)?;
    Ok(Summary {
        stored: pipeline.stats.processed.load(Relaxed),
        failed: pipeline.stats.failed.load(Relaxed),
    })
}

/// Renames the pipeline and its durable, and starts the consumer where
/// the arguments say.
fn retarget(file: &mut PipelineFile, args: &Args) {
    let p = &mut file.pipeline;
    p.name = format!("{}-backfill", p.name);
    p.sink.postgres.ledger_durable = Some(p.source.nats.consumer.durable.clone());
    let c = &mut p.source.nats.consumer;
    c.durable = format!("{}-backfill", c.durable);
    c.start_sequence = args.from_sequence;
    c.start_time = args.from_time;
    c.deliver_policy = match args.from_sequence {
        Some(_) => DeliverPolicy::ByStartSequence,
        None => DeliverPolicy::ByStartTime,
    };
}

/// Waits until the consumer has acknowledged everything up to `last`, or
/// has nothing left to deliver or acknowledge.
async fn wait_caught_up(
    stream: &jetstream::stream::Stream,
    durable: &str,
    last: u64,
) -> Result<(), BackfillError> {
    loop {
        let info = stream.consumer_info(durable).await.map_err(nats)?;
        let idle = info.num_pending == 0 && info.num_ack_pending == 0;
        if idle || info.ack_floor.stream_sequence >= last {
            return Ok(());
        }
        tokio::time::sleep(PROGRESS_POLL).await;
    }
}
