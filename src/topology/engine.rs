//! Runs the set of pipelines found in the pipelines directory and applies
//! changes to it (hot reload).
//!
//! A reload builds the new version completely (parse, schema, template,
//! migrations, statement prepared, consumer ensured) while the old one keeps
//! running. Only then is the new version started and the old one stopped:
//! both pull from the same durable consumer for the moment the old one takes
//! to drain its open pull request and acknowledge its in-flight batches, so
//! there is no gap in processing and every message is delivered to exactly
//! one of them. A failed build leaves the running version untouched.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::files::{pipeline_files, DirError};
use crate::config::ConfigError;
use crate::pipeline::{BuildError, Deps, Pipeline, Stats};
use crate::source::nats;
use crate::telemetry::health::{Problem, Severity, Side};
use crate::telemetry::metrics::Metrics;
use crate::util::backoff::Backoff;
use crate::util::rfc3339::{self, Fraction, Zulu};

/// What the engine needs from the command line and environment.
#[derive(Clone)]
pub struct Settings {
    pub pipelines_dir: PathBuf,
    pub database_url: String,
    pub nats: nats::NatsOptions,
    pub nats_name: String,
    pub listen: SocketAddr,
    /// How long shutdown waits for in-flight batches.
    pub shutdown_grace: Duration,
    /// Connections of each database's shared pool.
    pub db_pool_size: u32,
}

/// The first and longest pause before a file that failed to load for a
/// transient reason is tried again.
const LOAD_RETRY: (Duration, Duration) = (Duration::from_millis(250), Duration::from_secs(5));

/// How long stopping waits for the NATS connection to send what it buffers.
const FINAL_FLUSH: Duration = Duration::from_secs(2);

/// The running engine, shared with the HTTP handlers and the watcher.
pub struct Engine {
    pub metrics: Arc<Metrics>,
    pub dir: PathBuf,
    pub(super) nats: async_nats::Client,
    pub(super) deps: Deps,
    /// One slot per pipeline file. Only the reconcile task changes it, and
    /// never holds the lock across an await.
    pub(super) slots: Mutex<BTreeMap<PathBuf, Slot>>,
    /// The root of the cancellation tree: every version's token is its
    /// child, and the HTTP server and the watcher end with it.
    pub shutdown: CancellationToken,
    /// Every version's task, and the stops of replaced versions still
    /// finishing their batches: joined by [`Engine::stop_all`].
    pub(super) tasks: TaskTracker,
    /// The pipeline and check of the last reason not to be ready (logged
    /// once per change).
    pub(super) not_ready: Mutex<Option<(Option<String>, &'static str)>>,
}

/// What `/ready` and `/pipelines` say about readiness.
#[derive(Debug, Clone, Serialize)]
pub struct Readiness {
    pub database: bool,
    pub nats: bool,
    /// Why not ready (the first reason found), if so.
    pub reason: Option<NotReady>,
}

impl Readiness {
    pub fn ok(&self) -> bool {
        self.database && self.nats
    }
}

/// One reason the engine is not ready.
#[derive(Debug, Clone, Serialize)]
pub struct NotReady {
    /// The pipeline concerned (none for the NATS connection itself).
    pub pipeline: Option<String>,
    /// `database` or `nats`.
    pub check: &'static str,
    pub error: String,
}

impl NotReady {
    fn new(pipeline: Option<&str>, check: &'static str, error: &str) -> Self {
        Self {
            pipeline: pipeline.map(str::to_string),
            check,
            error: error.to_string(),
        }
    }
}

/// Why a pipeline file (or the directory) was not (re)loaded. Kept in the
/// file's slot, where `/pipelines` shows it and the next attempt at the
/// unchanged file returns it again, hence `Clone` (shared sources).
#[derive(Debug, Clone, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Directory(Arc<DirError>),
    #[error("{}: {source}", path.display())]
    Interrupted {
        path: PathBuf,
        #[source]
        source: Arc<tokio::task::JoinError>,
    },
    /// The file's content: its own error names the file and position.
    #[error(transparent)]
    Content(#[from] ConfigError),
    #[error(transparent)]
    Build(Arc<BuildError>),
    /// A build abandoned by shutdown (nothing of it ran yet).
    #[error("{}: not loaded: the engine is shutting down", path.display())]
    ShuttingDown { path: PathBuf },
}

/// A pipeline file's state: the version running (if any) and the last
/// load error (if the last attempt failed).
#[derive(Default)]
pub(super) struct Slot {
    pub(super) running: Option<Running>,
    /// Event counts across every version of the file.
    pub(super) stats: Arc<Stats>,
    pub(super) error: Option<LoadError>,
    /// Fingerprint of the last attempted content, so an unchanged broken
    /// file is not rebuilt on every unrelated change.
    pub(super) attempted: Option<u64>,
    /// When the last load failed for a transient reason: when it is tried
    /// again.
    pub(super) retry: Option<Retry>,
}

/// The next try of a load that failed for a transient reason.
pub(super) struct Retry {
    pub(super) at: tokio::time::Instant,
    /// How long until `at`.
    pub(super) pause: Duration,
    backoff: Backoff,
}

impl Retry {
    /// The try after `last` (backoff doubled up to its cap).
    pub(super) fn after(last: Option<&Retry>) -> Self {
        let mut backoff = last.map_or_else(|| Backoff::new(LOAD_RETRY), |r| r.backoff.clone());
        let pause = backoff.pause();
        Self {
            at: tokio::time::Instant::now() + pause,
            pause,
            backoff,
        }
    }
}

pub(super) struct Running {
    pub(super) pipeline: Arc<Pipeline>,
    pub(super) stop: CancellationToken,
    pub(super) task: JoinHandle<()>,
    pub(super) fingerprint: u64,
    pub(super) loaded_at: time::OffsetDateTime,
}

/// Where a pipeline file stands, as `/pipelines` shows it (the JSON
/// values are the lower-case names; clients and alerts match on them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PipelineState {
    /// Running, with no problem.
    Running,
    /// Running, waiting out an outage (the database or NATS).
    Retrying,
    /// Running, but an operator must fix its statement, table or consumer.
    Failing,
    /// Running an older version because the file's current content failed
    /// to load.
    Degraded,
    /// Not running: its load failed for a transient reason (a database or
    /// NATS that did not answer) and is tried again by itself.
    Waiting,
    /// Not running: its content is wrong; tried again when the file
    /// changes.
    Failed,
}

/// One pipeline as `/pipelines` shows it (and as clients read it back).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub name: Option<String>,
    pub file: String,
    pub state: PipelineState,
    /// The running version's current problem, if any.
    pub problem: Option<Problem>,
    pub version: Option<String>,
    pub loaded_at: Option<String>,
    pub last_error: Option<String>,
    pub received: u64,
    pub processed: u64,
    pub failed: u64,
}

impl Engine {
    pub fn nats_up(&self) -> bool {
        self.nats.connection_state() == async_nats::connection::State::Connected
    }

    fn running(&self) -> Vec<Arc<Pipeline>> {
        let slots = self.slots.lock().expect("slots lock");
        slots
            .values()
            .filter_map(|s| s.running.as_ref().map(|r| r.pipeline.clone()))
            .collect()
    }

    /// What `/ready` answers. The first reason found is logged when it
    /// changes (which pipeline, which check), not on every probe.
    pub async fn readiness(&self) -> Readiness {
        let mut ready = Readiness {
            database: true,
            nats: self.nats_up(),
            reason: None,
        };
        if !ready.nats {
            ready.reason = Some(NotReady::new(None, "nats", "not connected to NATS"));
        }
        for p in self.running() {
            let database = match p.health.problem(Side::Sink) {
                Some(problem) => Some(problem.error),
                None if !p.sink.ping().await => {
                    Some("the database does not answer the health probe".to_string())
                }
                None => None,
            };
            // Pulling and dead-lettering are both JetStream's answers.
            let source = [Side::Source, Side::DeadLetters]
                .into_iter()
                .find_map(|side| p.health.problem(side))
                .map(|problem| problem.error);
            ready.database &= database.is_none();
            ready.nats &= source.is_none();
            let found = database
                .map(|e| ("database", e))
                .or(source.map(|e| ("nats", e)));
            if let (None, Some((check, error))) = (&ready.reason, found) {
                ready.reason = Some(NotReady::new(Some(&p.name), check, &error));
            }
        }
        self.log_readiness(&ready.reason);
        ready
    }

    fn log_readiness(&self, reason: &Option<NotReady>) {
        let key = reason.as_ref().map(|r| (r.pipeline.clone(), r.check));
        let mut last = self.not_ready.lock().expect("readiness lock");
        if *last == key {
            return;
        }
        *last = key;
        match reason {
            Some(r) => {
                tracing::warn!(pipeline = r.pipeline.as_deref().unwrap_or("-"), check = r.check,
                error = %r.error, "not ready")
            }
            None => tracing::info!("ready"),
        }
    }

    pub fn statuses(&self) -> Vec<Status> {
        let slots = self.slots.lock().expect("slots lock");
        slots
            .iter()
            .map(|(path, slot)| slot.status(&self.shown(path), &self.dir))
            .collect()
    }

    /// Stops every pipeline at once (the root token), letting each finish
    /// its in-flight batches, waits for every task of the engine (versions
    /// still retiring too), and sends NATS what is left.
    pub async fn stop_all(&self) {
        self.shutdown.cancel();
        let running: Vec<Running> = {
            let mut slots = self.slots.lock().expect("slots lock");
            slots
                .values_mut()
                .filter_map(|s| s.running.take())
                .collect()
        };
        futures::future::join_all(running.into_iter().map(stop)).await;
        self.tasks.close();
        self.tasks.wait().await;
        self.flush_nats().await;
    }

    /// Sends what the NATS connection still buffers: the acks and naks of
    /// the last batches would otherwise end with the process, their events
    /// redelivered (acked) or held until `ack_wait` (released).
    async fn flush_nats(&self) {
        match tokio::time::timeout(FINAL_FLUSH, self.nats.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e,
                "cannot send the last acknowledgements to NATS; their events will be delivered again"),
            Err(_) => tracing::warn!(?FINAL_FLUSH,
                "NATS did not take the last acknowledgements in time; their events will be delivered again"),
        }
    }

    /// Makes the next reconcile retry every file that failed, even if it is
    /// unchanged (a missing table may have been created meanwhile). Running
    /// versions whose file is unchanged stay as they are.
    pub fn forget_attempts(&self) {
        let mut slots = self.slots.lock().expect("slots lock");
        for slot in slots.values_mut() {
            slot.attempted = None;
        }
    }

    /// When the next load that failed for a transient reason is due.
    pub fn next_retry(&self) -> Option<tokio::time::Instant> {
        let slots = self.slots.lock().expect("slots lock");
        slots
            .values()
            .filter_map(|s| s.retry.as_ref())
            .map(|r| r.at)
            .min()
    }

    /// Makes the next reconcile try again the files whose retry is due.
    pub fn forget_due_retries(&self) {
        let now = tokio::time::Instant::now();
        let mut slots = self.slots.lock().expect("slots lock");
        for slot in slots.values_mut() {
            if slot.retry.as_ref().is_some_and(|r| r.at <= now) {
                slot.attempted = None;
            }
        }
    }

    /// Directories whose changes may change a pipeline: the pipelines
    /// directory and those of referenced schemas and migrations.
    pub fn watched_dirs(&self) -> Vec<PathBuf> {
        let mut dirs = vec![self.dir.clone()];
        for p in self.running() {
            dirs.extend(p.referenced_dirs());
        }
        dirs.sort();
        dirs.dedup();
        dirs
    }
}

impl Slot {
    /// `dir` is cut out of the load error, which names the file.
    fn status(&self, file: &str, dir: &Path) -> Status {
        let r = self.running.as_ref();
        let problem = r.and_then(|r| r.pipeline.health.worst());
        Status {
            name: r.map(|r| r.pipeline.name.clone()),
            file: file.to_string(),
            state: match (r, &problem, &self.error) {
                (Some(_), Some(p), _) if p.severity == Severity::Failing => PipelineState::Failing,
                (Some(_), Some(_), _) => PipelineState::Retrying,
                (Some(_), None, None) => PipelineState::Running,
                (Some(_), None, Some(_)) => PipelineState::Degraded,
                (None, _, _) if self.retry.is_some() => PipelineState::Waiting,
                (None, _, _) => PipelineState::Failed,
            },
            problem,
            version: r.map(|r| format!("{:016x}", r.fingerprint)),
            loaded_at: r.map(|r| rfc3339::format(r.loaded_at, Fraction::Fewest, Zulu::Offset)),
            last_error: self
                .error
                .as_ref()
                .map(|e| e.to_string().replace(&format!("{}/", dir.display()), "")),
            received: self.stats.received.load(Relaxed),
            processed: self.stats.processed.load(Relaxed),
            failed: self.stats.failed.load(Relaxed),
        }
    }
}

pub(super) async fn stop(running: Running) {
    running.stop.cancel();
    if let Err(e) = running.task.await {
        tracing::error!(error = %e, "pipeline task failed");
    }
    running.pipeline.health.release();
}

/// Connects to NATS and starts every pipeline of the pipelines directory.
/// Any pipeline that cannot start fails the start-up.
pub async fn start(settings: &Settings) -> anyhow::Result<Arc<Engine>> {
    let dir = settings.pipelines_dir.canonicalize().map_err(|e| {
        anyhow::anyhow!(
            "cannot read pipelines directory {}: {e}",
            settings.pipelines_dir.display()
        )
    })?;
    anyhow::ensure!(
        !pipeline_files(&dir)?.is_empty(),
        "no pipeline files (*.yaml) in {}",
        dir.display()
    );
    let metrics = Arc::new(Metrics::new()?);
    let nats = nats::connect(&settings.nats, &settings.nats_name, metrics.clone()).await?;
    let engine = Arc::new(Engine {
        metrics: metrics.clone(),
        dir,
        deps: Deps::new(
            async_nats::jetstream::new(nats.clone()),
            metrics.clone(),
            settings.database_url.clone(),
            settings.db_pool_size,
            settings.shutdown_grace / 2,
        )?,
        nats,
        slots: Mutex::new(BTreeMap::new()),
        shutdown: CancellationToken::new(),
        tasks: TaskTracker::new(),
        not_ready: Mutex::new(None),
    });
    let errors = engine.reconcile().await;
    if !errors.is_empty() {
        engine.stop_all().await;
        let errors: Vec<String> = errors.iter().map(LoadError::to_string).collect();
        anyhow::bail!("{}", errors.join("\n"));
    }
    metrics.set_nats_connected(engine.nats_up());
    Ok(engine)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_retries_back_off_up_to_their_cap() {
        let mut retry = Retry::after(None);
        let mut waits = vec![retry.pause];
        for _ in 0..6 {
            retry = Retry::after(Some(&retry));
            waits.push(retry.pause);
        }
        let ms: Vec<u128> = waits.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, [250, 500, 1000, 2000, 4000, 5000, 5000]);
    }

    /// The JSON values `/pipelines` has always shown, which clients,
    /// alerts and the docs match on.
    #[test]
    fn pipeline_states_serialise_as_their_names() {
        use PipelineState::*;
        for (state, text) in [
            (Running, "running"),
            (Retrying, "retrying"),
            (Failing, "failing"),
            (Degraded, "degraded"),
            (Waiting, "waiting"),
            (Failed, "failed"),
        ] {
            let json = serde_json::to_value(state).unwrap();
            assert_eq!(json, serde_json::json!(text));
            assert_eq!(
                serde_json::from_value::<PipelineState>(json).unwrap(),
                state
            );
        }
    }
}
