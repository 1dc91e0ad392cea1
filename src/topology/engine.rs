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

use std::borrow::Cow;
use std::collections::hash_map::DefaultHasher;
use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::files::pipeline_files;
use crate::config::PipelineFile;
use crate::pipeline::{Deps, Pipeline, Stats};
use crate::source::nats;
use crate::telemetry::health::{Problem, Severity, Side};
use crate::telemetry::metrics::Metrics;

/// What the engine needs from the command line and environment.
#[derive(Clone)]
pub struct Settings {
    pub pipelines_dir: PathBuf,
    pub database_url: String,
    pub nats_url: String,
    pub nats_name: String,
    pub nats_auth: nats::NatsAuth,
    pub listen: SocketAddr,
    /// How long shutdown waits for in-flight batches.
    pub shutdown_grace: Duration,
}

/// The running engine, shared with the HTTP handlers and the watcher.
pub struct Engine {
    pub metrics: Arc<Metrics>,
    pub dir: PathBuf,
    nats: async_nats::Client,
    deps: Deps,
    /// One slot per pipeline file. Only the reconcile task changes it, and
    /// never holds the lock across an await.
    slots: Mutex<BTreeMap<PathBuf, Slot>>,
    /// Replaced versions still finishing their batches.
    retiring: Mutex<Vec<JoinHandle<()>>>,
}

/// A pipeline file's state: the version running (if any) and the last
/// load error (if the last attempt failed).
#[derive(Default)]
struct Slot {
    running: Option<Running>,
    /// Event counts across every version of the file.
    stats: Arc<Stats>,
    error: Option<String>,
    /// Fingerprint of the last attempted content, so an unchanged broken
    /// file is not rebuilt on every unrelated change.
    attempted: Option<u64>,
}

struct Running {
    pipeline: Arc<Pipeline>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    fingerprint: u64,
    loaded_at: chrono::DateTime<chrono::Utc>,
}

/// One pipeline as `/pipelines` shows it (and as clients read it back).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub name: Option<String>,
    pub file: String,
    /// `failing` (running, but an operator must fix its statement, table or
    /// consumer), `retrying` (running, waiting out an outage), `degraded`
    /// (running an older version because the file's current content failed
    /// to load), `running`, or `failed` (never loaded).
    pub state: Cow<'static, str>,
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

    /// True when every pipeline's database answers and no pipeline has a
    /// problem writing.
    pub async fn database_up(&self) -> bool {
        for p in self.running() {
            if p.health.problem(Side::Sink).is_some() || !p.sink.ping().await {
                return false;
            }
        }
        true
    }

    /// True when the connection is up and no pipeline has a problem pulling.
    pub fn source_up(&self) -> bool {
        self.nats_up()
            && self
                .running()
                .iter()
                .all(|p| p.health.problem(Side::Source).is_none())
    }

    pub fn statuses(&self) -> Vec<Status> {
        let slots = self.slots.lock().expect("slots lock");
        slots
            .iter()
            .map(|(path, slot)| slot.status(&self.shown(path), &self.dir))
            .collect()
    }

    /// Brings the running set in line with the directory. Returns the load
    /// errors (already logged, counted and recorded for `/pipelines`).
    ///
    /// A file that disappeared while another file with its pipeline (name
    /// or durable consumer) appeared is a move (a rename, an editor's
    /// atomic save, a ConfigMap update): the new file's version takes over
    /// from the running one like a reload, without a gap.
    pub async fn reconcile(&self) -> Vec<String> {
        let files = match pipeline_files(&self.dir) {
            Ok(f) => f,
            Err(e) => return vec![e.to_string()],
        };
        let mut errors = Vec::new();
        let gone = self.gone(&files);
        for path in &files {
            if let Err(e) = self.reconcile_file(path, &gone).await {
                errors.push(e);
            }
        }
        let gone = self.gone(&files);
        for path in &gone {
            let slot = self.slots.lock().expect("slots lock").remove(path);
            if let Some(running) = slot.and_then(|s| s.running) {
                tracing::info!(file = %path.display(), "pipeline file removed: stopping its pipeline");
                stop(running).await;
            }
            self.metrics.release(path);
        }
        if !gone.is_empty() && self.forget_refusals() {
            // A file refused as a duplicate of one just removed may run now.
            errors = Vec::new();
            for path in &files {
                if let Err(e) = self.reconcile_file(path, &[]).await {
                    errors.push(e);
                }
            }
        }
        errors
    }

    /// The files that have a slot but are no longer in `files`.
    fn gone(&self, files: &[PathBuf]) -> Vec<PathBuf> {
        let slots = self.slots.lock().expect("slots lock");
        slots
            .keys()
            .filter(|p| !files.contains(p))
            .cloned()
            .collect()
    }

    /// Makes files that failed to load without running anything be tried
    /// again. True if there were any.
    fn forget_refusals(&self) -> bool {
        let mut slots = self.slots.lock().expect("slots lock");
        let mut any = false;
        for slot in slots.values_mut() {
            if slot.running.is_none() && slot.error.is_some() {
                slot.attempted = None;
                any = true;
            }
        }
        any
    }

    /// Loads one file if its content changed, and swaps versions (taking
    /// over the pipeline of a `gone` file it moved from).
    async fn reconcile_file(&self, path: &Path, gone: &[PathBuf]) -> Result<(), String> {
        let loaded = PipelineFile::load(path).map_err(|e| e.to_string());
        let fingerprint = loaded.as_ref().map_or_else(|e| hash_of(e), fingerprint);
        {
            let mut slots = self.slots.lock().expect("slots lock");
            let slot = slots.entry(path.to_path_buf()).or_default();
            if slot
                .running
                .as_ref()
                .is_some_and(|r| r.fingerprint == fingerprint)
            {
                slot.error = None;
                slot.attempted = Some(fingerprint);
                return Ok(());
            }
            if slot.attempted == Some(fingerprint) {
                return slot.error.clone().map_or(Ok(()), Err);
            }
            slot.attempted = Some(fingerprint);
        }
        let built = match loaded {
            Ok(file) => self.build(path, file, gone).await,
            Err(e) => Err(e),
        };
        match built {
            Ok((pipeline, moved_from)) => {
                self.count(path, "success");
                self.swap(path, pipeline, fingerprint, moved_from.as_deref())
                    .await;
                Ok(())
            }
            Err(e) => {
                self.count(path, "failure");
                tracing::error!(error = %e, "pipeline not (re)loaded; any running version keeps running");
                self.slots
                    .lock()
                    .expect("slots lock")
                    .entry(path.to_path_buf())
                    .or_default()
                    .error = Some(e.clone());
                Err(e)
            }
        }
    }

    /// Builds the file's pipeline. Also returns the `gone` file whose
    /// pipeline it takes over, if it is a move; its counts carry over.
    async fn build(
        &self,
        path: &Path,
        file: PipelineFile,
        gone: &[PathBuf],
    ) -> Result<(Pipeline, Option<PathBuf>), String> {
        let moved_from = self.check_unique(path, &file, gone)?;
        let stats = {
            let mut slots = self.slots.lock().expect("slots lock");
            let from = moved_from.as_ref().and_then(|f| slots.get(f));
            let carried = from.map(|s| s.stats.clone());
            let slot = slots.entry(path.to_path_buf()).or_default();
            if let Some(stats) = carried {
                slot.stats = stats;
            }
            slot.stats.clone()
        };
        let pipeline = Pipeline::build(file, &self.deps, stats)
            .await
            .map_err(|e| format!("{e:#}"))?;
        Ok((pipeline, moved_from))
    }

    /// Two files may not run the same pipeline name or durable consumer:
    /// their events would be split between them unpredictably. The file
    /// that runs it keeps it; the other is refused, unless the running one
    /// is `gone` (a move), whose path is returned.
    fn check_unique(
        &self,
        path: &Path,
        file: &PipelineFile,
        gone: &[PathBuf],
    ) -> Result<Option<PathBuf>, String> {
        let slots = self.slots.lock().expect("slots lock");
        let p = &file.pipeline;
        let mut moved_from = None;
        for (other, slot) in slots.iter().filter(|(o, _)| *o != path) {
            let Some(r) = &slot.running else { continue };
            if r.pipeline.name != p.name && r.pipeline.durable() != p.source.nats.consumer.durable {
                continue;
            }
            if gone.contains(other) && moved_from.is_none() {
                moved_from = Some(other.clone());
                continue;
            }
            return Err(file
                .error(
                    "name",
                    format!(
                        "pipeline `{}` (or its durable consumer) is already run by {}; \
                         this file is not loaded",
                        p.name,
                        self.shown(other)
                    ),
                )
                .to_string());
        }
        Ok(moved_from)
    }

    /// Starts the new version, then stops the old one (of this file, or of
    /// the file it `moved_from`), which hands its open pull requests to the
    /// new one (see the module doc).
    async fn swap(
        &self,
        path: &Path,
        pipeline: Pipeline,
        fingerprint: u64,
        moved_from: Option<&Path>,
    ) {
        let pipeline = Arc::new(pipeline);
        let (stop_tx, stop_rx) = watch::channel(false);
        let (handoff_tx, handoff_rx) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(pipeline.clone().run(stop_rx, Some(handoff_rx)));
        let new = Running {
            pipeline,
            stop: stop_tx,
            task,
            fingerprint,
            loaded_at: chrono::Utc::now(),
        };
        let (old, orphan) = {
            let mut slots = self.slots.lock().expect("slots lock");
            let moved = moved_from
                .and_then(|from| slots.remove(from))
                .and_then(|m| m.running);
            let slot = slots.entry(path.to_path_buf()).or_default();
            slot.error = None;
            match slot.running.replace(new) {
                Some(old) => (Some(old), moved),
                None => (moved, None),
            }
        };
        if let Some(orphan) = orphan {
            stop(orphan).await;
        }
        if let Some(from) = moved_from {
            tracing::info!(from = %from.display(), to = %path.display(), "pipeline file moved: the new file takes over");
        }
        if let Some(old) = old {
            tracing::info!(file = %path.display(), "pipeline reloaded: stopping the previous version");
            old.pipeline.hand_over_to(handoff_tx);
            self.retire(old);
        }
        if let Some(from) = moved_from {
            self.metrics.release(from);
        }
    }

    /// A pipeline file as `/pipelines`, metrics and errors show it: relative
    /// to the pipelines directory (where the engine runs is nobody's
    /// business).
    fn shown(&self, path: &Path) -> String {
        path.strip_prefix(&self.dir)
            .unwrap_or(path)
            .display()
            .to_string()
    }

    fn count(&self, path: &Path, result: &str) {
        let file = self.shown(path);
        self.metrics
            .engine
            .reloads
            .with_label_values(&[file.as_str(), result])
            .inc();
    }

    /// Stops a replaced version in the background: it finishes its
    /// in-flight batches (a slow one may take long) while the reload goes
    /// on and the next reload may follow at once.
    fn retire(&self, old: Running) {
        let mut retiring = self.retiring.lock().expect("retiring lock");
        retiring.retain(|t| !t.is_finished());
        retiring.push(tokio::spawn(stop(old)));
    }

    /// Stops every pipeline, letting each finish its in-flight batches,
    /// and waits for the versions still retiring.
    pub async fn stop_all(&self) {
        let running: Vec<Running> = {
            let mut slots = self.slots.lock().expect("slots lock");
            slots
                .values_mut()
                .filter_map(|s| s.running.take())
                .collect()
        };
        let retiring = std::mem::take(&mut *self.retiring.lock().expect("retiring lock"));
        futures::future::join_all(running.into_iter().map(stop)).await;
        futures::future::join_all(retiring).await;
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
                (Some(_), Some(p), _) if p.severity == Severity::Failing => "failing",
                (Some(_), Some(_), _) => "retrying",
                (Some(_), None, None) => "running",
                (Some(_), None, Some(_)) => "degraded",
                (None, _, _) => "failed",
            }
            .into(),
            problem,
            version: r.map(|r| format!("{:016x}", r.fingerprint)),
            loaded_at: r.map(|r| r.loaded_at.to_rfc3339()),
            last_error: self
                .error
                .as_ref()
                .map(|e| e.replace(&format!("{}/", dir.display()), "")),
            received: self.stats.received.load(Relaxed),
            processed: self.stats.processed.load(Relaxed),
            failed: self.stats.failed.load(Relaxed),
        }
    }
}

async fn stop(running: Running) {
    let _ = running.stop.send(true);
    if let Err(e) = running.task.await {
        tracing::error!(error = %e, "pipeline task failed");
    }
    running.pipeline.health.release();
}

/// Identifies a version: the expanded file text and the content of the
/// schema and migrations it references.
fn fingerprint(file: &PipelineFile) -> u64 {
    let mut h = DefaultHasher::new();
    file.text.hash(&mut h);
    if let Some(v) = &file.pipeline.validate {
        std::fs::read(&v.schema).ok().hash(&mut h);
    }
    if let Some(dir) = &file.pipeline.sink.postgres.migrations {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        entries.sort();
        for e in entries {
            e.hash(&mut h);
            std::fs::read(&e).ok().hash(&mut h);
        }
    }
    h.finish()
}

fn hash_of(s: &str) -> u64 {
    let mut h = DefaultHasher::new();
    s.hash(&mut h);
    h.finish()
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
    let nats = nats::connect(
        &settings.nats_url,
        &settings.nats_name,
        &settings.nats_auth,
        metrics.clone(),
    )
    .await?;
    let engine = Arc::new(Engine {
        metrics: metrics.clone(),
        dir,
        deps: Deps {
            js: async_nats::jetstream::new(nats.clone()),
            metrics: metrics.clone(),
            database_url: settings.database_url.clone(),
        },
        nats,
        slots: Mutex::new(BTreeMap::new()),
        retiring: Mutex::new(Vec::new()),
    });
    let errors = engine.reconcile().await;
    if !errors.is_empty() {
        engine.stop_all().await;
        anyhow::bail!("{}", errors.join("\n"));
    }
    metrics.set_nats_connected(engine.nats_up());
    Ok(engine)
}
