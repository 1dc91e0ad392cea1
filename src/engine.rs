//! Runs the set of pipelines found in the pipelines directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, RwLock};

use crate::config::PipelineFile;
use crate::metrics::Metrics;
use crate::pipeline::{Deps, Pipeline};
use crate::source;

/// What the engine needs from the command line and environment.
#[derive(Debug, Clone)]
pub struct Settings {
    pub pipelines_dir: PathBuf,
    pub database_url: String,
    pub nats_url: String,
    pub nats_name: String,
    pub listen: SocketAddr,
    /// How long shutdown waits for in-flight batches.
    pub shutdown_grace: Duration,
}

/// The running engine, shared with the HTTP handlers.
pub struct Engine {
    pub metrics: Arc<Metrics>,
    nats: async_nats::Client,
    pipelines: RwLock<Vec<Arc<Pipeline>>>,
}

impl Engine {
    pub fn nats_up(&self) -> bool {
        self.nats.connection_state() == async_nats::connection::State::Connected
    }

    /// True when every pipeline's database answers and no pipeline is
    /// failing its writes.
    pub async fn database_up(&self) -> bool {
        let pipelines = self.pipelines.read().await.clone();
        for p in pipelines {
            if !p.sink_up() || !p.sink.ping().await {
                return false;
            }
        }
        true
    }
}

/// The pipeline files of a directory (`*.yaml`, `*.yml`), sorted by name.
pub fn pipeline_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| anyhow::anyhow!("cannot read pipelines directory {}: {e}", dir.display()))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .collect();
    files.sort();
    Ok(files)
}

/// Starts every pipeline, serves HTTP, and stops cleanly on SIGINT or
/// SIGTERM. Any pipeline that cannot start fails the whole start-up.
pub async fn run(settings: Settings) -> anyhow::Result<()> {
    let files = pipeline_files(&settings.pipelines_dir)?;
    anyhow::ensure!(
        !files.is_empty(),
        "no pipeline files (*.yaml) in {}",
        settings.pipelines_dir.display()
    );
    let parsed = files
        .iter()
        .map(|f| PipelineFile::load(f))
        .collect::<Result<Vec<_>, _>>()?;
    let metrics = Arc::new(Metrics::new()?);
    let nats = source::connect(&settings.nats_url, &settings.nats_name, metrics.clone()).await?;
    let deps = Deps {
        js: async_nats::jetstream::new(nats.clone()),
        metrics: metrics.clone(),
        database_url: settings.database_url.clone(),
    };
    let mut pipelines = Vec::new();
    for file in parsed {
        pipelines.push(Arc::new(Pipeline::build(file, &deps).await?));
    }
    metrics.set_nats_connected(true);
    let engine = Arc::new(Engine {
        metrics,
        nats,
        pipelines: RwLock::new(pipelines.clone()),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let http = tokio::spawn(crate::http::serve(
        settings.listen,
        engine.clone(),
        stop_rx.clone(),
    ));
    let runs: Vec<_> = pipelines
        .into_iter()
        .map(|p| tokio::spawn(p.run(stop_rx.clone())))
        .collect();
    tokio::select! {
        _ = shutdown_signal() => tracing::info!("shutting down: finishing in-flight batches"),
        res = http => return res?,
    }
    let _ = stop_tx.send(true);
    let all = futures::future::join_all(runs);
    if tokio::time::timeout(settings.shutdown_grace, all)
        .await
        .is_err()
    {
        tracing::warn!("in-flight batches did not finish in time; they will be redelivered");
    }
    Ok(())
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
