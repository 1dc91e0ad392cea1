//! Harness additions for the hot-reload tests: the engine's `/pipelines`
//! view, waiting for a reload to take effect, the reload counters, a second
//! pipeline (`clicks`) with its own stream, schema, table and migrations,
//! and a sampler that measures processing gaps.
//!
//! Like the shared harness, nothing here sleeps to synchronise: every wait
//! polls `/pipelines`, `/metrics`, the database or the server against
//! [`DEADLINE`].

// Shared by several test binaries, each using part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer};
use serde::Deserialize;
use serde_json::{json, Value};
use sqlx::PgPool;

use crate::harness::*;

/// The reload counter family of the engine.
pub const RELOADS: &str = "ingestd_reloads_total";

// ---------------------------------------------------------------------------
// GET /pipelines
// ---------------------------------------------------------------------------

/// One entry of `GET /pipelines`: the engine's own type.
pub use ingestd::topology::engine::PipelineState;
pub use ingestd::topology::engine::Status as PipelineStatus;

/// Whether `status` is about the pipelines-dir file `file_name`.
fn is_file(status: &PipelineStatus, file_name: &str) -> bool {
    Path::new(&status.file).file_name().and_then(|n| n.to_str()) == Some(file_name)
}

/// What the tests read about a status beyond its fields.
pub trait StatusExt {
    /// The number of reloads of this file with `result` (`success` or
    /// `failure`) that `metrics` counted.
    fn reloads(&self, metrics: &Metrics, result: &str) -> f64;
}

impl StatusExt for PipelineStatus {
    fn reloads(&self, metrics: &Metrics, result: &str) -> f64 {
        metrics.sum(RELOADS, &[("file", &self.file), ("result", result)])
    }
}

#[derive(Debug, Deserialize)]
struct PipelinesPage {
    pipelines: Vec<PipelineStatus>,
}

/// Every entry of `GET /pipelines`, or why it could not be read.
pub async fn try_statuses(engine: &Engine) -> Result<Vec<PipelineStatus>, String> {
    let reply = engine.try_get("/pipelines").await?;
    expect_eq(reply.status, 200).map_err(|e| format!("/pipelines status {e}"))?;
    let page: PipelinesPage = serde_json::from_str(&reply.body)
        .map_err(|e| format!("/pipelines body ({e}): {}", reply.body))?;
    Ok(page.pipelines)
}

/// The `/pipelines` entry of `file_name`, if it is listed.
pub async fn try_status(
    engine: &Engine,
    file_name: &str,
) -> Result<Option<PipelineStatus>, String> {
    let statuses = try_statuses(engine).await?;
    Ok(statuses.into_iter().find(|s| is_file(s, file_name)))
}

/// The `/pipelines` entry of `file_name`; panics when it is not listed.
pub async fn status(engine: &Engine, file_name: &str) -> PipelineStatus {
    try_status(engine, file_name)
        .await
        .expect("GET /pipelines")
        .unwrap_or_else(|| panic!("{file_name} is not listed by /pipelines"))
}

/// Waits until the entry of `file_name` satisfies `accept` and returns it.
/// `what` describes the awaited state for the timeout message.
pub async fn wait_status(
    engine: &Engine,
    file_name: &str,
    what: &str,
    accept: impl Fn(&PipelineStatus) -> bool,
) -> PipelineStatus {
    wait_for(&format!("{file_name}: {what}"), DEADLINE, || async {
        match try_status(engine, file_name).await? {
            Some(s) if accept(&s) => Ok(s),
            Some(s) => Err(format!("{s:?}")),
            None => Err("not listed".into()),
        }
    })
    .await
}

/// Waits until `file_name` runs a version other than `previous`'s, without
/// error: the sign that a reload took effect.
pub async fn wait_new_version(
    engine: &Engine,
    file_name: &str,
    previous: &PipelineStatus,
) -> PipelineStatus {
    let what = format!("running a version other than {:?}", previous.version);
    wait_status(engine, file_name, &what, |s| {
        s.state == PipelineState::Running && s.version.is_some() && s.version != previous.version
    })
    .await
}

/// Waits until `file_name` is `running` without error (whatever version).
pub async fn wait_running(engine: &Engine, file_name: &str) -> PipelineStatus {
    wait_status(engine, file_name, "running", |s| {
        s.state == PipelineState::Running && s.version.is_some() && s.last_error.is_none()
    })
    .await
}

/// Waits until `/pipelines` no longer lists `file_name`.
pub async fn wait_unlisted(engine: &Engine, file_name: &str) {
    wait_for(&format!("{file_name} to be unlisted"), DEADLINE, || async {
        match try_status(engine, file_name).await? {
            Some(s) => Err(format!("still listed: {s:?}")),
            None => Ok(()),
        }
    })
    .await
}

/// Writes `text` to `path` and waits until the engine runs a new version of
/// the pipeline file `file_name` (which may be `path` itself or a file that
/// references it). Returns the new status.
pub async fn reload_with(
    engine: &Engine,
    file_name: &str,
    path: &Path,
    text: &str,
) -> PipelineStatus {
    let before = status(engine, file_name).await;
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    wait_new_version(engine, file_name, &before).await
}

/// Sends SIGHUP to the engine: "reload every pipeline file".
pub fn send_sighup(engine: &Engine) {
    signal(engine.pid(), "HUP");
}

// ---------------------------------------------------------------------------
// Events and pipeline variants
// ---------------------------------------------------------------------------

/// The README's example event under another eventId, with the given funnel
/// stage and event type (published on the subject the producers would use).
pub fn tiktok_event(event_id: &str, funnel_stage: &str, event_type: &str) -> Value {
    let mut event = example_event("top-video-view.json");
    event["eventId"] = json!(event_id);
    event["funnelStage"] = json!(funnel_stage);
    event["eventType"] = json!(event_type);
    event
}

/// A `top`/`video.view` event; the default kind of the tests.
pub fn view_event(event_id: &str) -> Value {
    tiktok_event(event_id, "top", "video.view")
}

/// Publishes a `view_event` and waits for its row: the pipeline stores.
pub async fn assert_stores(env: &TestEnv, event_id: &str) {
    env.publish_event(&view_event(event_id)).await;
    env.wait_row(event_id).await;
}

/// `yaml` with one harmless trailing comment: a distinct valid version of
/// the same pipeline (the engine identifies versions by content).
pub fn revision(yaml: &str, label: &str) -> String {
    format!("{yaml}\n# revision: {label}\n")
}

/// The shipped batch settings, which [`other_batching`] rewrites.
const BATCH_LINES: &str = "      max_rows: 1000\n      # At 2,000 events/s, publish → commit p99 was 6.4–7.2 ms with 3ms\n      # and 7.8–11.9 ms with 5ms, for a few % more CPU at that rate.\n      max_wait: 3ms\n";

/// `yaml` with smaller, slower batches: a second valid version that also
/// changes the consumer (its default `max_ack_pending` follows `max_rows`).
pub fn other_batching(yaml: &str) -> String {
    let replacement = [(
        BATCH_LINES.to_owned(),
        "      max_rows: 500\n      max_wait: 20ms\n".to_owned(),
    )];
    adapt_pipeline(yaml, &replacement)
}

/// `text` with `from` replaced by `to` (which must occur: see
/// [`adapt_pipeline`]).
pub fn edit(text: &str, from: &str, to: &str) -> String {
    adapt_pipeline(text, &[(from.to_owned(), to.to_owned())])
}

// ---------------------------------------------------------------------------
// A second pipeline: clicks
// ---------------------------------------------------------------------------

/// The `clicks` table, as its migration creates it.
pub const CLICKS_TABLE_SQL: &str = "CREATE TABLE clicks (\n    \
     click_id TEXT PRIMARY KEY,\n    \
     url TEXT NOT NULL,\n    \
     created_at TIMESTAMPTZ NOT NULL DEFAULT now()\n);\n";

/// A second pipeline, unrelated to tiktok: its own stream, subjects,
/// durable, JSON schema (in the test's dir) and table with a migration whose
/// version differs from the shipped one. The stream is deleted on drop
/// (`TestEnv` only knows its own).
pub struct Clicks {
    pub stream: String,
    pub durable: String,
    /// `<id>.clicks.`, outside the tiktok stream's `<id>.raw.events.>`.
    pub subject_prefix: String,
    pub schema: PathBuf,
    pub migrations: PathBuf,
    js: jetstream::Context,
    db: PgPool,
}

impl Clicks {
    pub const FILE: &'static str = "clicks.yaml";

    /// Writes the schema and migration into the test's dir (not the
    /// pipeline file: see [`Self::yaml`]).
    pub fn new(env: &TestEnv) -> Self {
        let home = env.dir.join("clicks");
        let migrations = home.join("migrations");
        std::fs::create_dir_all(&migrations).expect("create the clicks dirs");
        let schema = home.join("click.schema.json");
        let schema_json = json!({
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "type": "object",
            "required": ["clickId", "url"],
            "properties": {
                "clickId": { "type": "string" },
                "url": { "type": "string" }
            }
        });
        write_json(&schema, &schema_json);
        let migration = migrations.join("20260101000000_clicks.sql");
        std::fs::write(&migration, CLICKS_TABLE_SQL).expect("write the clicks migration");
        Self {
            stream: format!("CLICKS_{}", env.id),
            durable: format!("clicks-{}", env.id),
            subject_prefix: format!("{}.clicks.", env.id),
            schema,
            migrations,
            js: env.js.clone(),
            db: env.db.clone(),
        }
    }

    /// The pipeline file; without `migrations` its table must exist already.
    pub fn yaml(&self, with_migrations: bool) -> String {
        let migrations = if with_migrations {
            format!("    migrations: {}\n", self.migrations.display())
        } else {
            String::new()
        };
        format!(
            r#"name: clicks
{source}validate:
  schema: {schema}
sink:
  postgres:
{migrations}    insert: |
      INSERT INTO clicks (click_id, url) VALUES ({{{{ event.clickId }}}}, {{{{ event.url }}}})
      ON CONFLICT (click_id) DO NOTHING
    batch:
      max_rows: 100
metrics:
  prefix: clicks
"#,
            source = nats_source(
                &self.stream,
                &self.subject_prefix,
                &self.durable,
                ">",
                "30s"
            ),
            schema = self.schema.display(),
        )
    }

    /// Publishes a click, confirmed by JetStream.
    pub async fn publish(&self, click_id: &str) {
        let subject = format!("{}web", self.subject_prefix);
        let body = json!({ "clickId": click_id, "url": format!("https://example.com/{click_id}") });
        publish_confirmed(&self.js, &subject, body.to_string().into_bytes()).await;
    }

    /// The click ids stored, sorted.
    pub async fn try_stored(&self) -> Result<Vec<String>, String> {
        sqlx::query_scalar("SELECT click_id FROM clicks ORDER BY click_id")
            .fetch_all(&self.db)
            .await
            .map_err(state("select clicks"))
    }

    /// Waits until exactly `ids` are stored.
    pub async fn wait_stored(&self, ids: &[&str]) {
        let mut want: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
        want.sort();
        wait_for(&format!("clicks {want:?} stored"), DEADLINE, || async {
            expect_eq(self.try_stored().await?, want.clone())
        })
        .await
    }

    pub async fn try_consumer_info(&self) -> Result<consumer::Info, String> {
        consumer_info(&self.js, &self.stream, &self.durable).await
    }

    /// Waits until the clicks consumer's info satisfies `accept`.
    pub async fn wait_consumer(
        &self,
        what: &str,
        accept: impl Fn(&consumer::Info) -> bool,
    ) -> consumer::Info {
        wait_for(&format!("clicks consumer: {what}"), DEADLINE, || async {
            let info = self.try_consumer_info().await?;
            if accept(&info) {
                Ok(info)
            } else {
                Err(format!(
                    "num_pending {}, num_ack_pending {}, num_waiting {}, delivered {:?}",
                    info.num_pending, info.num_ack_pending, info.num_waiting, info.delivered
                ))
            }
        })
        .await
    }
}

impl Drop for Clicks {
    /// Best-effort removal of the stream, on a thread of its own for the
    /// same reason as `TestEnv`'s drop.
    fn drop(&mut self) {
        on_own_runtime(delete_stream(nats_url().to_owned(), self.stream.clone()));
    }
}

/// Writes `value` as pretty JSON.
pub fn write_json(path: &Path, value: &Value) {
    let text = serde_json::to_string_pretty(value).expect("serialize JSON");
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

// ---------------------------------------------------------------------------
// Processing gaps
// ---------------------------------------------------------------------------

/// What the gap sampler saw at one moment: how many events JetStream had
/// confirmed to the publisher and how many rows were stored.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    pub at: Instant,
    pub published: u64,
    pub stored: u64,
}

/// The longest time the stored count stood still while events were pending
/// (`published > stored`), with the sample where that began.
///
/// Measured between samples that *saw* the same count, so a sampler that
/// was itself delayed can only under-estimate a stall, never invent one.
pub fn longest_stall(samples: &[Progress]) -> Option<(Duration, Progress)> {
    samples
        .chunk_by(|a, b| a.stored == b.stored)
        .filter_map(|run| {
            let pending = run.iter().find(|s| s.published > s.stored)?;
            let last = run.last()?;
            Some((last.at - pending.at, *pending))
        })
        .max_by_key(|(stall, _)| *stall)
}

/// Polls `/pipelines` in the background and records every answer in which
/// no file runs the pipeline: a gap in processing.
pub struct GapWatch {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<(u32, Vec<String>)>,
}

impl GapWatch {
    pub fn start(engine: &Engine) -> Self {
        let port = engine.port;
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            let http = reqwest::Client::new();
            let url = format!("http://127.0.0.1:{port}/pipelines");
            let (mut polls, mut gaps) = (0, Vec::new());
            loop {
                if let Ok(reply) = http.get(&url).send().await {
                    let body = reply.text().await.unwrap_or_default();
                    polls += 1;
                    if !body.contains("\"state\":\"running\"") {
                        gaps.push(body);
                    }
                }
                tokio::select! {
                    _ = stopped.changed() => return (polls, gaps),
                    _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                }
            }
        });
        Self { stop, task }
    }

    /// Stops; panics if any answer showed a gap.
    pub async fn assert_no_gap(self) {
        let _ = self.stop.send(true);
        let (polls, gaps) = self.task.await.expect("gap watch");
        assert!(polls > 3, "only {polls} polls");
        assert!(
            gaps.is_empty(),
            "{} of {polls} answers without a running pipeline: {:?}",
            gaps.len(),
            gaps.first()
        );
    }
}
