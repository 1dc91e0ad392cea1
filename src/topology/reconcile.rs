//! Reconciling the running pipelines with the pipelines directory: each
//! changed file is built completely beside the running version, then
//! swapped in (handover, no gap); a rename is a move; a broken file keeps
//! the running version.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::engine::*;
use crate::config::files::pipeline_files;
use crate::config::{ConfigError, PipelineFile};
use crate::pipeline::Pipeline;

impl Engine {
    /// Brings the running set in line with the directory. Returns the load
    /// errors (already logged, counted and recorded for `/pipelines`).
    ///
    /// A file that disappeared while another file with its pipeline (name
    /// or durable consumer) appeared is a move (a rename, an editor's
    /// atomic save, a ConfigMap update): the new file's version takes over
    /// from the running one like a reload, without a gap.
    pub async fn reconcile(&self) -> Vec<LoadError> {
        let files = match pipeline_files(&self.dir) {
            Ok(f) => f,
            Err(e) => return vec![LoadError::Directory(Arc::new(e))],
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
    pub(super) fn gone(&self, files: &[PathBuf]) -> Vec<PathBuf> {
        let slots = self.slots.lock().expect("slots lock");
        slots
            .keys()
            .filter(|p| !files.contains(p))
            .cloned()
            .collect()
    }

    /// Makes files that failed to load without running anything be tried
    /// again. True if there were any.
    pub(super) fn forget_refusals(&self) -> bool {
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
    pub(super) async fn reconcile_file(
        &self,
        path: &Path,
        gone: &[PathBuf],
    ) -> Result<(), LoadError> {
        let (loaded, fingerprint) =
            load_and_fingerprint(path)
                .await
                .map_err(|e| LoadError::Interrupted {
                    path: path.to_path_buf(),
                    source: Arc::new(e),
                })?;
        {
            let mut slots = self.slots.lock().expect("slots lock");
            let slot = slots.entry(path.to_path_buf()).or_default();
            if slot
                .running
                .as_ref()
                .is_some_and(|r| r.fingerprint == fingerprint)
            {
                slot.error = None;
                slot.retry = None;
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
            Err(e) => Err(Refusal::content(e.into())),
        };
        match built {
            Ok((pipeline, moved_from)) => {
                self.count(path, "success");
                self.swap(path, pipeline, fingerprint, moved_from.as_deref())
                    .await;
                Ok(())
            }
            Err(Refusal { error, transient }) => {
                self.count(path, "failure");
                let mut slots = self.slots.lock().expect("slots lock");
                let slot = slots.entry(path.to_path_buf()).or_default();
                slot.retry = transient.then(|| Retry::after(slot.retry.as_ref()));
                match &slot.retry {
                    Some(retry) => tracing::warn!(error = %error, retry_in = ?retry.pause,
                        "pipeline not (re)loaded for now; trying again (any running version keeps running)"),
                    None => tracing::error!(error = %error,
                        "pipeline not (re)loaded; any running version keeps running"),
                }
                slot.error = Some(error.clone());
                Err(error)
            }
        }
    }

    /// Builds the file's pipeline. Also returns the `gone` file whose
    /// pipeline it takes over, if it is a move; its counts carry over.
    pub(super) async fn build(
        &self,
        path: &Path,
        file: PipelineFile,
        gone: &[PathBuf],
    ) -> Result<(Pipeline, Option<PathBuf>), Refusal> {
        let moved_from = self
            .check_unique(path, &file, gone)
            .map_err(|e| Refusal::content(e.into()))?;
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
        // A build may wait on a lock or a database that does not answer:
        // shutdown abandons it (nothing of it runs yet). A swap, once
        // begun, is never abandoned halfway.
        let built = tokio::select! {
            built = Pipeline::build(file, &self.deps, stats) => built,
            _ = self.shutdown.cancelled() => return Err(Refusal {
                error: LoadError::ShuttingDown { path: path.to_path_buf() },
                transient: true,
            }),
        };
        let pipeline = built.map_err(|e| Refusal {
            transient: e.is_transient(),
            error: LoadError::Build(Arc::new(e)),
        })?;
        Ok((pipeline, moved_from))
    }

    /// Two files may not run the same pipeline name or durable consumer:
    /// their events would be split between them unpredictably. The file
    /// that runs it keeps it; the other is refused, unless the running one
    /// is `gone` (a move), whose path is returned.
    pub(super) fn check_unique(
        &self,
        path: &Path,
        file: &PipelineFile,
        gone: &[PathBuf],
    ) -> Result<Option<PathBuf>, ConfigError> {
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
            return Err(file.error(
                "name",
                format!(
                    "pipeline `{}` (or its durable consumer) is already run by {}; \
                     this file is not loaded",
                    p.name,
                    self.shown(other)
                ),
            ));
        }
        Ok(moved_from)
    }

    /// Starts the new version, then stops the old one (of this file, or of
    /// the file it `moved_from`), which hands its open pull requests to the
    /// new one (see the module doc).
    pub(super) async fn swap(
        &self,
        path: &Path,
        pipeline: Pipeline,
        fingerprint: u64,
        moved_from: Option<&Path>,
    ) {
        let pipeline = Arc::new(pipeline);
        let token = self.shutdown.child_token();
        let (handoff_tx, handoff_rx) = tokio::sync::mpsc::unbounded_channel();
        let task = self
            .tasks
            .spawn(pipeline.clone().run(token.clone(), Some(handoff_rx)));
        let new = Running {
            pipeline,
            stop: token,
            task,
            fingerprint,
            loaded_at: time::OffsetDateTime::now_utc(),
        };
        let (old, orphan) = {
            let mut slots = self.slots.lock().expect("slots lock");
            let moved = moved_from
                .and_then(|from| slots.remove(from))
                .and_then(|m| m.running);
            let slot = slots.entry(path.to_path_buf()).or_default();
            slot.error = None;
            slot.retry = None;
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
    pub(super) fn shown(&self, path: &Path) -> String {
        path.strip_prefix(&self.dir)
            .unwrap_or(path)
            .display()
            .to_string()
    }

    pub(super) fn count(&self, path: &Path, result: &str) {
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
    pub(super) fn retire(&self, old: Running) {
        self.tasks.spawn(stop(old));
    }
}

/// Why a file was not loaded, and whether it is tried again by itself.
pub(super) struct Refusal {
    error: LoadError,
    transient: bool,
}

impl Refusal {
    fn content(error: LoadError) -> Self {
        Self {
            error,
            transient: false,
        }
    }
}

/// Reads and fingerprints a file (and the schema and migrations it names)
/// on a blocking thread: file reads and hashing stay off the threads that
/// run the pipelines.
async fn load_and_fingerprint(
    path: &Path,
) -> Result<(Result<PipelineFile, ConfigError>, u64), tokio::task::JoinError> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let loaded = PipelineFile::load(&path);
        let fingerprint = loaded
            .as_ref()
            .map_or_else(|e| hash_of(&e.to_string()), fingerprint);
        (loaded, fingerprint)
    })
    .await
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
