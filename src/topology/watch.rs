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

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::{mpsc, watch};

use crate::topology::engine::Engine;

/// How long the watched directories must be quiet before a reload.
const QUIET: Duration = Duration::from_millis(300);

/// The longest a reload waits for quiet after the first change.
const MAX_DELAY: Duration = Duration::from_secs(2);

/// Runs until `stop` turns true.
pub async fn watch(engine: Arc<Engine>, mut stop: watch::Receiver<bool>) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let watcher =
        notify::recommended_watcher(move |res: notify::Result<notify::Event>| match res {
            Ok(e)
                if !matches!(e.kind, EventKind::Access(_))
                    && !e.paths.iter().all(|p| ignored(p)) =>
            {
                let _ = tx.send(());
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "file watch error"),
        });
    let mut watcher = match watcher {
        Ok(w) => w,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch pipeline files; reload with SIGHUP only");
            return sighup_only(engine, stop).await;
        }
    };
    let mut watched = BTreeSet::new();
    update_watches(&mut watcher, &mut watched, engine.watched_dirs());
    let mut hup = hangup();
    loop {
        tokio::select! {
            _ = stopped(&mut stop) => return,
            Some(()) = rx.recv() => debounce(&mut rx).await,
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading every pipeline file");
                engine.forget_attempts();
            }
        }
        reload(&engine).await;
        update_watches(&mut watcher, &mut watched, engine.watched_dirs());
    }
}

async fn sighup_only(engine: Arc<Engine>, mut stop: watch::Receiver<bool>) {
    let mut hup = hangup();
    loop {
        tokio::select! {
            _ = stopped(&mut stop) => return,
            _ = hup.recv() => {
                engine.forget_attempts();
                reload(&engine).await;
            }
        }
    }
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
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
async fn debounce(rx: &mut mpsc::UnboundedReceiver<()>) {
    let latest = tokio::time::Instant::now() + MAX_DELAY;
    loop {
        let quiet = (tokio::time::Instant::now() + QUIET).min(latest);
        match tokio::time::timeout_at(quiet, rx.recv()).await {
            Ok(Some(())) if quiet < latest => {}
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

fn update_watches(watcher: &mut impl Watcher, watched: &mut BTreeSet<PathBuf>, dirs: Vec<PathBuf>) {
    for dir in dirs {
        if watched.contains(&dir) {
            continue;
        }
        match watcher.watch(&dir, RecursiveMode::NonRecursive) {
            Ok(()) => {
                watched.insert(dir);
            }
            Err(e) => tracing::warn!(dir = %dir.display(), error = %e, "cannot watch directory"),
        }
    }
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
    use super::ignored;
    use std::path::Path;

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
