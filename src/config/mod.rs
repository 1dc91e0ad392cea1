//! The pipeline file: its model, `${VAR}` expansion and loading with
//! file:line:column errors.
//!
//! Values are checked while deserializing (durations and sizes against the
//! range of what they become, enums, ranges) so that serde_yaml attaches
//! the location and key path of the offending value to the error; a
//! problem found later (template, schema, a combination of fields) is
//! located by its full key path with [`PipelineFile::error`].

mod env;
mod error;
pub mod files;
mod locate;
pub mod reason;
mod units;

pub use env::{expand_env, EnvError, EnvErrorKind};
use error::yaml_error;
pub use error::ConfigError;
pub use locate::{KeyPositions, Position};
use units::{
    de_duration, de_opt_duration, de_opt_size, de_opt_time, de_size, AckWait, BatchBytes, Connect,
    DuplicateWindow, DurationText, Interval, MaxAge, PayloadBytes, PgTimeout, SizeRepr,
    StreamBytes, Wait,
};
pub use units::{parse_size, parse_time, UnitError};

use std::collections::BTreeMap;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use schemars::JsonSchema;
use serde::Deserialize;

/// One pipeline: where events come from, how they are checked, where they go.
#[derive(Debug, Clone, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Pipeline {
    /// Unique among the engine's pipelines: letters, digits, `-` and `_`. Names
    /// the pipeline in logs, `/pipelines` and the lag metrics.
    pub name: String,
    /// Where events come from.
    pub source: Source,
    /// Optional JSON Schema every event must satisfy; an event that does not is
    /// invalid (see `on_error.invalid`).
    #[serde(default)]
    pub validate: Option<Validate>,
    /// Where events are written.
    pub sink: Sink,
    /// What happens to events that can never be stored, and how outages are
    /// retried.
    #[serde(default)]
    pub on_error: OnError,
    /// The pipeline's Prometheus families: their prefix, labels and buckets.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// What log lines say about an event.
    #[serde(default)]
    pub log: LogConfig,
    /// Largest accepted payload; bigger messages are invalid events.
    #[serde(
        default = "default_max_payload",
        deserialize_with = "de_size::<PayloadBytes, _>"
    )]
    #[schemars(with = "SizeRepr")]
    pub max_payload: u64,
}

fn default_max_payload() -> u64 {
    1024 * 1024
}

#[derive(Debug, Clone, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Source {
    /// A NATS JetStream stream, read by a durable pull consumer.
    pub nats: NatsSource,
}

#[derive(Debug, Clone, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NatsSource {
    /// The stream: created with these settings when missing, used as it is when
    /// present.
    pub stream: StreamConfig,
    /// The durable pull consumer the pipeline reads with; created, or updated
    /// to match.
    pub consumer: ConsumerConfig,
    /// How often the consumer's state is read for the lag gauges
    /// (`ingestd_consumer_pending_messages` and the like): each read is one
    /// request to the server.
    #[serde(
        default = "default_lag_interval",
        deserialize_with = "de_duration::<Interval, _>"
    )]
    #[schemars(with = "DurationText")]
    pub lag_interval: Duration,
}

fn default_lag_interval() -> Duration {
    Duration::from_secs(5)
}

/// The stream is ensured: created with these settings when missing, used as
/// it is when present (it may be shared with other consumers).
#[derive(Debug, Clone, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StreamConfig {
    /// Stream name.
    pub name: String,
    /// Subjects the stream captures (wildcards allowed, e.g. `raw.events.>`).
    pub subjects: Vec<String>,
    /// When the server removes messages: `limits` (age, count, size),
    /// `interest` or `work_queue`.
    #[serde(default)]
    pub retention: Retention,
    /// Oldest message kept, e.g. `7d` (default: no limit).
    #[serde(default, deserialize_with = "de_opt_duration::<MaxAge, _>")]
    #[schemars(with = "DurationText")]
    pub max_age: Option<Duration>,
    /// Most messages kept (default: no limit).
    #[serde(default)]
    pub max_messages: Option<i64>,
    /// Most bytes kept, e.g. `1GiB` (default: no limit).
    #[serde(default, deserialize_with = "de_opt_size::<StreamBytes, _>")]
    #[schemars(with = "SizeRepr")]
    pub max_bytes: Option<u64>,
    /// What goes when a limit is reached: `old` messages, or `new` ones
    /// (refused).
    #[serde(default)]
    pub discard: Discard,
    /// `file` or `memory`.
    #[serde(default)]
    pub storage: Storage,
    /// Copies of the stream in a cluster (default 1).
    #[serde(default = "one")]
    pub replicas: usize,
    /// How long `Nats-Msg-Id`s are remembered to drop duplicate publishes, e.g.
    /// `2m` (default: the server's).
    #[serde(default, deserialize_with = "de_opt_duration::<DuplicateWindow, _>")]
    #[schemars(with = "DurationText")]
    pub duplicate_window: Option<Duration>,
}

fn one() -> usize {
    1
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Retention {
    #[default]
    Limits,
    Interest,
    WorkQueue,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Discard {
    #[default]
    Old,
    New,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Storage {
    #[default]
    File,
    Memory,
}

/// The durable pull consumer. Mutable settings are updated to match the file.
#[derive(Debug, Clone, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ConsumerConfig {
    /// Durable consumer name: processes and versions running the same one share
    /// its work.
    pub durable: String,
    /// The subjects of the stream this pipeline takes (wildcards allowed).
    pub filter_subject: String,
    /// Where a new consumer starts: `all`, `last`, `new`, `last_per_subject`,
    /// `by_start_sequence` or `by_start_time`.
    #[serde(default)]
    pub deliver_policy: DeliverPolicy,
    /// Always `explicit`: each message is acknowledged after its row is
    /// committed.
    #[serde(default)]
    pub ack_policy: AckPolicy,
    /// How long the server waits for an acknowledgement before redelivering
    /// (default 30s); messages held longer get progress acknowledgements.
    #[serde(
        default = "default_ack_wait",
        deserialize_with = "de_duration::<AckWait, _>"
    )]
    #[schemars(with = "DurationText")]
    pub ack_wait: Duration,
    /// Deliveries of a message before the server gives up on it (default 5).
    #[serde(default = "default_max_deliver")]
    pub max_deliver: i64,
    /// Defaults to `max_rows × (max_in_flight + 3)`: what one process holds,
    /// plus a batch of acknowledgements the server may not have processed.
    #[serde(default)]
    pub max_ack_pending: Option<i64>,
    /// First stream sequence delivered, with `deliver_policy: by_start_sequence`.
    #[serde(default)]
    pub start_sequence: Option<u64>,
    /// First publish time delivered (RFC 3339), with `deliver_policy: by_start_time`.
    #[serde(default, deserialize_with = "de_opt_time")]
    #[schemars(with = "Option<String>")]
    pub start_time: Option<time::OffsetDateTime>,
}

fn default_ack_wait() -> Duration {
    Duration::from_secs(30)
}

fn default_max_deliver() -> i64 {
    5
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DeliverPolicy {
    #[default]
    All,
    Last,
    New,
    LastPerSubject,
    /// From `start_sequence` on (a backfill: see README "Backfill").
    ByStartSequence,
    /// From the first message published at or after `start_time`.
    ByStartTime,
}

/// Only explicit acks let the engine acknowledge after the commit.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum AckPolicy {
    #[default]
    Explicit,
}

#[derive(Debug, Clone, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Validate {
    /// JSON Schema file (relative to the pipeline file); `format`s are
    /// asserted.
    pub schema: PathBuf,
    /// Remove keys the schema does not declare before storing (Zod semantics;
    /// default false).
    #[serde(default)]
    pub strip_unknown: bool,
}

#[derive(Debug, Clone, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Sink {
    /// A PostgreSQL database.
    pub postgres: PostgresSink,
}

#[derive(Debug, Clone, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PostgresSink {
    /// Overrides `DATABASE_URL` for this pipeline.
    #[serde(default)]
    pub url: Option<String>,
    /// Directory of `*.sql` migrations (relative to the pipeline file), applied
    /// at start-up and on reload.
    #[serde(default)]
    pub migrations: Option<PathBuf>,
    /// The statement run for each event: a template whose `{{ expression }}`s
    /// become bind parameters (`event`, `msg`, `headers`, `subject`, `cuid()`);
    /// never spliced into the SQL.
    pub insert: String,
    /// How events are grouped into one transaction.
    #[serde(default)]
    pub batch: BatchConfig,
    /// `shared` (default): the engine's pool for this database
    /// (`DATABASE_POOL_SIZE` connections for every pipeline that writes
    /// there); `own`: a pool of this pipeline's own, of `pool_size`
    /// connections, for a pipeline that must never wait behind the others.
    #[serde(default)]
    pub pool: PoolMode,
    /// Connections of the pipeline's own pool (`pool: own`; default 4).
    /// Ignored with the shared pool.
    #[serde(default = "default_pool_size")]
    pub pool_size: u32,
    /// Longest a statement may run (Postgres `statement_timeout`): a
    /// database that stops answering becomes a transient error, retried,
    /// instead of a batch that waits forever.
    #[serde(
        default = "default_statement_timeout",
        deserialize_with = "de_duration::<PgTimeout, _>"
    )]
    #[schemars(with = "DurationText")]
    pub statement_timeout: Duration,
    /// Longest opening a connection may take (TCP, TLS and the start-up
    /// exchange), so a server that accepts connections but never answers
    /// is an error, not a hang.
    #[serde(
        default = "default_connect_timeout",
        deserialize_with = "de_duration::<Connect, _>"
    )]
    #[schemars(with = "DurationText")]
    pub connect_timeout: Duration,
    /// Longest a migration waits for a lock (Postgres `lock_timeout`): a
    /// table locked by another session fails the (re)load with a clear
    /// message instead of blocking it.
    #[serde(
        default = "default_lock_timeout",
        deserialize_with = "de_duration::<PgTimeout, _>"
    )]
    #[schemars(with = "DurationText")]
    pub lock_timeout: Duration,
    /// Every statement takes effect once per stream message, whatever the
    /// redeliveries, processes or crashes: each batch records the
    /// sequences it settles in the ledger table `ingestd_ledger` in its
    /// own transaction, and a message already recorded is acknowledged
    /// without running its statement. Needs CREATE on the schema once
    /// (see docs/exactly-once.md). Default false.
    #[serde(default)]
    pub exactly_once: bool,
    /// The durable whose ledger entries this pipeline claims, when it is
    /// not its own: a backfill settles its live pipeline's messages.
    #[serde(skip)]
    #[schemars(skip)]
    pub ledger_durable: Option<String>,
}

fn default_pool_size() -> u32 {
    4
}

/// Whose connections a pipeline writes with (`sink.postgres.pool`).
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum PoolMode {
    /// The engine's pool for the database, shared with its other pipelines.
    #[default]
    Shared,
    /// A pool of the pipeline's own, of `pool_size` connections.
    Own,
}

pub fn default_statement_timeout() -> Duration {
    Duration::from_secs(30)
}

pub fn default_connect_timeout() -> Duration {
    Duration::from_secs(3)
}

pub fn default_lock_timeout() -> Duration {
    Duration::from_secs(10)
}

#[derive(Debug, Clone, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    /// Most events per batch (default 1000).
    #[serde(default = "default_max_rows")]
    pub max_rows: NonZeroUsize,
    /// How long a batch waits for more events after its first (default
    /// `3ms`): the part of publish → commit latency that batching adds
    /// while events trickle in. In a backlog (JetStream reports more
    /// messages pending) a batch fills to `max_rows` regardless, for at
    /// most 60 ms.
    #[serde(
        default = "default_max_wait",
        deserialize_with = "de_duration::<Wait, _>"
    )]
    #[schemars(with = "DurationText")]
    pub max_wait: Duration,
    /// Batches written concurrently (default 2).
    #[serde(default = "default_in_flight")]
    pub max_in_flight: NonZeroUsize,
    /// Payload bytes per batch (and per pull request): with `max_rows` it
    /// bounds what a pipeline holds, whatever the size of its events. At
    /// least `max_payload`, at most 256 MiB.
    #[serde(
        default = "default_batch_bytes",
        deserialize_with = "de_size::<BatchBytes, _>"
    )]
    #[schemars(with = "SizeRepr")]
    pub max_bytes: u64,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            max_rows: default_max_rows(),
            max_wait: default_max_wait(),
            max_in_flight: default_in_flight(),
            max_bytes: default_batch_bytes(),
        }
    }
}

fn default_max_rows() -> NonZeroUsize {
    NonZeroUsize::new(1000).expect("non-zero")
}

fn default_max_wait() -> Duration {
    Duration::from_millis(3)
}

fn default_in_flight() -> NonZeroUsize {
    NonZeroUsize::new(2).expect("non-zero")
}

fn default_batch_bytes() -> u64 {
    8 << 20
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OnError {
    /// Events that can never be stored: not JSON, schema violations, values or
    /// rows the database refuses.
    #[serde(default)]
    pub invalid: InvalidPolicy,
    /// Outages (database unreachable, timeouts): the batch is held and retried
    /// with backoff, never acknowledged early.
    #[serde(default)]
    pub transient: TransientPolicy,
}

/// What happens to an event that can never be stored.
#[derive(Debug, Clone, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InvalidPolicy {
    /// `ack` (drop, counted and logged; default), `dead_letter` (publish to
    /// `subject`, then ack), `nak` (redeliver after `delay`) or `term` (never
    /// redeliver).
    #[serde(default)]
    pub action: InvalidAction,
    /// Dead-letter subject: where `action: dead_letter` publishes invalid
    /// events, and where events that reach `max_deliver` go (with
    /// `dead_letter` or `nak`). A stream must capture it.
    #[serde(default)]
    pub subject: Option<String>,
    /// Redelivery delay for `action: nak`.
    #[serde(default, deserialize_with = "de_opt_duration::<Wait, _>")]
    #[schemars(with = "DurationText")]
    pub delay: Option<Duration>,
    /// After this many events in a row refused by the database with the
    /// same SQLSTATE (no event stored in between), the table rather than
    /// the events is taken to be at fault: the pipeline turns `failing` and
    /// holds them instead of applying `action`. 0 never does.
    #[serde(default = "default_failing_after")]
    pub failing_after: usize,
}

impl Default for InvalidPolicy {
    fn default() -> Self {
        Self {
            action: InvalidAction::Ack,
            subject: None,
            delay: None,
            failing_after: default_failing_after(),
        }
    }
}

fn default_failing_after() -> usize {
    20
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum InvalidAction {
    /// Acknowledge and drop (counted and logged).
    #[default]
    Ack,
    /// Publish to `subject` (confirmed by JetStream), then acknowledge.
    DeadLetter,
    /// Negative-acknowledge, optionally with a delay: JetStream redelivers.
    Nak,
    /// Tell JetStream never to redeliver it.
    Term,
}

/// Retry schedule while the database is unreachable.
#[derive(Debug, Clone, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TransientPolicy {
    /// First retry delay (default 100ms), doubled after each failure.
    #[serde(
        default = "default_backoff_initial",
        deserialize_with = "de_duration::<Interval, _>"
    )]
    #[schemars(with = "DurationText")]
    pub backoff_initial: Duration,
    /// Longest retry delay (default 10s).
    #[serde(
        default = "default_backoff_max",
        deserialize_with = "de_duration::<Wait, _>"
    )]
    #[schemars(with = "DurationText")]
    pub backoff_max: Duration,
}

impl Default for TransientPolicy {
    fn default() -> Self {
        Self {
            backoff_initial: default_backoff_initial(),
            backoff_max: default_backoff_max(),
        }
    }
}

fn default_backoff_initial() -> Duration {
    Duration::from_millis(100)
}

fn default_backoff_max() -> Duration {
    Duration::from_secs(10)
}

/// What the pipeline's log lines say about an event.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// JSON pointer (RFC 6901) to the event's id, e.g. `/eventId`: log lines
    /// about an event (rejected, failed, retried) carry it as `event_id`
    /// when the event is JSON and the pointer reaches a string. None by
    /// default.
    #[serde(default)]
    pub event_id: Option<String>,
}

/// The default buckets of the duration histogram, in seconds: a log scale
/// from a millisecond (a batched row) to seconds (a write held by an
/// outage).
pub const DEFAULT_DURATION_BUCKETS: [f64; 8] = [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0];

fn default_buckets() -> Vec<f64> {
    DEFAULT_DURATION_BUCKETS.to_vec()
}

/// Naming of the pipeline's metric families and their labels.
#[derive(Debug, Clone, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Family names: `<prefix>_events_received_total`,
    /// `<prefix>_events_processed_total`, ... (default `ingestd`).
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// Labels with the same value on every series (e.g. `app`, `environment`).
    #[serde(default)]
    pub const_labels: BTreeMap<String, String>,
    /// Labels of processed events: name -> template rendered over the event.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Which of `labels` the duration histogram carries.
    #[serde(default)]
    pub duration_labels: Vec<String>,
    /// Fixed labels of failed events (plus `reason`).
    #[serde(default)]
    pub failed_labels: BTreeMap<String, String>,
    /// Export process metrics (CPU, memory, fds) under this prefix.
    #[serde(default)]
    pub process_metrics: bool,
    /// Label sets a family may hold; further ones are folded into label
    /// value `other` (counted by `ingestd_metric_label_folds_total`), so
    /// labels taken from events (subjects, fields) cannot exhaust memory.
    #[serde(default = "default_max_label_sets")]
    pub max_label_sets: usize,
    /// Upper bounds, in seconds and increasing, of the buckets of
    /// `<prefix>_event_processing_duration_seconds` (default: 0.001, 0.005,
    /// 0.01, 0.05, 0.1, 0.5, 1, 5).
    #[serde(default = "default_buckets")]
    pub buckets: Vec<f64>,
}

fn default_max_label_sets() -> usize {
    10_000
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            prefix: default_prefix(),
            const_labels: BTreeMap::new(),
            labels: BTreeMap::new(),
            duration_labels: Vec::new(),
            failed_labels: BTreeMap::new(),
            process_metrics: false,
            max_label_sets: default_max_label_sets(),
            buckets: default_buckets(),
        }
    }
}

fn default_prefix() -> String {
    "ingestd".to_string()
}

/// A pipeline file read from disk, with the positions of its keys kept for
/// locating errors found after parsing.
#[derive(Debug, Clone)]
pub struct PipelineFile {
    pub path: PathBuf,
    pub text: String,
    pub keys: KeyPositions,
    pub pipeline: Pipeline,
}

impl PipelineFile {
    /// Reads, expands and parses a pipeline file; relative paths inside are
    /// resolved against the file's directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let raw = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::new(path, None, format!("cannot read: {e}")))?;
        Self::parse(path, &raw)
    }

    pub fn parse(path: &Path, raw: &str) -> Result<Self, ConfigError> {
        let text = expand_env(raw, |name| std::env::var(name).ok())
            .map_err(|e| ConfigError::new(path, Some(e.line), e.to_string()))?;
        let mut pipeline: Pipeline =
            serde_yaml::from_str(&text).map_err(|e| yaml_error(path, &e))?;
        pipeline.resolve_paths(path.parent().unwrap_or(Path::new(".")));
        let file = Self {
            path: path.to_path_buf(),
            keys: KeyPositions::of(&text),
            text,
            pipeline,
        };
        file.check()?;
        Ok(file)
    }

    /// The 1-based line of the key at `key_path` (`sink.postgres.insert`),
    /// or of its nearest ancestor the file writes.
    pub fn line_of(&self, key_path: &str) -> Option<usize> {
        self.keys.find(key_path).map(|p| p.line)
    }

    /// An error about the value at `key_path` (`sink.postgres.batch.max_bytes`),
    /// located at its key, or at its nearest ancestor's when the value is a
    /// default. The message names the full path.
    pub fn error(&self, key_path: &str, message: impl std::fmt::Display) -> ConfigError {
        let mut err = ConfigError::new(&self.path, None, format!("{key_path}: {message}"));
        if let Some(p) = self.keys.find(key_path) {
            err.line = Some(p.line);
            err.column = Some(p.column);
        }
        err
    }

    /// Cross-field checks that serde cannot express.
    fn check(&self) -> Result<(), ConfigError> {
        let p = &self.pipeline;
        if p.name.is_empty()
            || !p
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_".contains(c))
        {
            return Err(self.error("name", "must be non-empty letters, digits, '-' or '_'"));
        }
        self.check_metrics()?;
        if let Some(ptr) = &p.log.event_id {
            if !ptr.is_empty() && !ptr.starts_with('/') {
                return Err(self.error(
                    "log.event_id",
                    "a JSON pointer: empty or starting with `/` (e.g. /eventId)",
                ));
            }
        }
        self.check_invalid_policy()?;
        self.check_start()?;
        self.check_durations()?;
        let b = &p.sink.postgres.batch;
        if b.max_bytes < p.max_payload {
            return Err(self.error(
                "sink.postgres.batch.max_bytes",
                format!(
                    "{} is below max_payload ({}): the largest event could never be pulled",
                    b.max_bytes, p.max_payload
                ),
            ));
        }
        if let Some(pending) = p.source.nats.consumer.max_ack_pending {
            if pending > 0 && (pending as usize) < b.max_rows.get() {
                return Err(self.error(
                    "source.nats.consumer.max_ack_pending",
                    format!("{pending} is below batch.max_rows ({})", b.max_rows),
                ));
            }
        }
        let pg = &p.sink.postgres;
        if pg.pool == PoolMode::Own && pg.pool_size == 0 {
            return Err(self.error(
                "sink.postgres.pool_size",
                "a pool of the pipeline's own (pool: own) needs at least 1 connection",
            ));
        }
        Ok(())
    }

    fn check_metrics(&self) -> Result<(), ConfigError> {
        let m = &self.pipeline.metrics;
        if let Some(l) = m
            .duration_labels
            .iter()
            .find(|l| !m.labels.contains_key(*l))
        {
            return Err(self.error(
                "metrics.duration_labels",
                format!("`{l}` is not one of metrics.labels"),
            ));
        }
        if m.failed_labels.contains_key("reason") {
            return Err(self.error(
                "metrics.failed_labels.reason",
                "`reason` is set by the engine",
            ));
        }
        if m.buckets.is_empty() || m.buckets.windows(2).any(|w| w[0] >= w[1]) {
            return Err(self.error(
                "metrics.buckets",
                "buckets must be a non-empty increasing list",
            ));
        }
        Ok(())
    }

    fn check_invalid_policy(&self) -> Result<(), ConfigError> {
        let inv = &self.pipeline.on_error.invalid;
        match (inv.action, &inv.subject) {
            (InvalidAction::DeadLetter, None) => {
                return Err(self.error(
                    "on_error.invalid.action",
                    "action `dead_letter` needs a `subject`",
                ));
            }
            (InvalidAction::Ack | InvalidAction::Term, Some(_)) => {
                return Err(self.error(
                    "on_error.invalid.subject",
                    "`subject` is used by actions `dead_letter` and `nak` (where it receives \
                     events that reach max_deliver); with this action nothing would go there",
                ));
            }
            _ => {}
        }
        if inv.delay.is_some() && inv.action != InvalidAction::Nak {
            return Err(self.error(
                "on_error.invalid.delay",
                "`delay` is used by action `nak` only",
            ));
        }
        Ok(())
    }

    /// Durations that bound each other.
    fn check_durations(&self) -> Result<(), ConfigError> {
        let t = &self.pipeline.on_error.transient;
        if t.backoff_max < t.backoff_initial {
            return Err(self.error(
                "on_error.transient.backoff_max",
                format!(
                    "{:?} is below backoff_initial ({:?})",
                    t.backoff_max, t.backoff_initial
                ),
            ));
        }
        let s = &self.pipeline.source.nats.stream;
        if let (Some(window), Some(age)) = (s.duplicate_window, s.max_age) {
            if window > age {
                return Err(self.error(
                    "source.nats.stream.duplicate_window",
                    format!("{window:?} is longer than max_age ({age:?}): NATS refuses it"),
                ));
            }
        }
        Ok(())
    }

    /// `start_sequence` and `start_time` go with their deliver policies.
    fn check_start(&self) -> Result<(), ConfigError> {
        let c = &self.pipeline.source.nats.consumer;
        let needs = match (c.deliver_policy, c.start_sequence, c.start_time) {
            (DeliverPolicy::ByStartSequence, None, _) => "by_start_sequence needs `start_sequence`",
            (DeliverPolicy::ByStartTime, _, None) => "by_start_time needs `start_time`",
            (DeliverPolicy::ByStartSequence, _, Some(_)) | (DeliverPolicy::ByStartTime, Some(_), _) => {
                "give either `start_sequence` or `start_time`, as the deliver policy says"
            }
            (DeliverPolicy::ByStartSequence | DeliverPolicy::ByStartTime, _, _) => return Ok(()),
            (_, None, None) => return Ok(()),
            _ => "`start_sequence` and `start_time` go with deliver_policy by_start_sequence or by_start_time",
        };
        Err(self.error("source.nats.consumer.deliver_policy", needs))
    }
}

/// Pull requests the source keeps open at once. It is part of the
/// configuration model because the default `max_ack_pending` derives from
/// it. One: with two, the server's count of unacknowledged messages can
/// exceed the bound the engine promises
/// (`max_rows × (max_in_flight + 1 + REQUESTS_AHEAD)`), for no measurable
/// throughput gain.
pub const REQUESTS_AHEAD: usize = 1;

impl Pipeline {
    fn resolve_paths(&mut self, dir: &Path) {
        if let Some(v) = &mut self.validate {
            v.schema = dir.join(&v.schema);
        }
        if let Some(m) = &mut self.sink.postgres.migrations {
            *m = dir.join(&*m);
        }
    }

    /// The default `max_ack_pending`: what one process holds (the batches
    /// being written, one prepared and waiting for a slot, and what the open
    /// pull requests deliver), plus one batch of slack because the server
    /// processes acknowledgements asynchronously and may count a batch the
    /// engine has already acknowledged.
    pub fn max_ack_pending(&self) -> i64 {
        let b = &self.sink.postgres.batch;
        let held = b.max_in_flight.get() + 1 + REQUESTS_AHEAD + 1;
        self.source
            .nats
            .consumer
            .max_ack_pending
            .unwrap_or((b.max_rows.get() * held) as i64)
    }
}

/// The JSON Schema of the pipeline file format, for editors.
pub fn json_schema() -> serde_json::Value {
    serde_json::to_value(schemars::schema_for!(Pipeline)).expect("a schema serializes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("512").unwrap(), 512);
        assert!(parse_size("1 parsec").is_err());
    }

    #[test]
    fn start_positions_go_with_their_deliver_policy() {
        let file = |consumer: &str| {
            let text = format!("name: x\nsource:\n  nats:\n    stream: {{name: s, subjects: [a]}}\n    consumer: {{durable: d, filter_subject: a, {consumer}}}\nsink: {{postgres: {{insert: x}}}}\n");
            PipelineFile::parse(Path::new("p.yaml"), &text)
        };
        assert!(file("deliver_policy: by_start_sequence, start_sequence: 3").is_ok());
        let t = file("deliver_policy: by_start_time, start_time: '2026-11-25T00:00:00Z'").unwrap();
        assert_eq!(
            t.pipeline
                .source
                .nats
                .consumer
                .start_time
                .unwrap()
                .unix_timestamp(),
            1_795_564_800
        );
        assert!(file("deliver_policy: by_start_sequence").is_err());
        assert!(file("deliver_policy: by_start_time, start_sequence: 3").is_err());
        assert!(file("deliver_policy: all, start_sequence: 3").is_err());
        assert!(file("deliver_policy: by_start_time, start_time: yesterday").is_err());
    }

    #[test]
    fn shipped_pipeline_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/tiktok.yaml");
        let file = PipelineFile::load(&path).unwrap();
        let p = &file.pipeline;
        assert_eq!(p.source.nats.consumer.ack_wait, Duration::from_secs(30));
        assert_eq!(p.source.nats.stream.max_bytes, Some(1 << 30));
        assert_eq!(
            p.source.nats.stream.max_age,
            Some(Duration::from_secs(7 * 86400))
        );
        assert!(p
            .validate
            .as_ref()
            .unwrap()
            .schema
            .ends_with("tiktok-event.schema.json"));
    }

    #[test]
    fn shipped_editor_schema_is_current() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/pipeline.schema.json");
        let shipped: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert!(
            shipped == json_schema(),
            "schemas/pipeline.schema.json is stale: run `ingestd schema > schemas/pipeline.schema.json`"
        );
    }

    #[test]
    fn shipped_pipeline_satisfies_the_editor_schema() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(dir.join("pipelines/tiktok.yaml")).unwrap();
        let expanded = expand_env(&text, |_| None).unwrap();
        let doc: serde_json::Value = serde_yaml::from_str(&expanded).unwrap();
        let validator = jsonschema::validator_for(&json_schema()).unwrap();
        let errors: Vec<String> = validator.iter_errors(&doc).map(|e| e.to_string()).collect();
        assert!(errors.is_empty(), "{errors:?}");
    }

    #[test]
    fn unknown_key_is_located() {
        let text = "name: x\nsource:\n  nats:\n    stream: {name: s, subjects: [a]}\n    consumer: {durable: d, filter_subject: f, bogus: 1}\nsink: {postgres: {insert: x}}\n";
        let err = PipelineFile::parse(Path::new("p.yaml"), text).unwrap_err();
        assert_eq!(err.line, Some(5), "{err}");
        assert!(err.message.contains("bogus"), "{err}");
        assert!(err.to_string().starts_with("p.yaml:5:"), "{err}");
    }

    #[test]
    fn batch_bytes_are_bounded_both_ways() {
        let text = |bytes: &str| {
            format!("name: x\nsource:\n  nats:\n    stream: {{name: s, subjects: [a]}}\n    consumer: {{durable: d, filter_subject: a}}\nsink:\n  postgres:\n    insert: x\n    batch: {{max_bytes: {bytes}}}\n")
        };
        let parse = |bytes| PipelineFile::parse(Path::new("p.yaml"), &text(bytes));
        assert!(parse("8MiB").is_ok());
        assert!(parse("1GiB").unwrap_err().message.contains("1 GB"));
        assert!(parse("512KiB").unwrap_err().message.contains("max_payload"));
    }

    /// A pipeline with every duration and size field written out, each
    /// on a line of its own, and `field` set to `value`.
    fn every_field(field: &str, value: &str) -> String {
        let text = "name: x\nmax_payload: 1MiB\nsource:\n  nats:\n    lag_interval: 5s\n    stream:\n      name: s\n      subjects: [a]\n      max_age: 7d\n      max_bytes: 1GiB\n      duplicate_window: 2m\n    consumer:\n      durable: d\n      filter_subject: a\n      ack_wait: 30s\nsink:\n  postgres:\n    insert: x\n    statement_timeout: 30s\n    connect_timeout: 3s\n    lock_timeout: 10s\n    batch:\n      max_wait: 3ms\n      max_bytes: 8MiB\non_error:\n  invalid:\n    action: nak\n    delay: 1s\n  transient:\n    backoff_initial: 100ms\n    backoff_max: 10s\n";
        let key = field.rsplit('.').next().unwrap();
        let keys = KeyPositions::of(text);
        let line = keys.exact(field).expect("the field is written").line;
        text.lines()
            .enumerate()
            .map(|(i, l)| match i + 1 == line {
                true => format!("{}{key}: {value}\n", &l[..l.find(key).unwrap()]),
                false => format!("{l}\n"),
            })
            .collect()
    }

    /// Every duration and size field refuses what it cannot become (zero
    /// where zero would spin or mean "no limit", less than a millisecond
    /// where Postgres counts milliseconds, more than a timer or NATS can
    /// hold), with an error on the field's own line naming its full path.
    #[test]
    fn every_duration_and_size_is_bounded_and_located() {
        let file = |text: &str| PipelineFile::parse(Path::new("p.yaml"), text);
        assert!(file(&every_field("name", "x")).is_ok());
        for (field, bad) in [
            ("source.nats.lag_interval", "0s"),
            ("source.nats.lag_interval", "400000000000y"),
            ("source.nats.stream.max_age", "10ms"),
            ("source.nats.stream.max_age", "400y"),
            ("source.nats.stream.max_bytes", "0"),
            ("source.nats.stream.max_bytes", "18446744073709551615"),
            ("source.nats.stream.duplicate_window", "0s"),
            ("source.nats.consumer.ack_wait", "100ms"),
            ("source.nats.consumer.ack_wait", "400000000000y"),
            ("sink.postgres.statement_timeout", "500us"),
            ("sink.postgres.statement_timeout", "25d"),
            ("sink.postgres.lock_timeout", "500us"),
            ("sink.postgres.lock_timeout", "0s"),
            ("sink.postgres.connect_timeout", "0s"),
            ("sink.postgres.batch.max_wait", "400000000000y"),
            ("sink.postgres.batch.max_bytes", "1GiB"),
            ("sink.postgres.batch.max_bytes", "0"),
            ("max_payload", "0"),
            ("on_error.invalid.delay", "400000000000y"),
            ("on_error.transient.backoff_initial", "0s"),
            ("on_error.transient.backoff_max", "400000000000y"),
        ] {
            let text = every_field(field, bad);
            let err = file(&text).expect_err(&format!("{field}: {bad} accepted"));
            let line = KeyPositions::of(&text).exact(field).unwrap().line;
            assert_eq!(err.line, Some(line), "{field}: {bad}: {err}");
            assert!(err.message.starts_with(&format!("{field}: ")), "{err}");
        }
        for (field, good) in [
            ("sink.postgres.statement_timeout", "1ms"),
            ("sink.postgres.lock_timeout", "2147483647ms"),
            ("sink.postgres.batch.max_wait", "0s"),
            ("on_error.invalid.delay", "0s"),
            ("source.nats.consumer.ack_wait", "1s"),
        ] {
            let text = every_field(field, good);
            assert!(
                file(&text).is_ok(),
                "{field}: {good}: {:?}",
                file(&text).err()
            );
        }
    }

    /// `pool: own` takes its size from `pool_size`, which must then be at
    /// least one; the shared pool (the default) ignores it.
    #[test]
    fn a_pool_of_its_own_needs_a_connection() {
        let with = |extra: &str| {
            let text = every_field("sink.postgres.insert", "x")
                .replace("    insert: x\n", &format!("    insert: x\n{extra}"));
            PipelineFile::parse(Path::new("p.yaml"), &text)
        };
        let shared = with("").expect("the default");
        assert_eq!(shared.pipeline.sink.postgres.pool, PoolMode::Shared);
        let own = with("    pool: own\n    pool_size: 2\n").expect("own");
        assert_eq!(own.pipeline.sink.postgres.pool, PoolMode::Own);
        assert!(with("    pool_size: 0\n").is_ok());
        let err = with("    pool: own\n    pool_size: 0\n").unwrap_err();
        assert!(
            err.message.starts_with("sink.postgres.pool_size: "),
            "{err}"
        );
        assert_eq!(err.line, Some(20), "{err}");
        assert!(with("    pool: mine\n").is_err());
    }

    /// A check after parsing names the key it is about, not the first key
    /// of that name: `batch.max_bytes`, not `stream.max_bytes`.
    #[test]
    fn checks_after_parsing_are_located_by_their_full_key_path() {
        let text = every_field("sink.postgres.batch.max_bytes", "512KiB");
        let err = PipelineFile::parse(Path::new("p.yaml"), &text).unwrap_err();
        assert_eq!(err.line, Some(24), "{err}");
        assert!(err.message.contains("max_payload"), "{err}");
        let text = every_field("on_error.transient.backoff_max", "10ms");
        let err = PipelineFile::parse(Path::new("p.yaml"), &text).unwrap_err();
        assert_eq!(err.line, Some(31), "{err}");
        let text = every_field("source.nats.stream.duplicate_window", "8d");
        let err = PipelineFile::parse(Path::new("p.yaml"), &text).unwrap_err();
        assert_eq!(err.line, Some(11), "{err}");
    }

    #[test]
    fn bad_duration_is_located() {
        let text = "name: x\nsource:\n  nats:\n    stream: {name: s, subjects: [a]}\n    consumer:\n      durable: d\n      filter_subject: f\n      ack_wait: soon\nsink: {postgres: {insert: x}}\n";
        let err = PipelineFile::parse(Path::new("p.yaml"), text).unwrap_err();
        assert_eq!(err.line, Some(8), "{err}");
    }
}
