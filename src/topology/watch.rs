//! Watches pipeline files and what they reference, and reloads on change
//! (debounced) and on SIGHUP.
//!
//! Directories are watched rather than files: editors save by
//! truncate-and-write, by writing a temporary file and renaming it over the
//! original, or in several writes, and a watch on the file itself loses
//! track after a rename. Events are debounced until the directory has been
//! quiet for [`QUIET`], so one logical save is one reload, but for no longer
//! than [`MAX_DELAY`]: a directory that never settles still reloads.
//! Editors' swap and backup files and hidden files are not pipeline files
//! and their changes are ignored; Kubernetes' `..data` links (a ConfigMap
//! update swaps them) are not.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::topology::engine::Engine;

/// How long the watched directories must be quiet before a reload.
const QUIET: Duration = Duration::from_millis(300);

/// The longest a reload waits for quiet after the first change.
const MAX_DELAY: Duration = Duration::from_secs(2);

/// Runs until the engine's shutdown; a reload under way then ends at its
/// next build (see [`Engine::reconcile`]).
pub async fn watch(engine: Arc<Engine>) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let watcher =
        notify::recommended_watcher(move |res: notify::Result<notify::Event>| match res {
            Ok(e) if !matches!(e.kind, EventKind::Access(_)) => {
                let paths: Vec<PathBuf> = e.paths.into_iter().filter(|p| !ignored(p)).collect();
                if !paths.is_empty() {
                    let _ = tx.send(paths);
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "file watch error"),
        });
    let mut watcher = match watcher {
        Ok(w) => w,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch pipeline files; reload with SIGHUP only");
            return sighup_only(engine).await;
        }
    };
    let mut watches = Watches::default();
    watches.update(&mut watcher, engine.watched_dirs());
    let mut hup = hangup();
    loop {
        tokio::select! {
            _ = engine.shutdown.cancelled() => return,
            Some(paths) = rx.recv() => {
                if !watches.concern(&paths) {
                    continue;
                }
                debounce(&mut rx).await;
            }
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading every pipeline file");
                engine.forget_attempts();
            }
            _ = retry_due(&engine) => engine.forget_due_retries(),
        }
        reload(&engine).await;
        while watches.update(&mut watcher, engine.watched_dirs()) {
            reload(&engine).await;
        }
    }
}

/// What is watched for the directories the engine wants watched: each
/// itself while it exists, its nearest existing ancestor while it does not.
#[derive(Default)]
struct Watches {
    wanted: Vec<PathBuf>,
    /// Each watched path and the identity of the directory watched there
    /// (a directory created again at the same path is another one, whose
    /// changes the old watch does not see).
    watched: BTreeMap<PathBuf, Identity>,
}

impl Watches {
    /// Watches what `wanted` needs now. True when a wanted directory that
    /// was gone (or replaced) is watched again: what it received before
    /// its watch was set was seen by nobody, so the caller reloads.
    fn update(&mut self, watcher: &mut impl Watcher, wanted: Vec<PathBuf>) -> bool {
        let wanted: Vec<PathBuf> = wanted.iter().map(|d| normal(d)).collect();
        let targets: BTreeMap<PathBuf, Identity> =
            wanted.iter().filter_map(|dir| watch_target(dir)).collect();
        for (path, id) in &self.watched {
            if targets.get(path) != Some(id) {
                let _ = watcher.unwatch(path);
            }
        }
        let mut back = false;
        let mut watched = BTreeMap::new();
        for (path, id) in targets {
            let already = self.watched.get(&path) == Some(&id);
            if !already {
                if let Err(e) = watcher.watch(&path, RecursiveMode::NonRecursive) {
                    tracing::warn!(dir = %path.display(), error = %e, "cannot watch directory");
                    continue;
                }
                back |= self.wanted.contains(&path);
            }
            watched.insert(path, id);
        }
        self.watched = watched;
        self.wanted = wanted;
        back
    }

    /// Whether a change at `paths` may change a pipeline: it is inside a
    /// wanted directory, or it is a wanted directory (or an ancestor of
    /// one) coming or going. Changes elsewhere in an ancestor watched for a
    /// missing directory are not.
    fn concern(&self, paths: &[PathBuf]) -> bool {
        paths.iter().any(|p| {
            self.wanted
                .iter()
                .any(|w| p.starts_with(w) || w.starts_with(p))
        })
    }
}

/// A directory's identity on its file system.
type Identity = (u64, u64);

fn identity(meta: &std::fs::Metadata) -> Identity {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        (meta.dev(), meta.ino())
    }
    #[cfg(not(unix))]
    {
        let _ = meta;
        (0, 0)
    }
}

/// `dir` with its nearest existing ancestor canonical: the same path
/// whether the directory exists or not (and whatever `..` or links lead to
/// it), so that its return is recognised.
fn normal(dir: &Path) -> PathBuf {
    let mut rest = Vec::new();
    for p in dir.ancestors() {
        if let Ok(canonical) = p.canonicalize() {
            return rest
                .iter()
                .rev()
                .fold(canonical, |path, name| path.join(name));
        }
        rest.extend(p.file_name());
    }
    dir.to_path_buf()
}

/// The directory to watch for `dir`: itself, or its nearest existing
/// ancestor while it does not exist.
fn watch_target(dir: &Path) -> Option<(PathBuf, Identity)> {
    dir.ancestors().find_map(|p| {
        let meta = std::fs::metadata(p).ok().filter(|m| m.is_dir())?;
        Some((p.to_path_buf(), identity(&meta)))
    })
}

async fn sighup_only(engine: Arc<Engine>) {
    let mut hup = hangup();
    loop {
        tokio::select! {
            _ = engine.shutdown.cancelled() => return,
            _ = hup.recv() => engine.forget_attempts(),
            _ = retry_due(&engine) => engine.forget_due_retries(),
        }
        reload(&engine).await;
    }
}

/// Until the next load that failed for a transient reason is due (forever
/// when there is none).
async fn retry_due(engine: &Engine) {
    match engine.next_retry() {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn reload(engine: &Engine) {
    let errors = engine.reconcile().await;
    if !errors.is_empty() {
        tracing::warn!(
            failed = errors.len(),
            "reload kept the running versions of files that failed to load"
        );
    }
}

/// Waits until no event has arrived for [`QUIET`], or [`MAX_DELAY`] has
/// passed.
async fn debounce(rx: &mut mpsc::UnboundedReceiver<Vec<PathBuf>>) {
    let latest = tokio::time::Instant::now() + MAX_DELAY;
    loop {
        let quiet = (tokio::time::Instant::now() + QUIET).min(latest);
        match tokio::time::timeout_at(quiet, rx.recv()).await {
            Ok(Some(_)) if quiet < latest => {}
            _ => return,
        }
    }
}

/// Files whose changes never change a pipeline: hidden files and editors'
/// swap, backup and lock files (`.x.swp`, `x~`, `#x#`, `.#x`). Kubernetes'
/// `..data` links are not hidden files in this sense.
fn ignored(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    (name.starts_with('.') && !name.starts_with(".."))
        || name.ends_with('~')
        || (name.starts_with('#') && name.ends_with('#'))
        || name.ends_with(".swp")
        || name.ends_with(".swx")
}

/// A stream of SIGHUPs (never fires where there are none).
fn hangup() -> Hangup {
    #[cfg(unix)]
    {
        Hangup(tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok())
    }
    #[cfg(not(unix))]
    Hangup(None)
}

struct Hangup(
    #[cfg(unix)] Option<tokio::signal::unix::Signal>,
    #[cfg(not(unix))] Option<()>,
);

impl Hangup {
    async fn recv(&mut self) {
        #[cfg(unix)]
        if let Some(s) = &mut self.0 {
            s.recv().await;
            return;
        }
        std::future::pending::<()>().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A missing directory has the path it will have once created, however
    /// it was written, and its coming back concerns the watch while its
    /// siblings' changes do not.
    #[test]
    fn a_missing_directory_is_recognised_when_it_comes_back() {
        let root = std::env::temp_dir().join(format!("ingestd-watch-unit-{}", std::process::id()));
        std::fs::create_dir_all(&root).unwrap();
        let root = root.canonicalize().unwrap();
        let written = root.join("pipelines/../migrations");
        std::fs::create_dir_all(root.join("pipelines")).unwrap();
        assert_eq!(normal(&written), root.join("migrations"));
        assert_eq!(watch_target(&normal(&written)).unwrap().0, root);
        let watches = Watches {
            wanted: vec![normal(&written)],
            watched: BTreeMap::new(),
        };
        assert!(watches.concern(&[root.join("migrations")]));
        assert!(watches.concern(&[root.join("migrations/1_a.sql")]));
        assert!(!watches.concern(&[root.join("Cargo.lock")]));
        std::fs::create_dir(root.join("migrations")).unwrap();
        assert_eq!(normal(&written), root.join("migrations"));
        assert_eq!(watch_target(&written).unwrap().0, written);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn editor_files_are_ignored_configmap_links_not() {
        for name in [
            ".x.yaml.swp",
            "x.yaml~",
            "#x.yaml#",
            ".#x.yaml",
            ".hidden.yaml",
        ] {
            assert!(ignored(Path::new(name)), "{name}");
        }
        for name in ["x.yaml", "..data", "..data_tmp", "..2026_11_25_01"] {
            assert!(!ignored(Path::new(name)), "{name}");
        }
    }
}
