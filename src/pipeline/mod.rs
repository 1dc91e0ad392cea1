//! One pipeline: pull a batch, prepare each event (decode, validate,
//! render), write the batch, acknowledge after the commit.
//!
//! Invariants:
//! - nothing is acknowledged before its row is committed;
//! - every delivery ends in exactly one outcome: processed (acked after
//!   commit), failed `validation_error` (the invalid policy applied), or
//!   failed `processing_error` (left for redelivery at shutdown);
//! - every message the pipeline holds is kept alive with progress acks
//!   while it waits, so waiting never spends a delivery attempt.

mod collect;
mod deadletter;
mod keepalive;
mod ledger;
mod letters;
mod settle;
mod supervise;
mod write;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, Message};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::reason::Reason;
use crate::config::{self, InvalidAction, PipelineFile};
use crate::sink::postgres::sqlstate::SqlState;
use crate::sink::postgres::{
    Finish, Limits, Outcome, PgSink, PoolChoice, Pools, Rejection, SinkRow, WriteError,
};
use crate::source::nats::{self, Handoff, Puller};
use crate::telemetry::health::{Health, Severity, Side};
use crate::telemetry::lag;
use crate::telemetry::metrics::{duration_values, FailureLabels, FamilySet, Metrics};
use crate::transform::event::{self, Compiled, Invalid, Prepared};
use crate::transform::template::{MsgMeta, Templates};
use crate::util::text::truncate;
use deadletter::{DeadLetters, Letter};
use letters::Parcel;

/// A pipeline compiled from its file and connected to its sink and consumer.
pub struct Pipeline {
    pub name: String,
    pub file: PathBuf,
    cfg: config::Pipeline,
    compiled: Compiled,
    pub sink: Arc<PgSink>,
    consumer: jetstream::consumer::PullConsumer,
    families: Arc<FamilySet>,
    engine: Arc<Metrics>,
    dead_letters: Option<DeadLetters>,
    stream: jetstream::stream::Stream,
    /// Lag, freshness and held-message series (shared with other versions).
    lag: Arc<lag::PipelineLag>,
    failure: FailureLabels,
    /// What keeps the pipeline from progressing, for probes and metrics.
    pub health: Arc<Health>,
    /// Where the stream and consumer are recreated should they vanish.
    target: nats::Target,
    /// Acknowledgements to send again should the consumer's leader change.
    acks: Arc<nats::RecentAcks>,
    /// Counts shared by every version of the pipeline file.
    pub stats: Arc<Stats>,
    /// Consecutive database rejections (see `suspect_rejections`).
    rejected_run: std::sync::Mutex<RejectedRun>,
    /// Set by a reload: who gets this version's open pull requests.
    successor: std::sync::Mutex<Option<mpsc::UnboundedSender<Handoff>>>,
    /// Set by a writer that panicked; the loop then restarts.
    writer_panicked: std::sync::atomic::AtomicBool,
    /// See [`Deps::stop_patience`].
    stop_patience: Duration,
    /// Where dead letters go while this version runs (with dead letters).
    outbox: std::sync::Mutex<Option<letters::Outbox>>,
}

/// Per-pipeline event counts, for `/pipelines`.
#[derive(Default, Debug)]
pub struct Stats {
    pub received: AtomicU64,
    pub processed: AtomicU64,
    pub failed: AtomicU64,
}

/// Shared handles a pipeline is built with.
pub struct Deps {
    pub js: jetstream::Context,
    pub metrics: Arc<Metrics>,
    pub database_url: String,
    /// How long a write attempt may go on once its version is told to stop
    /// (half the shutdown grace): then its batch is released, so another
    /// process takes it at once instead of after `ack_wait`.
    pub stop_patience: Duration,
    /// The database pools the pipelines share.
    pub pools: Arc<Pools>,
}

impl Deps {
    /// Handles with pools of `pool_size` connections per database, whose
    /// gauges join the engine's metrics.
    pub fn new(
        js: jetstream::Context,
        metrics: Arc<Metrics>,
        database_url: String,
        pool_size: u32,
        stop_patience: Duration,
    ) -> anyhow::Result<Self> {
        let pools = Pools::new(pool_size)?;
        metrics.registry.register(pools.collector())?;
        Ok(Self {
            js,
            metrics,
            database_url,
            pools,
            stop_patience,
        })
    }
}

/// Why a pipeline file did not become a pipeline: its content (waits for
/// the file to change), or a service that did not answer (a database or
/// NATS outage, a lock held too long: tried again by itself).
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{0:#}")]
    Content(anyhow::Error),
    #[error("{0:#}")]
    Transient(anyhow::Error),
}

impl BuildError {
    fn content(e: impl Into<anyhow::Error>) -> Self {
        BuildError::Content(e.into())
    }

    fn of(transient: bool, e: impl Into<anyhow::Error>) -> Self {
        if transient {
            BuildError::Transient(e.into())
        } else {
            BuildError::Content(e.into())
        }
    }

    pub fn is_transient(&self) -> bool {
        matches!(self, BuildError::Transient(_))
    }
}

/// A delivered message and when it arrived (for the duration histogram).
struct Held {
    msg: Message,
    received: Instant,
    _held: lag::HeldGuard,
}

/// An event on its way to the database: the message, what to write, and
/// what became of it.
struct Row {
    held: Held,
    labels: Vec<String>,
    write: SinkRow,
}

/// Rows the database rejected one after another, all with the same
/// SQLSTATE, with no stored row in between (across batches).
#[derive(Default)]
struct RejectedRun {
    sqlstate: Option<SqlState>,
    rows: usize,
}

impl Pipeline {
    /// Compiles and connects everything the file declares; any failure is
    /// reported against the file, and nothing is started.
    pub async fn build(
        file: PipelineFile,
        deps: &Deps,
        stats: Arc<Stats>,
    ) -> Result<Self, BuildError> {
        let cfg = file.pipeline.clone();
        // Schema compiles and template variants are CPU work: off the
        // threads that run the pipelines.
        let compiled = {
            let file = file.clone();
            tokio::task::spawn_blocking(move || Compiled::new(&file))
                .await
                .map_err(BuildError::content)?
                .map_err(BuildError::content)?
        };
        let pg = &cfg.sink.postgres;
        let url = pg.url.clone().unwrap_or_else(|| deps.database_url.clone());
        let choice = match pg.pool {
            config::PoolMode::Shared => PoolChoice::Shared,
            config::PoolMode::Own => PoolChoice::Own(pg.pool_size),
        };
        let mut sink = PgSink::connect(&deps.pools, &url, choice, Limits::of(pg))
            .await
            .map_err(|e| BuildError::of(e.is_transient(), file.error("sink.postgres", e)))?;
        if let Some(key) = Self::ledger_key(&cfg) {
            sink.keep_ledger(key);
            sink.ensure_ledger().await.map_err(|e| {
                BuildError::of(
                    e.is_transient(),
                    file.error("sink.postgres.exactly_once", e),
                )
            })?;
        }
        if let Some(dir) = &pg.migrations {
            sink.migrate(dir).await.map_err(|e| {
                BuildError::of(
                    e.is_transient(),
                    file.error("sink.postgres.migrations", e.to_string()),
                )
            })?;
        }
        check_statement(&sink, &compiled.templates, &file).await?;
        let nats = &cfg.source.nats;
        let target = nats::Target {
            js: deps.js.clone(),
            stream: nats.stream.clone(),
            consumer: nats.consumer.clone(),
            max_ack_pending: cfg.max_ack_pending(),
        };
        let acks = Arc::new(nats::RecentAcks::new(
            deps.js.client(),
            nats.consumer.ack_wait,
            usize::try_from(target.max_ack_pending).unwrap_or(usize::MAX),
        ));
        let (stream, consumer) = nats::ensure(
            &target.js,
            &target.stream,
            &target.consumer,
            target.max_ack_pending,
        )
        .await
        .map_err(|e| {
            BuildError::of(
                e.is_transient(),
                file.error("source.nats.consumer", format!("{e:#}")),
            )
        })?;
        let dead_letters = match &cfg.on_error.invalid.subject {
            Some(subject) => {
                let letters = DeadLetters {
                    js: deps.js.clone(),
                    subject: subject.clone(),
                    pipeline: cfg.name.clone(),
                    counter: deps.metrics.engine.dead_letters.clone(),
                };
                letters
                    .check()
                    .await
                    .map_err(|e| BuildError::content(file.error("on_error.invalid.subject", e)))?;
                Some(letters)
            }
            None => None,
        };
        // Last: registering may replace the metric families of the running
        // version of this file, so nothing may fail after it.
        let families = deps
            .metrics
            .family_set(&cfg.metrics, &file.path)
            .map_err(|e| BuildError::content(file.error("metrics", e.to_string())))?;
        Ok(Self {
            name: cfg.name.clone(),
            health: Arc::new(Health::new(&cfg.name, deps.metrics.engine.health.clone())),
            target,
            acks,
            file: file.path.clone(),
            failure: FailureLabels::new(&cfg.metrics),
            cfg,
            compiled,
            sink: Arc::new(sink),
            consumer,
            families,
            engine: deps.metrics.clone(),
            stats,
            successor: std::sync::Mutex::new(None),
            outbox: std::sync::Mutex::new(None),
            stop_patience: deps.stop_patience,
            writer_panicked: Default::default(),
            rejected_run: std::sync::Mutex::new(RejectedRun::default()),
            dead_letters,
            stream,
            lag: Arc::new(deps.metrics.engine.lag.pipeline(&file.pipeline.name)),
        })
    }

    /// Makes this version hand its open pull requests to `next` when it
    /// stops (a reload), instead of draining them itself.
    pub fn hand_over_to(&self, next: mpsc::UnboundedSender<Handoff>) {
        *self.successor.lock().expect("successor lock") = Some(next);
    }

    pub fn durable(&self) -> &str {
        &self.cfg.source.nats.consumer.durable
    }

    /// Directories holding files this pipeline reads (schema, migrations),
    /// whether they exist or not: a missing one is watched for its return.
    pub fn referenced_dirs(&self) -> Vec<PathBuf> {
        let schema = self.cfg.validate.as_ref().map(|v| v.schema.as_path());
        let migrations = self.cfg.sink.postgres.migrations.as_deref();
        schema
            .and_then(|s| s.parent())
            .into_iter()
            .chain(migrations)
            .map(std::path::Path::to_path_buf)
            .collect()
    }

    /// Pulls and writes until `stop` is cancelled; then drains the open
    /// pull request and hands everything it holds to writers of `crew`
    /// (joined by the caller), and returns.
    ///
    /// A version started by a reload gets `adopt`: its predecessor's open
    /// pull requests arrive there when the predecessor stops. A writer's
    /// panic ends the run like a stop (it cancels the crew's token): what
    /// is pulled is written and in-flight writers are joined before the
    /// loop restarts.
    async fn run_once(
        self: Arc<Self>,
        stop: &CancellationToken,
        crew: &supervise::Crew,
        mut adopt: Option<mpsc::UnboundedReceiver<Handoff>>,
    ) -> supervise::Ended {
        let batch = &self.cfg.sink.postgres.batch;
        let slots = Arc::new(Semaphore::new(batch.max_in_flight.get()));
        let mut puller = Puller::new(
            self.consumer.clone(),
            batch.max_rows.get(),
            batch.max_bytes as usize,
            self.target.clone(),
            self.health.clone(),
            &self.name,
            self.acks.clone(),
        );
        tracing::info!(pipeline = %self.name, file = %self.file.display(), "pipeline running");
        let poll = lag::poll(
            self.lag.clone(),
            self.consumer.clone(),
            self.cfg.source.nats.lag_interval,
            crew.run.clone(),
        );
        crew.spawn_stage(&self, Side::Source, "the lag poll", poll);
        self.start_letters(crew).await;
        if self.sink.ledger().is_some() {
            let prune = ledger::prune(self.clone(), crew.run.clone());
            crew.spawn_stage(&self, Side::Sink, "the ledger's pruning", prune);
        }
        while let Some(held) = self.collect(&mut puller, &crew.run, &mut adopt).await {
            self.dispatch(held, &slots, &mut puller, stop, crew).await;
        }
        let successor = self.successor.lock().expect("successor lock").take();
        let rest: Vec<Held> = match successor {
            Some(next) => match next.send(puller.hand_over(adopt.take())) {
                Ok(()) => Vec::new(),
                // The successor stopped before taking them (shutdown): this
                // version reads them itself rather than let them time out.
                Err(mpsc::error::SendError(back)) => {
                    puller.adopt(back);
                    puller.finish().await
                }
            },
            None => puller.finish().await,
        }
        .into_iter()
        .map(|m| self.receive(m))
        .collect();
        self.count_received(rest.iter().map(|h| &h.msg));
        let mut rest = rest.into_iter().peekable();
        while rest.peek().is_some() {
            let chunk: Vec<Held> = rest.by_ref().take(batch.max_rows.get()).collect();
            self.dispatch(chunk, &slots, &mut puller, stop, crew).await;
        }
        tracing::info!(pipeline = %self.name, "pipeline stopped pulling");
        match self.writer_panicked.load(Ordering::Relaxed) {
            true => supervise::Ended::WriterPanicked,
            false => supervise::Ended::Stopped,
        }
    }

    /// Starts the dead-letter stage and the max-deliveries watch that feeds
    /// it (with dead letters), as stages of `crew`.
    async fn start_letters(self: &Arc<Self>, crew: &supervise::Crew) {
        let Some(letters) = self.dead_letters.as_ref() else {
            return;
        };
        let (outbox, inbox) = letters::outbox();
        *self.outbox.lock().expect("outbox lock") = Some(outbox.clone());
        let stage = letters::Stage {
            letters: letters.clone(),
            health: self.health.clone(),
            acks: self.acks.clone(),
            keepalive: self.keepalive_period(),
        };
        let durable = self.durable().to_string();
        let advisories = deadletter::capture_advisories(&letters.js, &self.stream, &durable).await;
        let watch = deadletter::watch_max_deliveries(
            advisories,
            letters.clone(),
            self.stream.clone(),
            durable,
            outbox,
            self.sink.clone(),
            crew.run.clone(),
        );
        crew.spawn_stage(
            self,
            Side::DeadLetters,
            "the dead-letter stage",
            stage.run(inbox),
        );
        crew.spawn_stage(self, Side::DeadLetters, "the max-deliveries watch", watch);
    }

    /// Prepares a batch and hands it to a writer task once a slot is free.
    async fn dispatch(
        self: &Arc<Self>,
        held: Vec<Held>,
        slots: &Arc<Semaphore>,
        puller: &mut Puller,
        stop: &CancellationToken,
        crew: &supervise::Crew,
    ) {
        let rows = self.prepare_all(held).await;
        if rows.is_empty() {
            return;
        }
        let permit = self.wait_for_slot(slots, &rows, puller).await;
        self.spawn_writer(crew, rows, stop.clone(), permit);
    }

    fn count_failure(&self, held: &Held, reason: Reason) {
        self.families
            .failed
            .with_label_values(&self.failure.with_reason(reason))
            .inc();
        self.stats.failed.fetch_add(1, Ordering::Relaxed);
        self.families
            .duration
            .with_label_values(&self.failure.duration)
            .observe(held.received.elapsed().as_secs_f64());
    }
}

/// Plans every statement the template can render (see
/// [`Templates::variants`]), so a missing table or column fails the
/// pipeline at load, not per event. The statement most events produce (an
/// empty event's) must work; another branch that does not is reported,
/// since its condition may never hold, and fails the pipeline only if an
/// event takes it.
async fn check_statement(
    sink: &PgSink,
    templates: &Templates,
    file: &PipelineFile,
) -> Result<(), BuildError> {
    const KEY: &str = "sink.postgres.insert";
    let sample =
        event::sample_render(templates).map_err(|e| BuildError::content(file.error(KEY, e)))?;
    sink.verify(&sample).await.map_err(|e| {
        let transient = matches!(e, WriteError::Transient(_));
        let e = format!("the insert statement is rejected by the database: {e}");
        BuildError::of(transient, file.error(KEY, e))
    })?;
    for variant in templates.variants().iter().filter(|v| v.sql != sample.sql) {
        if let Err(e) = sink.verify(variant).await {
            tracing::warn!(file = %file.path.display(), statement = %variant.sql, error = %e, "a branch of the insert template cannot work");
        }
    }
    Ok(())
}

/// Receives from an optional channel; pending forever without one.
async fn recv<T>(rx: &mut Option<mpsc::UnboundedReceiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}
