//! The HTTP endpoints: `/metrics`, `/health`, `/live`, `/ready`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use prometheus::Encoder;
use serde_json::json;

use crate::topology::engine::Engine;
use crate::util::rfc3339::{self, Fraction};

/// Serves until the engine's shutdown.
pub async fn serve(addr: SocketAddr, engine: Arc<Engine>) -> anyhow::Result<()> {
    let stop = engine.shutdown.clone();
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/health", get(health))
        .route("/live", get(live))
        .route("/ready", get(ready))
        .route("/pipelines", get(pipelines))
        .with_state(engine);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
    tracing::info!(addr = %listener.local_addr()?, "HTTP listening");
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await?;
    Ok(())
}

async fn metrics(State(engine): State<Arc<Engine>>) -> Response {
    let mut body = Vec::new();
    let families = engine.metrics.gather();
    match prometheus::TextEncoder::new().encode(&families, &mut body) {
        Ok(()) => ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], body).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// Each pipeline file: state, version, load time, last load error, counts;
/// and readiness with its reason, as `/ready` sees it.
async fn pipelines(State(engine): State<Arc<Engine>>) -> Json<serde_json::Value> {
    let ready = engine.readiness().await;
    Json(json!({
        "pipelines_dir": engine.dir.display().to_string(),
        "ready": {"ok": ready.ok(), "reason": ready.reason},
        "pipelines": engine.statuses(),
    }))
}

async fn health() -> Json<serde_json::Value> {
    let now = rfc3339::now_utc(Fraction::Millis);
    Json(json!({"status": "ok", "timestamp": now}))
}

async fn live() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// 200 when every pipeline's database answers and takes its writes and
/// NATS is connected and serves every pipeline's pulls; 503 (degraded)
/// otherwise. A pipeline whose statement the database refuses counts as the
/// database being down for it, a pipeline whose consumer is gone as NATS
/// being down: the shape stays the collector's, `/pipelines` has the detail.
async fn ready(State(engine): State<Arc<Engine>>) -> Response {
    let ready = engine.readiness().await;
    let word = |up: bool| if up { "up" } else { "down" };
    let ok = ready.ok();
    // The collector's shape: the reason is logged and in `/pipelines`.
    let body = json!({
        "status": if ok { "ok" } else { "degraded" },
        "checks": {"database": word(ready.database), "nats": word(ready.nats)},
    });
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
}
