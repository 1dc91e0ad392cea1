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

pub mod deadletter;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, Message};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::config::{self, InvalidAction, PipelineFile};
use crate::sink::postgres::{Finish, Limits, Outcome, PgSink, Rejection, SinkRow, WriteError};
use crate::source::nats::{self, Handoff, Puller};
use crate::telemetry::health::{Health, Severity, Side};
use crate::telemetry::lag;
use crate::telemetry::metrics::{duration_values, FailureLabels, FamilySet, Metrics};
use crate::transform::event::{self, Compiled, Invalid, InvalidKind, Prepared};
use crate::transform::template::{MsgMeta, Templates};
use crate::util::text::truncate;
use deadletter::{DeadLetters, Letter};

/// The `reason` label of events that can never be stored.
const VALIDATION_ERROR: &str = "validation_error";
/// First and longest pause between attempts to publish a dead letter.
const DEAD_LETTER_BACKOFF: (Duration, Duration) =
    (Duration::from_millis(100), Duration::from_secs(5));

/// The `reason` label of events left unacknowledged for redelivery.
const PROCESSING_ERROR: &str = "processing_error";

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
    /// Counts shared by every version of the pipeline file.
    pub stats: Arc<Stats>,
    /// Consecutive database rejections (see `suspect_rejections`).
    rejected_run: std::sync::Mutex<RejectedRun>,
    /// This version's stop signal, once it runs.
    stop: std::sync::OnceLock<watch::Receiver<bool>>,
    /// Set by a reload: who gets this version's open pull requests.
    successor: std::sync::Mutex<Option<mpsc::UnboundedSender<Handoff>>>,
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
    event_id: Option<String>,
    write: SinkRow,
}

/// Rows the database rejected one after another, all with the same
/// SQLSTATE, with no stored row in between (across batches).
#[derive(Default)]
struct RejectedRun {
    sqlstate: Option<String>,
    rows: usize,
}

impl Pipeline {
    /// Compiles and connects everything the file declares; any failure is
    /// reported against the file, and nothing is started.
    pub async fn build(file: PipelineFile, deps: &Deps, stats: Arc<Stats>) -> anyhow::Result<Self> {
        let cfg = file.pipeline.clone();
        let compiled = Compiled::new(&file)?;
        let pg = &cfg.sink.postgres;
        let url = pg.url.clone().unwrap_or_else(|| deps.database_url.clone());
        let sink = PgSink::connect_with(&url, pg.pool_size, Limits::of(pg))
            .await
            .map_err(|e| file.error("postgres", e.to_string()))?;
        if let Some(dir) = &pg.migrations {
            sink.migrate(dir)
                .await
                .map_err(|e| file.error("migrations", e.to_string()))?;
        }
        check_statement(&sink, &compiled.templates, &file.path)
            .await
            .map_err(|e| file.error("insert", e))?;
        let nats = &cfg.source.nats;
        let target = nats::Target {
            js: deps.js.clone(),
            stream: nats.stream.clone(),
            consumer: nats.consumer.clone(),
            max_ack_pending: cfg.max_ack_pending(),
        };
        let (stream, consumer) = nats::ensure(
            &target.js,
            &target.stream,
            &target.consumer,
            target.max_ack_pending,
        )
        .await
        .map_err(|e| file.error("consumer", format!("{e:#}")))?;
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
                    .map_err(|e| file.error("subject", e))?;
                Some(letters)
            }
            None => None,
        };
        // Last: registering may replace the metric families of the running
        // version of this file, so nothing may fail after it.
        let families = deps
            .metrics
            .family_set(&cfg.metrics, &file.path)
            .map_err(|e| file.error("metrics", e.to_string()))?;
        Ok(Self {
            name: cfg.name.clone(),
            health: Arc::new(Health::new(&cfg.name, deps.metrics.engine.health.clone())),
            target,
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
            rejected_run: std::sync::Mutex::new(RejectedRun::default()),
            stop: std::sync::OnceLock::new(),
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

    /// Directories holding files this pipeline reads (schema, migrations).
    pub fn referenced_dirs(&self) -> Vec<PathBuf> {
        let schema = self.cfg.validate.as_ref().map(|v| v.schema.as_path());
        let migrations = self.cfg.sink.postgres.migrations.as_deref();
        schema
            .and_then(|s| s.parent())
            .into_iter()
            .chain(migrations)
            .filter_map(|d| d.canonicalize().ok())
            .collect()
    }

    /// Pulls and writes until `stop` turns true; then drains the open pull
    /// request, writes and acknowledges everything it holds, and returns.
    ///
    /// A version started by a reload gets `adopt`: its predecessor's open
    /// pull requests arrive there when the predecessor stops.
    pub async fn run(
        self: Arc<Self>,
        mut stop: watch::Receiver<bool>,
        mut adopt: Option<mpsc::UnboundedReceiver<Handoff>>,
    ) {
        let _ = self.stop.set(stop.clone());
        let batch = &self.cfg.sink.postgres.batch;
        let slots = Arc::new(Semaphore::new(batch.max_in_flight.get()));
        let mut puller = Puller::new(
            self.consumer.clone(),
            batch.max_rows.get(),
            batch.max_bytes as usize,
            self.target.clone(),
            self.health.clone(),
            &self.name,
        );
        tracing::info!(pipeline = %self.name, file = %self.file.display(), "pipeline running");
        let poller = lag::Poller::start(
            self.lag.clone(),
            self.consumer.clone(),
            self.cfg.source.nats.lag_interval,
        );
        if let Some(letters) = &self.dead_letters {
            let durable = self.durable().to_string();
            let watch = deadletter::watch_max_deliveries(
                letters.clone(),
                self.stream.clone(),
                durable,
                stop.clone(),
            );
            tokio::spawn(watch);
        }
        while let Some(held) = self.collect(&mut puller, &mut stop, &mut adopt).await {
            self.dispatch(held, &slots, &mut puller, &stop).await;
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
        let mut rest = rest.into_iter().peekable();
        while rest.peek().is_some() {
            let chunk: Vec<Held> = rest.by_ref().take(batch.max_rows.get()).collect();
            self.dispatch(chunk, &slots, &mut puller, &stop).await;
        }
        let _ = slots.acquire_many(batch.max_in_flight.get() as u32).await;
        poller.finish().await;
        tracing::info!(pipeline = %self.name, "pipeline stopped");
    }

    /// Prepares a batch and hands it to a writer task once a slot is free.
    async fn dispatch(
        self: &Arc<Self>,
        held: Vec<Held>,
        slots: &Arc<Semaphore>,
        puller: &mut Puller,
        stop: &watch::Receiver<bool>,
    ) {
        let rows = self.prepare_all(held).await;
        if rows.is_empty() {
            return;
        }
        let permit = self.wait_for_slot(slots, &rows, puller).await;
        let this = self.clone();
        let stop = stop.clone();
        tokio::spawn(async move { this.write(rows, stop, permit).await });
    }

    /// Waits for the first message, then gathers until `max_rows` or
    /// `max_wait` after the first. None once `stop` is set.
    async fn collect(
        &self,
        puller: &mut Puller,
        stop: &mut watch::Receiver<bool>,
        adopt: &mut Option<mpsc::UnboundedReceiver<Handoff>>,
    ) -> Option<Vec<Held>> {
        let b = &self.cfg.sink.postgres.batch;
        let first = loop {
            tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => return None,
                handoff = recv(adopt) => {
                    // A closed channel means none; a handoff may name the
                    // channel of one still to come.
                    *adopt = handoff.and_then(|h| puller.adopt(h));
                }
                m = puller.next(None) => break m?,
            }
        };
        let deadline = Instant::now() + b.max_wait;
        let mut bytes = first.payload.len() as u64;
        let mut held = vec![self.receive(first)];
        while held.len() < b.max_rows.get() && bytes < b.max_bytes {
            match puller.next(Some(deadline)).await {
                Some(m) => {
                    bytes += m.payload.len() as u64;
                    held.push(self.receive(m));
                }
                None => break,
            }
        }
        Some(held)
    }

    fn count_received(&self, subject: &str) {
        self.families.received.with_label_values(&[subject]).inc();
        self.stats.received.fetch_add(1, Ordering::Relaxed);
    }

    fn receive(&self, msg: Message) -> Held {
        self.count_received(msg.subject.as_str());
        Held {
            _held: self.lag.hold(&msg),
            msg,
            received: Instant::now(),
        }
    }

    /// Prepares every event; invalid ones get the invalid policy at once.
    async fn prepare_all(&self, held: Vec<Held>) -> Vec<Row> {
        let mut rows = Vec::with_capacity(held.len());
        for h in held {
            match self
                .compiled
                .prepare(&h.msg.payload, &self.meta(&h.msg), &self.headers(&h.msg))
            {
                Ok(Prepared {
                    rendered,
                    labels,
                    event_id,
                }) => rows.push(Row {
                    held: h,
                    labels,
                    event_id,
                    write: SinkRow {
                        rendered,
                        outcome: Outcome::Pending,
                    },
                }),
                Err(invalid) => self.reject(h, invalid).await,
            }
        }
        rows
    }

    /// What a template sees of the message as `msg` (only the subject
    /// when no template reads `msg`).
    fn meta(&self, msg: &Message) -> MsgMeta {
        if !self.compiled.templates.reads_msg {
            return MsgMeta {
                subject: msg.subject.to_string(),
                ..MsgMeta::default()
            };
        }
        let info = msg.info().ok();
        MsgMeta {
            subject: msg.subject.to_string(),
            stream: info.as_ref().map(|i| i.stream.to_string()),
            seq: info.as_ref().map(|i| i.stream_sequence),
            delivered: info.as_ref().map(|i| i.delivered),
            time: info.as_ref().map(|i| {
                let nanos = i.published.unix_timestamp_nanos();
                chrono::DateTime::from_timestamp_nanos(nanos as i64)
                    .to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
            }),
        }
    }

    /// The first value of each header (none when no template reads them).
    fn headers(&self, msg: &Message) -> BTreeMap<String, String> {
        if !self.compiled.templates.reads_headers {
            return BTreeMap::new();
        }
        msg.headers
            .iter()
            .flat_map(|h| h.iter())
            .filter_map(|(k, v)| v.first().map(|v| (k.to_string(), v.to_string())))
            .collect()
    }

    /// Waits for a write slot while keeping `rows` and the puller's
    /// buffered messages alive.
    async fn wait_for_slot(
        &self,
        slots: &Arc<Semaphore>,
        rows: &[Row],
        puller: &mut Puller,
    ) -> OwnedSemaphorePermit {
        let keepalive = self.keepalive_period();
        let mut next_progress = Instant::now() + keepalive;
        loop {
            tokio::select! {
                permit = slots.clone().acquire_owned() => return permit.expect("the semaphore is never closed"),
                _ = puller.drain_open() => {}
                _ = tokio::time::sleep_until(next_progress) => {
                    let held = rows.iter().map(|r| &r.held.msg).chain(puller.buffered());
                    progress(held).await;
                    next_progress = Instant::now() + keepalive;
                }
            }
        }
    }

    fn keepalive_period(&self) -> Duration {
        (self.cfg.source.nats.consumer.ack_wait / 3).max(Duration::from_millis(100))
    }

    /// Writes a batch until every row is stored or rejected, settling rows
    /// as soon as their fate is known. A failed attempt holds the rest:
    /// retried with capped backoff, and reported as retrying (the database
    /// is away) or failing (the pipeline's statement or table is broken).
    /// On stop while held, the rest is released for redelivery.
    async fn write(
        &self,
        mut rows: Vec<Row>,
        stop: watch::Receiver<bool>,
        _permit: OwnedSemaphorePermit,
    ) {
        let policy = &self.cfg.on_error.transient;
        let mut backoff = policy.backoff_initial;
        let oldest = rows.iter().map(|r| r.held.received).min();
        let mut next_progress = oldest.unwrap_or_else(Instant::now) + self.keepalive_period();
        loop {
            let result = {
                let (messages, mut writes): (Vec<&Message>, Vec<&mut SinkRow>) =
                    rows.iter_mut().map(|r| (&r.held.msg, &mut r.write)).unzip();
                let attempt = self.sink.write_bounded(&mut writes, Finish::Commit);
                self.keeping_alive(attempt, &messages, &mut next_progress)
                    .await
            };
            let held = result.err().or_else(|| self.suspect_rejections(&mut rows));
            rows = self.settle(rows).await;
            let Some(problem) = held else { break };
            self.hold(&problem, backoff, &rows);
            if *stop.borrow() {
                return self.release(&rows).await;
            }
            let messages: Vec<&Message> = rows.iter().map(|r| &r.held.msg).collect();
            self.keeping_alive(tokio::time::sleep(backoff), &messages, &mut next_progress)
                .await;
            backoff = (backoff * 2).min(policy.backoff_max);
            rows.iter()
                .for_each(|r| self.count_received(r.held.msg.subject.as_str()));
        }
        if self.health.recover(Side::Sink) {
            tracing::info!(pipeline = %self.name, "writing again");
        }
    }

    /// Reports a failed attempt: health, metrics, and a log line. As in the
    /// collector, each failed attempt is a processing error and each retry
    /// a new attempt, so received = processed + failed.
    fn hold(&self, problem: &WriteError, backoff: Duration, rows: &[Row]) {
        let severity = match problem {
            WriteError::Transient(_) => Severity::Retrying,
            WriteError::Pipeline(_) => Severity::Failing,
        };
        if self.health.fail(Side::Sink, severity, problem.to_string())
            && severity == Severity::Failing
        {
            tracing::error!(pipeline = %self.name, error = %problem, "the pipeline is failing: nothing is acknowledged until its statement or table is fixed");
        }
        self.engine
            .engine
            .sink_retries
            .with_label_values(&[&self.name])
            .inc();
        tracing::warn!(pipeline = %self.name, error = %problem, retry_in = ?backoff, "write failed; holding the batch");
        rows.iter()
            .for_each(|r| self.count_failure(&r.held, PROCESSING_ERROR));
    }

    /// Turns the batch's database rejections back into pending rows when
    /// they continue a run of `failing_after` rows rejected with the same
    /// SQLSTATE: then the table (a new CHECK, a lagging foreign-key
    /// parent), not the events, is the likely cause, and acknowledging
    /// them away would lose them silently.
    fn suspect_rejections(&self, rows: &mut [Row]) -> Option<WriteError> {
        let limit = self.cfg.on_error.invalid.failing_after;
        if limit == 0 {
            return None;
        }
        let mut run = self.rejected_run.lock().expect("rejected run lock");
        let mut suspect = None;
        for row in rows.iter() {
            match &row.write.outcome {
                Outcome::Stored => *run = RejectedRun::default(),
                Outcome::Rejected(Rejection {
                    sqlstate: Some(state),
                    error,
                }) => {
                    if run.sqlstate.as_ref() != Some(state) {
                        *run = RejectedRun {
                            sqlstate: Some(state.clone()),
                            rows: 0,
                        };
                    }
                    run.rows += 1;
                    if run.rows >= limit {
                        suspect = Some((state.clone(), error.clone()));
                    }
                }
                _ => {}
            }
        }
        let (state, error) = suspect?;
        for row in rows.iter_mut() {
            if matches!(&row.write.outcome, Outcome::Rejected(r) if r.sqlstate.as_ref() == Some(&state))
            {
                row.write.outcome = Outcome::Pending;
            }
        }
        Some(WriteError::Pipeline(format!(
            "{limit} or more events in a row were rejected with SQLSTATE {state} (last: {error}); \
             the table, not the events, is the likely cause, so they are held \
             (raise on_error.invalid.failing_after if these events really are bad)"
        )))
    }

    /// Awaits `fut` (a write attempt, a backoff) while sending progress acks
    /// for the batch's messages whenever `next_progress` comes: an attempt
    /// may take longer than the ack wait (a lock, a connect timeout), and
    /// JetStream must not redeliver what the engine still holds.
    async fn keeping_alive<T>(
        &self,
        fut: impl std::future::Future<Output = T>,
        messages: &[&Message],
        next_progress: &mut Instant,
    ) -> T {
        tokio::pin!(fut);
        loop {
            tokio::select! {
                out = &mut fut => return out,
                _ = tokio::time::sleep_until(*next_progress) => {
                    progress(messages.iter().copied()).await;
                    *next_progress = Instant::now() + self.keepalive_period();
                }
            }
        }
    }

    /// Acknowledges the stored rows and rejects the rows the database
    /// refused; returns the rows still pending.
    async fn settle(&self, rows: Vec<Row>) -> Vec<Row> {
        let mut pending = Vec::new();
        for mut row in rows {
            match std::mem::replace(&mut row.write.outcome, Outcome::Pending) {
                Outcome::Stored => self.processed(row).await,
                Outcome::Rejected(rejection) => {
                    let invalid = Invalid {
                        kind: InvalidKind::Unstorable,
                        error: rejection.error,
                        event_id: row.event_id,
                    };
                    self.reject(row.held, invalid).await
                }
                Outcome::Pending => pending.push(row),
            }
        }
        pending
    }

    async fn processed(&self, row: Row) {
        if let Err(e) = row.held.msg.ack().await {
            tracing::warn!(pipeline = %self.name, error = %e, "ack failed; the event will be redelivered and deduplicated");
        }
        self.lag.committed(&row.held.msg);
        let labels: Vec<&str> = row.labels.iter().map(String::as_str).collect();
        self.families.processed.with_label_values(&labels).inc();
        self.stats.processed.fetch_add(1, Ordering::Relaxed);
        self.families
            .duration
            .with_label_values(&duration_values(&self.cfg.metrics, &row.labels))
            .observe(row.held.received.elapsed().as_secs_f64());
        if tracing::enabled!(tracing::Level::DEBUG) {
            tracing::debug!(
                pipeline = %self.name,
                subject = %row.held.msg.subject,
                stream_seq = ?row.held.msg.info().ok().map(|i| i.stream_sequence),
                event_id = ?row.event_id,
                "stored"
            );
        }
    }

    /// Leaves the pending rows for JetStream to redeliver (nak: another
    /// process may take them at once); their failed attempt is counted.
    async fn release(&self, rows: &[Row]) {
        for row in rows {
            let _ = row.held.msg.ack_with(AckKind::Nak(None)).await;
        }
    }

    /// Applies the pipeline's invalid policy to an event that can never be
    /// stored.
    async fn reject(&self, held: Held, invalid: Invalid) {
        let policy = &self.cfg.on_error.invalid;
        tracing::warn!(
            pipeline = %self.name,
            subject = %held.msg.subject,
            stream_seq = ?held.msg.info().ok().map(|i| i.stream_sequence),
            event_id = ?invalid.event_id,
            kind = invalid.kind.as_str(),
            error = %truncate(&invalid.error, 500),
            "invalid event"
        );
        let settled = match policy.action {
            InvalidAction::Ack => held.msg.ack().await.map_err(|e| e.to_string()),
            InvalidAction::Term => held
                .msg
                .ack_with(AckKind::Term)
                .await
                .map_err(|e| e.to_string()),
            InvalidAction::Nak => held
                .msg
                .ack_with(AckKind::Nak(policy.delay))
                .await
                .map_err(|e| e.to_string()),
            InvalidAction::DeadLetter => self.dead_letter(&held.msg, &invalid).await,
        };
        if let Err(e) = settled {
            tracing::warn!(pipeline = %self.name, error = %e, "could not settle the invalid event; it will be redelivered");
        }
        self.count_failure(&held, VALIDATION_ERROR);
    }

    /// Publishes the original payload with headers explaining the failure,
    /// waits for JetStream to confirm it, and only then acks the original.
    /// A refused publish (the dead-letter stream gone, NATS down) is retried
    /// with backoff while the original is held and kept alive; a pipeline
    /// that stops meanwhile leaves the original for redelivery. Never a
    /// silent loss.
    async fn dead_letter(&self, msg: &Message, invalid: &Invalid) -> Result<(), String> {
        let letters = self.dead_letters.as_ref().expect("checked at load");
        let info = msg.info().map_err(|e| e.to_string())?;
        let mut backoff = DEAD_LETTER_BACKOFF.0;
        loop {
            let letter = Letter {
                payload: msg.payload.clone(),
                headers: msg.headers.as_ref(),
                subject: msg.subject.as_str(),
                stream: info.stream,
                stream_seq: info.stream_sequence,
                delivered: info.delivered,
                reason: invalid.kind.as_str(),
                error: &invalid.error,
            };
            let Err(e) = letters.publish(letter).await else {
                break;
            };
            if backoff == DEAD_LETTER_BACKOFF.0 {
                tracing::warn!(pipeline = %self.name, error = %e, "dead letter refused; holding the event and retrying");
            }
            if self.stopping() {
                return Err(format!("{e}; left for redelivery"));
            }
            let _ = msg.ack_with(AckKind::Progress).await;
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(DEAD_LETTER_BACKOFF.1);
        }
        msg.ack().await.map_err(|e| e.to_string())
    }

    /// True once this version has been told to stop.
    fn stopping(&self) -> bool {
        self.stop.get().is_some_and(|s| *s.borrow())
    }

    fn count_failure(&self, held: &Held, reason: &str) {
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
    file: &std::path::Path,
) -> Result<(), String> {
    let sample = event::sample_render(templates)?;
    sink.verify(&sample)
        .await
        .map_err(|e| format!("the insert statement is rejected by the database: {e}"))?;
    for variant in templates.variants() {
        if let Err(e) = sink.verify(&variant).await {
            tracing::warn!(file = %file.display(), statement = %variant.sql, error = %e, "a branch of the insert template cannot work");
        }
    }
    Ok(())
}

async fn progress<'a>(messages: impl Iterator<Item = &'a Message>) {
    for m in messages {
        let _ = m.ack_with(AckKind::Progress).await;
    }
}

/// Receives from an optional channel; pending forever without one.
async fn recv<T>(rx: &mut Option<mpsc::UnboundedReceiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}
