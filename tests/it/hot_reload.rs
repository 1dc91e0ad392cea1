//! Hot reload, end to end: pipeline files (and the files they reference)
//! are edited, added and removed under a running `ingestd`, which must keep
//! storing every event exactly once, keep the running version when the new
//! content is broken, and leave unchanged pipelines alone. Every test owns
//! its database, streams and consumers (see `crate::harness::TestEnv`), so
//! they run in parallel.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::harness::reload::*;
use crate::harness::*;
use serde_json::{json, Value};

/// The pipeline file every test runs.
const FILE: &str = "tiktok.yaml";
const VALIDATION_ERROR: &[(&str, &str)] = &[("reason", "validation_error")];

/// Starts an engine on the test's pipelines dir and returns it with the
/// status of its tiktok pipeline, running.
async fn start(env: &TestEnv) -> (Engine, PipelineStatus) {
    let engine = env.engine().start().await;
    let tiktok = wait_running(&engine, FILE).await;
    (engine, tiktok)
}

/// The tiktok pipeline still runs `before`'s version, loaded at the same
/// moment: it was neither reloaded nor restarted.
async fn assert_untouched(engine: &Engine, before: &PipelineStatus) {
    let now = status(engine, FILE).await;
    assert_eq!(
        (now.state, &now.version, &now.loaded_at),
        (PipelineState::Running, &before.version, &before.loaded_at),
        "tiktok was disturbed: {now:?}, was {before:?}"
    );
}

// ---------------------------------------------------------------------------
// 1. Reloads under load
// ---------------------------------------------------------------------------

const BULK_EVENTS: u64 = 20_000;
const BULK_RELOADS: usize = 20;
/// Publishing pace: at most this many events per tick.
const PUBLISH_CHUNK: u64 = 100;
const PUBLISH_TICK: Duration = Duration::from_millis(50);
/// How often the gap sampler counts rows.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);

/// How many events the publisher may have published once `reloads_done`
/// reloads took effect: one share per reload plus half a share of slack.
/// Publishing therefore keeps up with the reloads but cannot finish before
/// the last one took effect, so every reload happens under load.
fn publish_allowance(reloads_done: usize) -> u64 {
    let share = BULK_EVENTS / (BULK_RELOADS as u64 + 1);
    ((reloads_done as u64 + 1) * share + share / 2).min(BULK_EVENTS)
}

/// Publishes `BULK_EVENTS` distinct events at a steady pace (held back by
/// [`publish_allowance`]), each chunk confirmed by JetStream before
/// `published` counts it.
async fn publish_steadily(env: &TestEnv, published: &AtomicU64, reloads_done: &AtomicUsize) {
    let subject = env.subject("tiktok.top.video.view");
    let mut tick = tokio::time::interval(PUBLISH_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next = 0;
    while next < BULK_EVENTS {
        tick.tick().await;
        let end =
            (next + PUBLISH_CHUNK).min(publish_allowance(reloads_done.load(Ordering::SeqCst)));
        let mut acks = Vec::new();
        for n in next..end {
            let body = serde_json::to_vec(&view_event(&format!("bulk-{n}"))).expect("serialize");
            let ack = env.js.publish(subject.clone(), body.into()).await;
            acks.push(ack.unwrap_or_else(|e| panic!("publish bulk-{n}: {e}")));
        }
        for ack in acks {
            ack.await.unwrap_or_else(|e| panic!("publish ack: {e}"));
        }
        next = next.max(end);
        published.store(next, Ordering::SeqCst);
    }
}

async fn count_rows(env: &TestEnv) -> u64 {
    let n: i64 = sqlx::query_scalar(r#"SELECT count(*) FROM "TiktokEvent""#)
        .fetch_one(&env.db)
        .await
        .expect("count rows");
    n as u64
}

/// Samples (published, stored) every [`SAMPLE_EVERY`] until every event is
/// stored, or until the stored count stood still for [`DEADLINE`] (the
/// assertions on the samples then say what went wrong).
async fn sample_progress(env: &TestEnv, published: &AtomicU64) -> Vec<Progress> {
    let mut samples: Vec<Progress> = Vec::new();
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    let mut last_change = Instant::now();
    loop {
        tick.tick().await;
        let published = published.load(Ordering::SeqCst);
        let sample = Progress {
            at: Instant::now(),
            published,
            stored: count_rows(env).await,
        };
        if samples.last().is_none_or(|s| s.stored != sample.stored) {
            last_change = sample.at;
        }
        samples.push(sample);
        if sample.stored >= BULK_EVENTS || last_change.elapsed() > DEADLINE {
            return samples;
        }
    }
}

/// 1. Twenty reloads, alternating two valid versions, while 20,000 events
/// are published: every event stored once and acked once, and no answer of
/// `/pipelines` without a running version. The longest pause in storing
/// while events waited is printed (how long is the benchmark's business).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_reloads_under_load_store_every_event_once_without_a_gap() {
    let env = TestEnv::new().await;
    let (engine, first) = start(&env).await;
    let metrics = engine.metrics().await;
    let (successes, failures) = (
        first.reloads(&metrics, "success"),
        first.reloads(&metrics, "failure"),
    );
    let versions = [
        other_batching(&env.tiktok_pipeline()),
        env.tiktok_pipeline(),
    ];
    let path = env.pipelines_dir().join(FILE);
    let (published, reloads_done) = (AtomicU64::new(0), AtomicUsize::new(0));
    let started = Instant::now();

    let rewrite = async {
        let mut reload_times = Vec::new();
        for n in 0..BULK_RELOADS {
            let at = Instant::now();
            reload_with(&engine, FILE, &path, &versions[n % 2]).await;
            reload_times.push(at.elapsed());
            reloads_done.fetch_add(1, Ordering::SeqCst);
        }
        reload_times
    };
    let publish = async {
        publish_steadily(&env, &published, &reloads_done).await;
        started.elapsed()
    };
    let gaps = GapWatch::start(&engine);
    let (reload_times, published_after, samples) =
        tokio::join!(rewrite, publish, sample_progress(&env, &published));
    gaps.assert_no_gap().await;
    let stall = longest_stall(&samples);
    eprintln!(
        "published {BULK_EVENTS} events in {published_after:?}; reloads took {reload_times:?}; \
         all stored after {:?}; longest stall while pending: {stall:?}",
        started.elapsed()
    );

    let stored = samples.last().map_or(0, |s| s.stored);
    assert_eq!(stored, BULK_EVENTS, "rows stored (processing stalled?)");
    let (rows, distinct): (i64, i64) =
        sqlx::query_as(r#"SELECT count(*), count(DISTINCT "eventId") FROM "TiktokEvent""#)
            .fetch_one(&env.db)
            .await
            .expect("count rows");
    let want = BULK_EVENTS as i64;
    assert_eq!((rows, distinct), (want, want), "(rows, distinct eventIds)");

    let info = env.wait_all_acked().await;
    assert_no_redelivery(&info);
    let metrics = engine.wait_metric(PROCESSED, &[], BULK_EVENTS as f64).await;
    assert_eq!(metrics.sum(RECEIVED, &[]), BULK_EVENTS as f64, "received");
    assert_eq!(metrics.sum(FAILED, &[]), 0.0, "failed");
    let last = status(&engine, FILE).await;
    assert_eq!(
        (
            last.reloads(&metrics, "success") - successes,
            last.reloads(&metrics, "failure") - failures
        ),
        (BULK_RELOADS as f64, 0.0),
        "(successful, failed) reloads counted"
    );
}

/// The gap measure itself: standing still while events are pending is a
/// stall; standing still with nothing pending is not.
#[test]
fn longest_stall_counts_only_time_with_events_pending() {
    let t0 = Instant::now();
    let at = |ms| t0 + Duration::from_millis(ms);
    let sample = |ms, published, stored| Progress {
        at: at(ms),
        published,
        stored,
    };
    let samples = [
        // Nothing pending for 200 ms, then 600 ms pending without progress.
        sample(0, 0, 0),
        sample(200, 0, 0),
        sample(300, 10, 0),
        sample(900, 20, 0),
        // 400 ms pending without progress.
        sample(1000, 20, 5),
        sample(1400, 30, 5),
        // Everything stored: standing still is fine.
        sample(1500, 30, 30),
        sample(9000, 30, 30),
    ];
    let (stall, from) = longest_stall(&samples).expect("a stall");
    assert_eq!(stall, Duration::from_millis(600));
    assert_eq!((from.published, from.stored), (10, 0));
    assert_eq!(longest_stall(&samples[6..]).map(|(d, _)| d), None);
}

// ---------------------------------------------------------------------------
// 2. Broken versions
// ---------------------------------------------------------------------------

/// One way to break tiktok.yaml: replace `from` by `to`. The error must
/// name the file at the line of one of the `at` texts (of the broken file)
/// and mention `mentions`, if any.
struct Breakage {
    name: &'static str,
    from: String,
    to: String,
    at: &'static [&'static str],
    mentions: Option<&'static str>,
}

fn breakages(env: &TestEnv) -> Vec<Breakage> {
    let shipped_schema = format!("{}/schemas/tiktok-event.schema.json", repo_root().display());
    let missing_schema = env.dir.join("nowhere/missing.schema.json");
    vec![
        Breakage {
            name: "yaml",
            from: "      ack_wait: 30s\n".into(),
            to: "      ack_wait: 30s: x\n".into(),
            at: &["ack_wait: 30s: x"],
            mentions: None,
        },
        Breakage {
            name: "schema",
            from: shipped_schema,
            to: missing_schema.display().to_string(),
            at: &["nowhere/missing.schema.json"],
            mentions: Some("missing.schema.json"),
        },
        Breakage {
            name: "template",
            from: "{{ event.eventId }}".into(),
            to: "{{ event.eventId ".into(),
            at: &["{{ event.eventId ,"],
            mentions: Some("template"),
        },
        Breakage {
            name: "sql",
            from: r#""eventType", "data")"#.into(),
            to: r#""eventKind", "data")"#.into(),
            // The `insert` key, or the statement's line naming the column.
            at: &["insert: |", r#""eventKind", "data")"#],
            mentions: Some("eventKind"),
        },
    ]
}

/// 2. Each broken version leaves the running one storing events, shows
/// `degraded` with the error at its file:line, is logged and counted; the
/// fixed file runs as a new version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_versions_keep_the_running_one_until_fixed() {
    let env = TestEnv::new().await;
    let (engine, first) = start(&env).await;
    let base = env.tiktok_pipeline();
    let failures_at_start = first.reloads(&engine.metrics().await, "failure");
    let cases = breakages(&env);
    for case in &cases {
        let name = case.name;
        let before = status(&engine, FILE).await;
        let failures = before.reloads(&engine.metrics().await, "failure");
        let broken = edit(&base, &case.from, &case.to);
        let log_from = engine.log().len();
        env.write_pipeline(FILE, &broken);

        let degraded = wait_status(&engine, FILE, "degraded", |s| {
            s.state == PipelineState::Degraded && s.last_error.is_some()
        })
        .await;
        assert_eq!(
            (&degraded.version, &degraded.loaded_at),
            (&before.version, &before.loaded_at),
            "{name}: the running version changed"
        );
        let error = degraded.last_error.as_deref().unwrap_or_default();
        let lines: Vec<usize> = case.at.iter().map(|at| line_of(&broken, at)).collect();
        let located = |text: &str| lines.iter().any(|&l| names_location(text, FILE, l));
        assert!(
            located(error),
            "{name}: last_error not at {FILE}:{lines:?}: {error}"
        );
        if let Some(mentions) = case.mentions {
            assert!(
                error.contains(mentions),
                "{name}: {error:?} lacks {mentions:?}"
            );
        }
        let logged = engine.log().split_off(log_from);
        assert!(located(&logged), "{name}: {FILE}:{lines:?} not logged");
        engine
            .wait_metric(
                RELOADS,
                &[("file", &before.file), ("result", "failure")],
                failures + 1.0,
            )
            .await;
        assert_stores(&env, &format!("{name}-while-broken")).await;

        env.write_pipeline(FILE, &revision(&base, &format!("fixed after {name}")));
        let fixed = wait_new_version(&engine, FILE, &before).await;
        assert_eq!(fixed.last_error, None, "{name}: error kept after the fix");
        assert_stores(&env, &format!("{name}-after-fix")).await;
    }
    let last = status(&engine, FILE).await;
    assert_eq!(
        last.reloads(&engine.metrics().await, "failure") - failures_at_start,
        cases.len() as f64,
        "failed reloads counted"
    );
}

// ---------------------------------------------------------------------------
// 3. Adding and removing a pipeline
// ---------------------------------------------------------------------------

/// 3. A second pipeline dropped into the running engine runs beside tiktok
/// (untouched); removing its file stops it (its events wait on its durable),
/// restoring the file consumes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn added_pipeline_runs_removed_one_stops_restored_one_resumes() {
    let env = TestEnv::new().await;
    // Declared before the engine, so dropped after it: a running engine
    // would recreate the stream `Clicks` deletes on drop.
    let clicks = Clicks::new(&env);
    let (engine, tiktok) = start(&env).await;
    let clicks_file = env.write_pipeline(Clicks::FILE, &clicks.yaml(true));

    let running = wait_running(&engine, Clicks::FILE).await;
    assert_eq!(running.name.as_deref(), Some("clicks"));
    clicks.publish("c1").await;
    clicks.publish("c2").await;
    clicks.wait_stored(&["c1", "c2"]).await;
    assert_stores(&env, "beside-clicks").await;
    assert_untouched(&engine, &tiktok).await;

    std::fs::remove_file(&clicks_file).expect("remove clicks.yaml");
    wait_unlisted(&engine, Clicks::FILE).await;
    // Stopped means: no pull request of it left open on the server.
    clicks
        .wait_consumer("no open pull request", |i| i.num_waiting == 0)
        .await;
    for id in ["c3", "c4", "c5"] {
        clicks.publish(id).await;
    }
    clicks
        .wait_consumer("3 pending", |i| i.num_pending == 3)
        .await;
    // A tiktok event stored after them shows the engine had its chance.
    assert_stores(&env, "after-clicks-removed").await;
    let info = clicks.try_consumer_info().await.expect("clicks consumer");
    assert_eq!(
        (info.num_pending, info.num_ack_pending),
        (3, 0),
        "events of the removed pipeline were consumed"
    );
    clicks.wait_stored(&["c1", "c2"]).await;
    assert_untouched(&engine, &tiktok).await;

    env.write_pipeline(Clicks::FILE, &clicks.yaml(true));
    wait_running(&engine, Clicks::FILE).await;
    clicks.wait_stored(&["c1", "c2", "c3", "c4", "c5"]).await;
    clicks
        .wait_consumer("everything acked", |i| {
            i.num_pending == 0 && i.num_ack_pending == 0
        })
        .await;
    assert_stores(&env, "after-clicks-restored").await;
    assert_untouched(&engine, &tiktok).await;
    let metrics = engine.metrics().await;
    assert_eq!(tiktok.reloads(&metrics, "success"), 1.0, "tiktok loads");
}

// ---------------------------------------------------------------------------
// 4. Editing a referenced schema
// ---------------------------------------------------------------------------

/// The test's copy of the event schema, and tiktok.yaml pointing at it.
fn own_schema(env: &TestEnv) -> PathBuf {
    let schema = env.dir.join("schemas").join("tiktok-event.schema.json");
    std::fs::create_dir_all(schema.parent().expect("parent")).expect("create schemas dir");
    std::fs::write(&schema, repo_file("schemas/tiktok-event.schema.json")).expect("copy schema");
    let shipped = format!("{}/schemas/tiktok-event.schema.json", repo_root().display());
    let yaml = edit(
        &env.tiktok_pipeline(),
        &shipped,
        &schema.display().to_string(),
    );
    env.write_pipeline(FILE, &yaml);
    schema
}

/// 4. Editing only the schema file reloads the pipeline: the next events
/// are judged by the new rules (`middle` allowed, `like` forbidden).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_edit_applies_to_the_next_events() {
    let env = TestEnv::new().await;
    let schema_path = own_schema(&env);
    let (engine, _) = start(&env).await;
    env.publish_event(&tiktok_event("middle-before", "middle", "video.view"))
        .await;
    env.publish_event(&tiktok_event("like-before", "top", "like"))
        .await;
    env.wait_row("like-before").await;
    engine.wait_metric(FAILED, VALIDATION_ERROR, 1.0).await;

    let mut schema: Value =
        serde_json::from_str(&std::fs::read_to_string(&schema_path).expect("read schema"))
            .expect("schema is JSON");
    let properties = &mut schema["properties"];
    properties["funnelStage"]["enum"] = json!(["top", "middle", "bottom"]);
    let event_types = properties["eventType"]["enum"]
        .as_array_mut()
        .expect("eventType enum");
    event_types.retain(|t| t != "like");
    let text = serde_json::to_string_pretty(&schema).expect("serialize schema");
    reload_with(&engine, FILE, &schema_path, &text).await;

    env.publish_event(&tiktok_event("middle-after", "middle", "video.view"))
        .await;
    env.publish_event(&tiktok_event("like-after", "top", "like"))
        .await;
    env.wait_all_acked().await;
    let mut stored: Vec<String> = env.rows().await.into_iter().map(|r| r.event_id).collect();
    stored.sort();
    assert_eq!(
        stored,
        ["like-before", "middle-after"],
        "events published after the reload took effect were not judged by the new schema"
    );
    let metrics = engine.metrics().await;
    assert_eq!(
        metrics.sum(FAILED, VALIDATION_ERROR),
        2.0,
        "rejected events"
    );
}

// ---------------------------------------------------------------------------
// 5. The first event after a reload
// ---------------------------------------------------------------------------

/// 5. An event published the moment a new version shows in `/pipelines`
/// is stored (not lost in the hand-over), for several reloads in a row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_event_after_a_reload_is_stored() {
    let env = TestEnv::new().await;
    let (engine, _) = start(&env).await;
    let base = env.tiktok_pipeline();
    let path = env.pipelines_dir().join(FILE);
    for round in 0..3 {
        let text = revision(&base, &format!("round {round}"));
        reload_with(&engine, FILE, &path, &text).await;
        assert_stores(&env, &format!("first-after-reload-{round}")).await;
    }
    let info = env.wait_all_acked().await;
    assert_no_redelivery(&info);
}

// ---------------------------------------------------------------------------
// 6. SIGHUP
// ---------------------------------------------------------------------------

/// 6. A file that failed because its table was missing runs after the
/// table is created and the engine gets SIGHUP (its content never changed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_retries_a_file_whose_table_now_exists() {
    let env = TestEnv::new().await;
    // Declared before the engine, so dropped after it: a running engine
    // would recreate the stream `Clicks` deletes on drop.
    let clicks = Clicks::new(&env);
    let (engine, _) = start(&env).await;
    env.write_pipeline(Clicks::FILE, &clicks.yaml(false));
    let failed = wait_status(&engine, Clicks::FILE, "failed", |s| {
        s.state == PipelineState::Failed && s.last_error.is_some()
    })
    .await;
    let error = failed.last_error.unwrap_or_default();
    assert!(
        error.contains(r#""clicks""#),
        "error does not name the missing table: {error}"
    );

    env.exec(CLICKS_TABLE_SQL).await;
    send_sighup(&engine);
    let running = wait_running(&engine, Clicks::FILE).await;
    assert_eq!(running.name.as_deref(), Some("clicks"));
    clicks.publish("after-hup").await;
    clicks.wait_stored(&["after-hup"]).await;
    assert_stores(&env, "tiktok-after-hup").await;
}
