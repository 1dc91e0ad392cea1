//! The collector's contract, checked point by point: the shipped
//! `pipelines/tiktok.yaml`, run by `ingestd` against real NATS and
//! PostgreSQL, must behave as the TTK collector, plus the improvements the
//! README lists under "Differences from the collector". Every test owns its
//! database, stream and consumer (see `crate::harness::TestEnv`), so they
//! all run in parallel.

use std::time::Duration;

use crate::harness::*;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy};
use async_nats::jetstream::stream::{self, DiscardPolicy, RetentionPolicy, StorageType};
use serde_json::{json, Value};

const DURATION: &str = "collector_event_processing_duration_seconds";
const NATS_STATUS: &str = "collector_nats_connection_status";
const VALIDATION_ERROR: &[(&str, &str)] = &[("source", "tiktok"), ("reason", "validation_error")];
const PROCESSING_ERROR: &[(&str, &str)] = &[("source", "tiktok"), ("reason", "processing_error")];

/// The subject the README example is published on.
const TOP_VIEW: &str = "tiktok.top.video.view";

/// The README's example event under another eventId.
fn top_event(event_id: &str) -> Value {
    let mut event = example_event("top-video-view.json");
    event["eventId"] = json!(event_id);
    event
}

fn to_bytes(event: &Value) -> Vec<u8> {
    serde_json::to_vec(event).expect("serialize event")
}

/// A cuid v1: 25 characters, `c` first, lowercase base 36.
fn assert_cuid(id: &str) {
    assert_eq!(id.len(), 25, "id {id:?} is not 25 characters long");
    assert!(id.starts_with('c'), "id {id:?} does not start with 'c'");
    assert!(
        id.chars()
            .all(|c| c.is_ascii_digit() || c.is_ascii_lowercase()),
        "id {id:?} is not lowercase base 36"
    );
}

/// 1. The README example lands with every column as the collector wrote it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_example_is_stored_column_by_column_and_acked() {
    let env = TestEnv::new().await;
    let _engine = env.engine().start().await;
    let event = example_event("top-video-view.json");
    env.publish(TOP_VIEW, to_bytes(&event)).await;

    let row = env.wait_row("test-123").await;
    assert_cuid(&row.id);
    assert_eq!(row.timestamp, "2025-01-15 10:00:00.000");
    assert_eq!(row.funnel_stage, "top");
    assert_eq!(row.event_type, "video.view");
    assert_eq!(row.data, event["data"]);
    assert!(
        row.created_age_secs.abs() < 60.0,
        "createdAt {} (UTC) is not close to now",
        row.created_at
    );

    let info = env.wait_all_acked().await;
    assert_no_redelivery(&info);
    assert_eq!(env.rows().await.len(), 1);
}

/// 2. A bottom-funnel event with nulls, converted to UTC; undeclared keys
/// removed at every level, whichever engagement alternative matched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bottom_event_in_utc_and_unknown_keys_stripped() {
    let env = TestEnv::new().await;
    let _engine = env.engine().start().await;

    let bottom = example_event("bottom-purchase.json");
    env.publish_event(&bottom).await;
    let row = env.wait_row("test-456").await;
    assert_eq!(row.timestamp, "2025-01-15 10:30:00.250");
    assert_eq!(
        (row.funnel_stage.as_str(), row.event_type.as_str()),
        ("bottom", "purchase")
    );
    assert_eq!(row.data, bottom["data"], "nulls must be kept as null");

    let mut top_extra = top_event("extra-top");
    top_extra["correlationId"] = json!("corr-1");
    top_extra["data"]["extraData"] = json!({"nested": true});
    top_extra["data"]["user"]["extraUser"] = json!("x");
    top_extra["data"]["engagement"]["extraEngagement"] = json!(1);
    let mut bottom_extra = bottom.clone();
    bottom_extra["eventId"] = json!("extra-bottom");
    bottom_extra["data"]["engagement"]["watchTimeLike"] = json!(3);

    env.publish_event(&top_extra).await;
    env.publish_event(&bottom_extra).await;
    let top_row = env.wait_row("extra-top").await;
    assert_eq!(top_row.data, example_event("top-video-view.json")["data"]);
    let bottom_row = env.wait_row("extra-bottom").await;
    assert_eq!(bottom_row.data, bottom["data"]);
}

/// 3. Events that can never be valid are acked once, counted, not stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_events_are_acked_and_counted_not_stored() {
    let env = TestEnv::new().await;
    let engine = env.engine().start().await;

    let mut missing_field = top_event("missing-timestamp");
    missing_field.as_object_mut().unwrap().remove("timestamp");
    let invalid = [
        repo_file("examples/events/invalid-not-json.txt").into_bytes(),
        to_bytes(&missing_field),
        to_bytes(&example_event("invalid-bad-enum.json")),
        to_bytes(&example_event("invalid-bad-timestamp.json")),
    ];
    for payload in invalid {
        env.publish(TOP_VIEW, payload).await;
    }
    env.publish(TOP_VIEW, to_bytes(&top_event("valid-after")))
        .await;

    env.wait_row("valid-after").await;
    let metrics = engine.wait_metric(FAILED, VALIDATION_ERROR, 4.0).await;
    let info = env.wait_all_acked().await;
    assert_no_redelivery(&info);
    assert_eq!(metrics.sum(RECEIVED, &[]), 5.0, "one delivery each");
    assert_eq!(metrics.sum(PROCESSED, &[]), 1.0);
    assert_eq!(metrics.sum(FAILED, PROCESSING_ERROR), 0.0);
    let stored: Vec<_> = env.rows().await.into_iter().map(|r| r.event_id).collect();
    assert_eq!(stored, ["valid-after"]);
}

/// 4. Idempotent: a duplicate eventId is one row, both deliveries acked
/// and counted as processed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_event_id_is_one_row_both_acked() {
    let env = TestEnv::new().await;
    let engine = env.engine().start().await;
    let event = top_event("dup-1");
    env.publish_event(&event).await;
    env.publish_event(&event).await;

    let metrics = engine.wait_metric(PROCESSED, &[], 2.0).await;
    assert_eq!(metrics.sum(FAILED, &[]), 0.0);
    let info = env.wait_all_acked().await;
    assert_no_redelivery(&info);
    assert_eq!(env.rows().await.len(), 1);
}

/// 5. Values are bound, never spliced into SQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_injection_is_stored_verbatim() {
    const INJECTION: &str = r#"'); DROP TABLE "TiktokEvent"; --"#;
    let env = TestEnv::new().await;
    let _engine = env.engine().start().await;
    let mut event = top_event(INJECTION);
    event["data"]["user"]["username"] = json!(INJECTION);
    env.publish_event(&event).await;

    let row = env.wait_row(INJECTION).await;
    assert_eq!(row.data["user"]["username"], INJECTION);
    env.publish_event(&top_event("after-injection")).await;
    env.wait_row("after-injection").await;
    assert_eq!(env.rows().await.len(), 2, "the table is still there, whole");
}

/// 6. A database outage is a processing error: the message stays
/// unacknowledged until its row is committed after the database is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_outage_holds_the_ack_until_the_row_is_stored() {
    let env = TestEnv::new().await;
    let (mut proxy, engine) = env.engine_behind_proxy().await;

    proxy.stop().await;
    env.publish_event(&top_event("during-outage")).await;
    engine.wait_metric_at_least(RECEIVED, &[], 1.0).await;
    assert_eq!(
        env.consumer_info().await.num_ack_pending,
        1,
        "received, not acked"
    );
    engine
        .wait_metric_at_least(FAILED, PROCESSING_ERROR, 1.0)
        .await;
    let info = env.consumer_info().await;
    assert_eq!(
        info.num_ack_pending, 1,
        "must not be acked while the db is down"
    );
    assert!(env.rows().await.is_empty());

    proxy.start().await;
    env.wait_row("during-outage").await;
    env.wait_all_acked().await;
    assert_eq!(env.rows().await.len(), 1);
    // Each failed attempt is a processing error and each retry a new
    // attempt, as with the collector's redeliveries: the books balance.
    let m = engine.wait_metric(PROCESSED, &[], 1.0).await;
    assert_eq!(
        m.sum(RECEIVED, &[]),
        m.sum(PROCESSED, &[]) + m.sum(FAILED, &[])
    );
}

/// The label names a family's series must carry besides its own.
const DEFAULT_LABELS: [&str; 2] = ["app", "environment"];

/// Every series named `sample` exists and has exactly `labels` plus the
/// default labels.
fn assert_label_names(metrics: &Metrics, sample: &str, labels: &[&str]) {
    let mut want: Vec<&str> = labels.iter().chain(&DEFAULT_LABELS).copied().collect();
    want.sort_unstable();
    let series: Vec<_> = metrics.series(sample, &[]).collect();
    assert!(!series.is_empty(), "no {sample} series");
    for s in series {
        assert_eq!(s.label_names(), want, "label names of {s:?}");
    }
}

/// A family is declared with `kind` and its series carry exactly `labels`.
fn assert_family(metrics: &Metrics, family: &str, kind: &str, labels: &[&str]) {
    assert_eq!(metrics.type_of(family), Some(kind), "# TYPE of {family}");
    assert_label_names(metrics, family, labels);
}

/// The duration histogram of `labels`: the contract's buckets, one
/// observation.
fn assert_one_observation(metrics: &Metrics, labels: &[(&str, &str)]) {
    let bucket = format!("{DURATION}_bucket");
    let mut bounds: Vec<f64> = metrics
        .series(&bucket, labels)
        .map(|s| parse_value(&s.labels["le"]).expect("le is a number"))
        .collect();
    bounds.sort_by(f64::total_cmp);
    let want = [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, f64::INFINITY];
    assert_eq!(bounds, want, "buckets of {DURATION}{labels:?}");
    let mut all = labels.to_vec();
    all.push(("le", "+Inf"));
    assert_eq!(metrics.one(&bucket, &all).value, 1.0);
    assert_eq!(metrics.one(&format!("{DURATION}_count"), labels).value, 1.0);
    assert!(metrics.one(&format!("{DURATION}_sum"), labels).value >= 0.0);
}

/// 7. /metrics: the collector's names, types, labels and values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_have_the_collectors_names_and_labels() {
    let env = TestEnv::new().await;
    let engine = env.engine().var("NODE_ENV", "staging").start().await;
    env.publish(TOP_VIEW, to_bytes(&top_event("metric-ok")))
        .await;
    let invalid_subject = "tiktok.middle.video.view";
    let bad = to_bytes(&example_event("invalid-bad-enum.json"));
    env.publish(invalid_subject, bad).await;
    engine.wait_metric(PROCESSED, &[], 1.0).await;
    let m = engine.wait_metric(FAILED, &[], 1.0).await;

    // Every series of the collector's families, process metrics included.
    // The engine's own families (`ingestd_*`, not part of the collector) are
    // outside the contract and may carry other labels.
    for s in m
        .samples
        .iter()
        .filter(|s| s.name.starts_with("collector_"))
    {
        let defaults = [("app", "ttk-collector"), ("environment", "staging")];
        assert!(s.has_labels(&defaults), "{s:?} lacks the default labels");
    }

    assert_family(&m, RECEIVED, "counter", &["subject"]);
    for suffix in [TOP_VIEW, invalid_subject] {
        let subject = env.subject(suffix);
        assert_eq!(m.one(RECEIVED, &[("subject", &subject)]).value, 1.0);
    }

    assert_family(
        &m,
        PROCESSED,
        "counter",
        &["source", "event_type", "funnel_stage"],
    );
    let processed = [
        ("source", "tiktok"),
        ("event_type", "video.view"),
        ("funnel_stage", "top"),
    ];
    assert_eq!(m.one(PROCESSED, &processed).value, 1.0);

    assert_family(&m, FAILED, "counter", &["source", "reason"]);
    assert_eq!(m.one(FAILED, VALIDATION_ERROR).value, 1.0);

    assert_eq!(m.type_of(DURATION), Some("histogram"));
    assert_label_names(
        &m,
        &format!("{DURATION}_bucket"),
        &["source", "event_type", "le"],
    );
    for part in ["_sum", "_count"] {
        assert_label_names(&m, &format!("{DURATION}{part}"), &["source", "event_type"]);
    }
    assert_one_observation(&m, &[("source", "tiktok"), ("event_type", "video.view")]);
    assert_one_observation(&m, &[("source", "tiktok"), ("event_type", "unknown")]);

    assert_family(&m, NATS_STATUS, "gauge", &[]);
    assert_eq!(m.one(NATS_STATUS, &[]).value, 1.0);

    assert!(m.one("collector_process_cpu_seconds_total", &[]).value >= 0.0);
    assert!(m.one("collector_process_resident_memory_bytes", &[]).value > 0.0);
}

/// 8. /health, /live, /ready, and /ready following a database outage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_endpoints_follow_the_database() {
    let env = TestEnv::new().await;
    let (mut proxy, engine) = env.engine_behind_proxy().await;

    let health = engine.get("/health").await;
    assert_eq!(health.status, 200, "{health:?}");
    let body = health.json();
    assert_eq!(body["status"], "ok", "{body}");
    let stamp = body["timestamp"].as_str().expect("timestamp is a string");
    let stamp = time::OffsetDateTime::parse(stamp, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("timestamp {stamp:?} is not ISO 8601: {e}"));
    let skew = (time::OffsetDateTime::now_utc() - stamp).whole_seconds();
    assert!(skew.abs() < 60, "timestamp {stamp} is not now");

    let live = engine.get("/live").await;
    assert_eq!((live.status, live.json()), (200, json!({"status": "ok"})));

    let up = json!({"status": "ok", "checks": {"database": "up", "nats": "up"}});
    let down = json!({"status": "degraded", "checks": {"database": "down", "nats": "up"}});
    engine.wait_reply("/ready", 200, &up).await;
    proxy.stop().await;
    engine.wait_reply("/ready", 503, &down).await;
    proxy.start().await;
    engine.wait_reply("/ready", 200, &up).await;
}

/// 9a. The stream and the consumer the engine creates are the collector's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_and_consumer_have_the_collectors_settings() {
    let env = TestEnv::new().await;
    let _engine = env.engine().start().await;

    let s = env.stream_info().await.config;
    assert_eq!(s.subjects, [env.subject(">")]);
    assert_eq!(s.retention, RetentionPolicy::Limits);
    assert_eq!(s.max_age, Duration::from_secs(7 * 24 * 3600));
    assert_eq!(s.max_messages, 1_000_000);
    assert_eq!(s.max_bytes, 1 << 30);
    assert_eq!(s.discard, DiscardPolicy::Old);
    assert_eq!(s.storage, StorageType::File);
    assert_eq!(s.num_replicas, 1);
    assert_eq!(s.duplicate_window, Duration::from_secs(120));

    let c = env.consumer_info().await.config;
    assert_eq!(c.durable_name.as_deref(), Some(env.durable.as_str()));
    assert_eq!(c.deliver_subject, None, "a pull consumer");
    let filter = env.subject("tiktok.>");
    assert!(
        c.filter_subject == filter || c.filter_subjects == [filter.clone()],
        "filter {:?} / {:?}, want {filter}",
        c.filter_subject,
        c.filter_subjects
    );
    assert_eq!(c.deliver_policy, DeliverPolicy::All);
    assert_eq!(c.ack_policy, AckPolicy::Explicit);
    assert_eq!(c.ack_wait, Duration::from_secs(30));
    assert_eq!(c.max_deliver, 5);
}

/// 9b. An existing stream is used as it is, whatever its settings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn existing_stream_is_used_as_is() {
    let env = TestEnv::new().await;
    let created = env
        .js
        .create_stream(stream::Config {
            name: env.stream.clone(),
            subjects: vec![env.subject(">")],
            max_age: Duration::from_secs(24 * 3600),
            ..Default::default()
        })
        .await
        .expect("create the stream first")
        .cached_info()
        .config
        .clone();

    let _engine = env.engine().start().await;
    env.publish_event(&top_event("into-existing")).await;
    env.wait_row("into-existing").await;
    assert_eq!(env.stream_info().await.config, created, "stream changed");
}

/// The contract's table, exactly as the collector's Prisma migration made it.
const PRISMA_TABLE: &str = r#"
CREATE TABLE "TiktokEvent" (
    "id" TEXT NOT NULL,
    "eventId" TEXT NOT NULL,
    "timestamp" TIMESTAMP(3) NOT NULL,
    "funnelStage" TEXT NOT NULL,
    "eventType" TEXT NOT NULL,
    "data" JSONB NOT NULL,
    "createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    CONSTRAINT "TiktokEvent_pkey" PRIMARY KEY ("id")
);
CREATE UNIQUE INDEX "TiktokEvent_eventId_key" ON "TiktokEvent"("eventId");
CREATE INDEX "TiktokEvent_timestamp_idx" ON "TiktokEvent"("timestamp");
CREATE INDEX "TiktokEvent_eventType_idx" ON "TiktokEvent"("eventType");
"#;

/// Prisma's bookkeeping table with the record of that migration.
const PRISMA_MIGRATIONS: &str = r#"
CREATE TABLE "_prisma_migrations" (
    "id" VARCHAR(36) PRIMARY KEY NOT NULL,
    "checksum" VARCHAR(64) NOT NULL,
    "finished_at" TIMESTAMPTZ,
    "migration_name" VARCHAR(255) NOT NULL,
    "logs" TEXT,
    "rolled_back_at" TIMESTAMPTZ,
    "started_at" TIMESTAMPTZ NOT NULL DEFAULT now(),
    "applied_steps_count" INTEGER NOT NULL DEFAULT 0
);
INSERT INTO "_prisma_migrations" ("id", "checksum", "finished_at", "migration_name", "applied_steps_count")
VALUES ('0b7a1c3e-8f7d-4a55-9a47-2f1f0d6c9e11',
        'e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855',
        now(), '20250101000000_init', 1);
INSERT INTO "TiktokEvent" ("id", "eventId", "timestamp", "funnelStage", "eventType", "data", "createdAt")
VALUES ('cm5old0000000000000000000', 'old-1', '2024-12-31 23:59:59.999', 'top', 'like',
        '{"user": {"userId": "u-old", "username": "old", "followers": 1},
          "engagement": {"watchTime": 1, "percentageWatched": 2, "device": "Desktop",
                         "country": "FR", "videoId": "v-old"}}',
        '2025-01-01 00:00:00');
"#;

/// What a takeover must leave alone: Prisma's records and the table's shape.
async fn prisma_snapshot(env: &TestEnv) -> (Vec<Value>, Vec<String>) {
    let records = sqlx::query_scalar(r#"SELECT to_jsonb(m) FROM "_prisma_migrations" m"#)
        .fetch_all(&env.db)
        .await
        .expect("read _prisma_migrations");
    let shape = sqlx::query_scalar(
        r#"SELECT column_name || ' ' || data_type || ' ' || coalesce(column_default, '')
           FROM information_schema.columns WHERE table_name = 'TiktokEvent'
           UNION ALL
           SELECT indexdef FROM pg_indexes WHERE tablename = 'TiktokEvent'
           ORDER BY 1"#,
    )
    .fetch_all(&env.db)
    .await
    .expect("read the table's shape");
    (records, shape)
}

/// A row without its age, which changes with the clock.
fn stable(row: TiktokRow) -> TiktokRow {
    TiktokRow {
        created_age_secs: 0.0,
        ..row
    }
}

/// 10. A database the collector migrated is taken over as it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prisma_migrated_database_is_taken_over() {
    let env = TestEnv::new().await;
    env.exec(PRISMA_TABLE).await;
    env.exec(PRISMA_MIGRATIONS).await;
    let before = prisma_snapshot(&env).await;
    let old_rows: Vec<_> = env.rows().await.into_iter().map(stable).collect();

    let _engine = env.engine().start().await;
    env.publish_event(&top_event("after-takeover")).await;
    env.wait_row("after-takeover").await;

    let rows: Vec<_> = env.rows().await.into_iter().map(stable).collect();
    assert_eq!(rows[..1], old_rows[..], "the old row was touched");
    assert_eq!(rows.len(), 2);
    assert_eq!(prisma_snapshot(&env).await, before);
}

/// 11. `?schema=` selects the schema, as Prisma does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_parameter_of_the_database_url_is_honoured() {
    let env = TestEnv::new().await;
    env.exec("CREATE SCHEMA ingest").await;
    let url = format!("{}?schema=ingest", env.database_url());
    let _engine = env.engine().database_url(url).start().await;
    env.publish_event(&top_event("in-schema")).await;

    env.wait_row_in(r#"ingest."TiktokEvent""#, "in-schema")
        .await;
    let public: Option<String> =
        sqlx::query_scalar(r#"SELECT to_regclass('public."TiktokEvent"')::text"#)
            .fetch_one(&env.db)
            .await
            .expect("to_regclass");
    assert_eq!(public, None, "the table must not be created in public");
}

/// The batch line of the shipped pipeline that the bad files replace.
const MAX_ROWS_LINE: &str = "      max_rows: 1000\n";

/// `ingestd run` and `ingestd check` both refuse this test's pipeline with
/// its `max_rows` line replaced by `batch_lines`: non-zero exit, naming
/// `tiktok.yaml` at the line containing `marker`, mentioning `mentions`.
async fn assert_pipeline_rejected(batch_lines: &str, marker: &str, mentions: &str) {
    let env = TestEnv::new().await;
    let replacement = [(MAX_ROWS_LINE.to_owned(), batch_lines.to_owned())];
    let text = adapt_pipeline(&env.tiktok_pipeline(), &replacement);
    let line = line_of(&text, marker);
    let path = env.write_pipeline("tiktok.yaml", &text);
    let dir = env.pipelines_dir();
    let commands = [
        vec!["run", "--pipelines", dir.to_str().expect("utf-8 path")],
        vec!["check", path.to_str().expect("utf-8 path")],
    ];
    for args in commands {
        let output = env.engine().output(&args).await;
        let printed = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            !output.status.success(),
            "ingestd {args:?} succeeded:\n{printed}"
        );
        assert!(
            names_location(&printed, "tiktok.yaml", line),
            "ingestd {args:?} does not name tiktok.yaml:{line}:\n{printed}"
        );
        assert!(
            printed.contains(mentions),
            "ingestd {args:?} does not mention {mentions:?}:\n{printed}"
        );
    }
}

/// 12a. An unknown key is an error naming file, line and key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_key_in_pipeline_is_reported_with_its_line() {
    let lines = format!("{MAX_ROWS_LINE}      max_rowz: 5\n");
    assert_pipeline_rejected(&lines, "max_rowz", "max_rowz").await;
}

/// 12b. A YAML syntax error is an error naming file and line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn yaml_syntax_error_in_pipeline_is_reported_with_its_line() {
    let lines = "      max_rows: 1000: 2\n";
    assert_pipeline_rejected(lines, "max_rows: 1000: 2", "tiktok.yaml").await;
}
