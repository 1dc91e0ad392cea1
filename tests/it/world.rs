//! The world changing under a running engine: consumers and streams
//! deleted or replaced, pipeline files renamed or swapped, servers that stop
//! answering, hostile label values. Every test runs the engine binary
//! against the machine's NATS and PostgreSQL (or processes it starts
//! itself: a TCP proxy, a NATS server).

use std::time::Duration;

use crate::harness::batching::{large_event_backlog, LARGE_EVENT_TABLE};
use crate::harness::faults::*;
use crate::harness::*;
use async_nats::jetstream::{consumer, stream};

const SOURCE_FAILURES: &str = "ingestd_pipeline_failures_total";

/// `/ready`'s status code now.
async fn ready_status(engine: &Engine) -> u16 {
    engine.get("/ready").await.status
}

// ---------------------------------------------------------------------------
// 1. Consumers and streams are watched, not assumed
// ---------------------------------------------------------------------------

/// `nats consumer rm` under a running engine: the pull errors are noticed,
/// reported once, the consumer is recreated and storing continues.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_consumer_is_recreated_and_storing_continues() {
    let env = TestEnv::new().await;
    let engine = started(&env).await;
    let stream = env.js.get_stream(&env.stream).await.expect("stream");
    // nats-server 2.9 sometimes answers a delete racing the consumer's own
    // writes with a 500 ("directory not empty"), as `nats consumer rm`
    // would see it; like an operator, try again until it is gone.
    wait_for("the consumer to be deleted", DEADLINE, || async {
        match stream.delete_consumer(&env.durable).await {
            Ok(_) => Ok(()),
            Err(e) if e.to_string().contains("not found") => Ok(()),
            Err(e) => Err(e.to_string()),
        }
    })
    .await;
    env.publish_event(&event("after")).await;
    env.wait_row("after").await;
    env.wait_consumer().await;
    let m = engine
        .wait_metric_at_least(SOURCE_FAILURES, &[("side", "source")], 1.0)
        .await;
    assert_eq!(
        m.sum("ingestd_pipeline_problem", &[("side", "source")]),
        0.0
    );
    assert_eq!(ready_status(&engine).await, 200);
    assert_eq!(engine.log_lines("cannot pull"), 1, "{}", engine.log());
    assert_eq!(engine.log_lines("pulling again"), 1, "{}", engine.log());
}

/// Someone changes the consumer so that the server rejects the engine's
/// pulls (`max_batch` below the engine's batch: 409 at once): the engine
/// notices, puts the consumer back to the file's settings and goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_consumer_rejecting_pulls_is_restored() {
    let env = TestEnv::new().await;
    let engine = started(&env).await;
    let stream = env.js.get_stream(&env.stream).await.expect("stream");
    let config = env.consumer_info().await.config;
    stream
        .create_consumer(consumer::pull::Config {
            durable_name: config.durable_name.clone(),
            name: config.name.clone(),
            filter_subject: config.filter_subject.clone(),
            ack_wait: config.ack_wait,
            max_deliver: config.max_deliver,
            max_ack_pending: config.max_ack_pending,
            max_batch: 10,
            ..Default::default()
        })
        .await
        .expect("change the consumer");
    env.publish_event(&event("after")).await;
    env.wait_row("after").await;
    engine
        .wait_metric_at_least(SOURCE_FAILURES, &[("side", "source")], 1.0)
        .await;
    // The failure is counted when the repair begins; the consumer is put
    // back by it a moment later.
    wait_for("the consumer restored", DEADLINE, || async {
        expect_eq(env.try_consumer_info().await?.config.max_batch, 0)
    })
    .await;
    assert_eq!(engine.log_lines("cannot pull"), 1, "{}", engine.log());
}

/// The stream deleted and recreated by someone else with subjects that do
/// not cover the pipeline's filter: the consumer cannot be recreated on it,
/// so the pipeline is failing (503, `/pipelines`, metric) and retries with
/// backoff rather than hot; once the stream is gone again, the engine
/// recreates both and stores what is published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaced_stream_fails_the_pipeline_with_backoff_until_repaired() {
    let env = TestEnv::new().await;
    let engine = started(&env).await;
    // The engine recreates its stream as soon as it misses it: replace it
    // until the foreign one wins the race.
    wait_for(
        "the foreign stream to replace the engine's",
        DEADLINE,
        || async {
            let _ = env.js.delete_stream(&env.stream).await;
            env.js
                .create_stream(stream::Config {
                    name: env.stream.clone(),
                    subjects: vec![format!("{}.elsewhere.>", env.id)],
                    ..Default::default()
                })
                .await
                .map(|_| ())
                .map_err(state("create"))
        },
    )
    .await;
    wait_for("/ready 503 and a failing pipeline", DEADLINE, || async {
        let ready = engine.try_get("/ready").await?;
        let pipelines = engine.try_get("/pipelines").await?;
        if ready.status == 503 && pipelines.body.contains("\"failing\"") {
            Ok(())
        } else {
            Err(format!("{} {}", ready.status, pipelines.body))
        }
    })
    .await;
    let logged = engine.log_lines("cannot pull");
    // The mechanism, not a rate: each failed repair doubles the pause
    // before the next, up to REPAIR_BACKOFF's ceiling (5 s), and the pause
    // never shrinks while the source keeps failing.
    let pauses = std::sync::Mutex::new(Vec::new());
    let problem = wait_for("the repair's pause to reach 5 s", DEADLINE, || async {
        let status = engine.try_pipeline_status().await?;
        let problem = &status["problem"];
        expect_eq(problem["side"].as_str(), Some("source"))
            .map_err(|e| format!("problem side {e} in {status}"))?;
        if let Some(pause) = problem["retry_in_ms"].as_u64() {
            let mut pauses = pauses.lock().expect("pauses");
            if pauses.last() != Some(&pause) {
                pauses.push(pause);
            }
        }
        expect_eq(problem["retry_in_ms"].as_u64(), Some(5_000))?;
        Ok(problem.clone())
    })
    .await;
    let pauses = pauses.into_inner().expect("pauses");
    assert!(
        pauses.windows(2).all(|w| w[0] < w[1]),
        "the repair's pause shrank while failing: {pauses:?}"
    );
    assert!(
        problem["attempts"].as_u64() > Some(5),
        "a pause of 5 s after fewer than six failed attempts: {problem}"
    );
    assert_eq!(
        engine.log_lines("cannot pull"),
        logged,
        "logged again without a change of state:\n{}",
        engine.log()
    );
    env.js.delete_stream(&env.stream).await.expect("delete");
    wait_for("/ready 200", Duration::from_secs(30), || async {
        expect_eq(engine.try_get("/ready").await?.status, 200)
    })
    .await;
    env.publish_event(&event("repaired")).await;
    env.wait_row("repaired").await;
}

// ---------------------------------------------------------------------------
// 2. A rename is a move
// ---------------------------------------------------------------------------

/// Starts the engine on the test's tiktok pipeline and waits until it stores.
async fn started(env: &TestEnv) -> Engine {
    let engine = env.engine().start().await;
    reload::assert_stores(env, "first").await;
    engine
}

/// `mv tiktok.yaml renamed.yaml`: the new name takes over the running
/// pipeline like a reload, with no moment without it, and nothing is
/// refused as a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renamed_file_keeps_its_pipeline_running() {
    let env = TestEnv::new().await;
    let engine = started(&env).await;
    let gaps = reload::GapWatch::start(&engine);
    let dir = env.pipelines_dir();
    std::fs::rename(dir.join("tiktok.yaml"), dir.join("renamed.yaml")).expect("rename");
    reload::wait_running(&engine, "renamed.yaml").await;
    reload::wait_unlisted(&engine, "tiktok.yaml").await;
    gaps.assert_no_gap().await;
    reload::assert_stores(&env, "after-rename").await;
    let log = engine.log();
    assert!(
        !log.contains("already run by"),
        "refused as a duplicate:\n{log}"
    );
    assert!(
        !log.contains("pipeline file removed"),
        "stopped as removed:\n{log}"
    );
    assert!(log.contains("pipeline file moved"), "{log}");
}

/// A Kubernetes ConfigMap update: the files are links into `..data`, which
/// is swapped atomically for a new timestamped directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configmap_update_reloads_without_a_gap() {
    let env = TestEnv::new().await;
    let dir = env.dir.join("configmap");
    let write_version = |stamp: &str, yaml: &str| {
        let version = dir.join(stamp);
        std::fs::create_dir_all(&version).expect("version dir");
        std::fs::write(version.join("tiktok.yaml"), yaml).expect("write");
    };
    let yaml = env.tiktok_pipeline();
    write_version("..2026_11_25_01", &yaml);
    std::os::unix::fs::symlink("..2026_11_25_01", dir.join("..data")).expect("link");
    std::os::unix::fs::symlink("..data/tiktok.yaml", dir.join("tiktok.yaml")).expect("link");
    let engine = env.engine().pipelines_dir(&dir).start().await;
    reload::assert_stores(&env, "first").await;
    let before = reload::wait_running(&engine, "tiktok.yaml").await;
    let gaps = reload::GapWatch::start(&engine);
    write_version("..2026_11_25_02", &reload::revision(&yaml, "2"));
    std::os::unix::fs::symlink("..2026_11_25_02", dir.join("..data_tmp")).expect("link");
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).expect("swap");
    std::fs::remove_dir_all(dir.join("..2026_11_25_01")).expect("remove old");
    reload::wait_new_version(&engine, "tiktok.yaml", &before).await;
    gaps.assert_no_gap().await;
    reload::assert_stores(&env, "after-update").await;
    let statuses = reload::try_statuses(&engine).await.expect("statuses");
    assert_eq!(statuses.len(), 1, "{statuses:?}");
}

/// A second file claiming the running pipeline's name is refused loudly;
/// the first keeps running the same version throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_pipeline_is_refused_and_the_first_never_stops() {
    let env = TestEnv::new().await;
    let engine = started(&env).await;
    let before = reload::wait_running(&engine, "tiktok.yaml").await;
    let gaps = reload::GapWatch::start(&engine);
    env.write_pipeline(
        "copy.yaml",
        &reload::revision(&env.tiktok_pipeline(), "copy"),
    );
    let refused = reload::wait_status(&engine, "copy.yaml", "refused", |s| {
        s.state == reload::PipelineState::Failed
            && s.last_error
                .as_deref()
                .is_some_and(|e| e.contains("already run by tiktok.yaml"))
    })
    .await;
    assert!(
        refused.last_error.unwrap().starts_with("copy.yaml:"),
        "path relative to the pipelines dir"
    );
    gaps.assert_no_gap().await;
    let after = reload::status(&engine, "tiktok.yaml").await;
    assert_eq!(
        (after.state, &after.version),
        (reload::PipelineState::Running, &before.version)
    );
    reload::assert_stores(&env, "still-stored").await;
    assert!(engine.log().contains("already run by"), "not logged");
}

/// Changes that never stop (a file rewritten every 100 ms) do not starve
/// the debounce: an edit still reloads within seconds. Editor swap, backup
/// and lock files are not pipeline files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restless_directory_still_reloads_and_editor_files_are_ignored() {
    let env = TestEnv::new().await;
    let engine = started(&env).await;
    let dir = env.pipelines_dir();
    for name in [
        ".tiktok.yaml.swp",
        "tiktok.yaml~",
        "#tiktok.yaml#",
        ".#tiktok.yaml",
    ] {
        std::fs::write(dir.join(name), "name: [broken").expect("write editor file");
    }
    let before = reload::wait_running(&engine, "tiktok.yaml").await;
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let noise = dir.join("notes.txt");
    let churn = tokio::spawn(async move {
        for i in 0u64.. {
            std::fs::write(&noise, i.to_string()).expect("write noise");
            tokio::select! {
                _ = stopped.changed() => return,
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
    });
    let edited = std::time::Instant::now();
    env.write_pipeline(
        "tiktok.yaml",
        &reload::revision(&env.tiktok_pipeline(), "edited"),
    );
    // The churn only ends when told: a debounce that waited for quiet would
    // never load the new version.
    reload::wait_new_version(&engine, "tiktok.yaml", &before).await;
    eprintln!("reload while files kept changing: {:?}", edited.elapsed());
    assert!(!churn.is_finished(), "the directory stopped changing");
    let _ = stop.send(true);
    churn.await.expect("churn");
    let statuses = reload::try_statuses(&engine).await.expect("statuses");
    assert_eq!(statuses.len(), 1, "editor files loaded: {statuses:?}");
    let m = engine.metrics().await;
    assert_eq!(m.sum(reload::RELOADS, &[("result", "failure")]), 0.0);
}

// ---------------------------------------------------------------------------
// 4. Nothing waits forever
// ---------------------------------------------------------------------------

/// The test's pipeline with `lines` added to `sink.postgres`.
fn with_sink_settings(env: &TestEnv, lines: &str) -> String {
    reload::edit(
        &env.tiktok_pipeline(),
        "    batch:\n",
        &format!("{lines}    batch:\n"),
    )
}

const SHORT_TIMEOUTS: &str = "    statement_timeout: 1s\n    connect_timeout: 1s\n";

/// An engine (short timeouts, `SHUTDOWN_GRACE=2s`) whose database is
/// behind a proxy, storing.
async fn behind_a_proxy(env: &TestEnv) -> (Engine, TcpProxy) {
    let proxy = TcpProxy::to_postgres().await;
    env.write_pipeline("tiktok.yaml", &with_sink_settings(env, SHORT_TIMEOUTS));
    let url = proxied(env, &proxy);
    let engine = env
        .engine()
        .database_url(url)
        .var("SHUTDOWN_GRACE", "2s")
        .start()
        .await;
    reload::assert_stores(env, "first").await;
    (engine, proxy)
}

/// A database that accepts TCP and never answers (a frozen proxy): the
/// write in progress ends as a transient error within connect_timeout +
/// statement_timeout (+1 s), /ready says so, and once it answers again the
/// event is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_database_is_a_transient_error_within_the_timeouts() {
    let env = TestEnv::new().await;
    let (engine, proxy) = behind_a_proxy(&env).await;
    proxy.freeze();
    let frozen = std::time::Instant::now();
    env.publish_event(&event("while-hung")).await;
    engine.wait_metric_at_least(SINK_RETRIES, &[], 1.0).await;
    eprintln!(
        "hung database: transient error after {:?}",
        frozen.elapsed()
    );
    // Ended by the engine's own clock, which is all that can end it (a
    // server that does not answer cancels nothing): waiting for a pool
    // connection ends after connect_timeout, a write attempt after
    // connect_timeout + statement_timeout + 1 s.
    let log = engine.log();
    let failed = log
        .lines()
        .find(|line| line.contains("write failed"))
        .unwrap_or_else(|| panic!("no failed write in the log: {log}"));
    assert!(
        failed.contains("pool timed out while waiting for an open connection")
            || failed.contains("the database did not answer within 3s"),
        "not ended by the engine's timeouts: {failed}"
    );
    wait_for("/ready 503", DEADLINE, || async {
        expect_eq(engine.try_get("/ready").await?.status, 503)
    })
    .await;
    proxy.thaw();
    env.wait_row("while-hung").await;
}

/// Whether a session of the engine waits on a lock in the test's database.
async fn engine_waits_on_a_lock(env: &TestEnv) -> Result<(), String> {
    let waiting: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity
         WHERE datname = $1 AND application_name = 'ingestd' AND wait_event_type = 'Lock'",
    )
    .bind(&env.db_name)
    .fetch_one(&env.db)
    .await
    .map_err(state("pg_stat_activity"))?;
    if waiting > 0 {
        Ok(())
    } else {
        Err("no engine session waits on a lock".into())
    }
}

/// A private copy of the shipped migrations, so a test can add one.
fn private_migrations(env: &TestEnv) -> std::path::PathBuf {
    let dir = env.dir.join("migrations");
    std::fs::create_dir_all(&dir).expect("migrations dir");
    for entry in std::fs::read_dir(repo_root().join("migrations")).expect("read migrations") {
        let path = entry.expect("entry").path();
        std::fs::copy(&path, dir.join(path.file_name().unwrap())).expect("copy migration");
    }
    dir
}

/// A pipeline whose migrations are a private copy, with `settings` added
/// to `sink.postgres`.
fn with_private_migrations(env: &TestEnv, settings: &str) -> (String, std::path::PathBuf) {
    let dir = private_migrations(env);
    let shipped = format!("{}/migrations", repo_root().display());
    let yaml = reload::edit(
        &with_sink_settings(env, settings),
        &shipped,
        &dir.display().to_string(),
    );
    (yaml, dir)
}

const ALTER_MIGRATION: &str = r#"ALTER TABLE "TiktokEvent" ADD COLUMN "note" text;"#;

/// Locks the table in a transaction of the test's, then adds a migration
/// that needs the lock (a reload follows). Returns the locking transaction.
async fn migrate_against_a_lock(
    env: &TestEnv,
    migrations: &std::path::Path,
) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut locker = env.db.begin().await.expect("begin");
    sqlx::query(r#"LOCK TABLE "TiktokEvent" IN ACCESS EXCLUSIVE MODE"#)
        .execute(&mut *locker)
        .await
        .expect("lock");
    std::fs::write(migrations.join("20990101000000_note.sql"), ALTER_MIGRATION).expect("write");
    locker
}

/// A migration that waits on another session's lock fails the reload with
/// a clear message after lock_timeout; the running version stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migration_waiting_on_a_lock_fails_the_reload_after_lock_timeout() {
    let env = TestEnv::new().await;
    let (yaml, migrations) = with_private_migrations(&env, "    lock_timeout: 1s\n");
    env.write_pipeline("tiktok.yaml", &yaml);
    let engine = started(&env).await;
    let before = reload::wait_running(&engine, "tiktok.yaml").await;
    let locker = migrate_against_a_lock(&env, &migrations).await;
    let failed = reload::wait_status(&engine, "tiktok.yaml", "a failed reload", |s| {
        s.last_error
            .as_deref()
            .is_some_and(|e| e.contains("lock_timeout"))
    })
    .await;
    assert_eq!(failed.version, before.version, "the running version stays");
    assert_eq!(failed.state, reload::PipelineState::Degraded);
    locker.rollback().await.expect("unlock");
}

/// SIGTERM while a reload's migration waits on a lock (with a long
/// lock_timeout) and the directory keeps changing: the engine exits within
/// shutdown_grace + 5 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_migration_lock_wait_exits_in_bounded_time() {
    let env = TestEnv::new().await;
    let (yaml, migrations) = with_private_migrations(&env, "    lock_timeout: 10m\n");
    env.write_pipeline("tiktok.yaml", &yaml);
    let engine = env.engine().var("SHUTDOWN_GRACE", "2s").start().await;
    reload::assert_stores(&env, "first").await;
    let locker = migrate_against_a_lock(&env, &migrations).await;
    wait_for("the migration to wait on the lock", DEADLINE, || {
        engine_waits_on_a_lock(&env)
    })
    .await;
    let noise = env.pipelines_dir().join("notes.txt");
    let churn = tokio::spawn(async move {
        for i in 0u64..200 {
            let _ = std::fs::write(&noise, i.to_string());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let asked = std::time::Instant::now();
    signal(engine.pid(), "TERM");
    engine.wait_exit().await;
    churn.abort();
    // The lock would hold the migration for 10 minutes: an exit within the
    // harness's deadline is the reload abandoned.
    eprintln!(
        "SIGTERM during a migration lock wait: exited after {:?}",
        asked.elapsed()
    );
    locker.rollback().await.expect("unlock");
}

/// SIGTERM while the database does not answer and a batch is held: the
/// engine exits by its own shutdown deadline (the hang would last for
/// ever) and the held event is stored later by another engine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_the_database_hangs_exits_in_bounded_time() {
    let env = TestEnv::new().await;
    let (engine, proxy) = behind_a_proxy(&env).await;
    proxy.freeze();
    env.publish_event(&event("held")).await;
    engine.wait_metric_at_least(SINK_RETRIES, &[], 1.0).await;
    let asked = std::time::Instant::now();
    signal(engine.pid(), "TERM");
    engine.wait_exit().await;
    eprintln!(
        "SIGTERM while the database hangs: exited after {:?}",
        asked.elapsed()
    );
    let _second = env.engine().start().await;
    env.wait_row("held").await;
}

/// SIGTERM to `engine`, which holds the event `held` on a consumer whose
/// ack_wait ([`LONG_ACK_WAIT`]) outlasts every deadline here: only the
/// engine's release (a nak) can free the message in time for a second
/// process to store it. (A nak'ed message still counts as ack pending until
/// it is delivered again, so the consumer's state cannot tell.)
async fn term_then_second_process_stores_the_held_event(env: &TestEnv, engine: &Engine) {
    signal(engine.pid(), "TERM");
    engine.wait_exit().await;
    let _second = env.engine().start().await;
    env.wait_row("held").await;
    assert_stored_exactly(env, &["first".into(), "held".into()]).await;
}

/// The ack_wait of the SIGTERM tests below: a message the engine did not
/// release stays pending far beyond the tests' deadlines.
const LONG_ACK_WAIT: &str = "      ack_wait: 10m\n";

/// `yaml` with [`LONG_ACK_WAIT`].
fn with_long_ack_wait(yaml: &str) -> String {
    reload::edit(yaml, "      ack_wait: 30s\n", LONG_ACK_WAIT)
}

/// The `SHUTDOWN_GRACE` of the SIGTERM tests below.
const TERM_GRACE: &str = "4s";

/// An engine with [`TERM_GRACE`] whose database is behind `proxy`, which
/// has stored the event `first`.
async fn storing_with_term_grace(env: &TestEnv, proxy: &TcpProxy) -> Engine {
    let engine = env
        .engine()
        .database_url(proxied(env, proxy))
        .var("SHUTDOWN_GRACE", TERM_GRACE)
        .start()
        .await;
    reload::assert_stores(env, "first").await;
    engine
}

/// SIGTERM while a write hangs on a database that stopped answering, with
/// timeouts far beyond the shutdown grace: the attempt is abandoned after
/// half the grace and its batch released (nak), so a second process stores
/// the event long before ack_wait would free it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_hung_write_releases_its_batch() {
    let env = TestEnv::new().await;
    let proxy = TcpProxy::to_postgres().await;
    let long_timeouts = "    statement_timeout: 60s\n    connect_timeout: 30s\n";
    let yaml = with_long_ack_wait(&with_sink_settings(&env, long_timeouts));
    env.write_pipeline("tiktok.yaml", &yaml);
    let engine = storing_with_term_grace(&env, &proxy).await;
    proxy.freeze();
    env.publish_event(&event("held")).await;
    engine.wait_metric(RECEIVED, &[], 2.0).await;
    term_then_second_process_stores_the_held_event(&env, &engine).await;
}

/// SIGTERM while a batch waits out a long retry pause (its database
/// refuses connections): the pause ends with the stop, the batch is
/// released at once, and a second process stores it long before the pause
/// (30 s) or ack_wait would end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_retry_pause_releases_its_batch() {
    let env = TestEnv::new().await;
    let mut proxy = TcpProxy::to_postgres().await;
    let long_pause = reload::edit(
        &with_sink_settings(&env, SHORT_TIMEOUTS),
        "    backoff_initial: 100ms\n    backoff_max: 10s\n",
        "    backoff_initial: 30s\n    backoff_max: 60s\n",
    );
    env.write_pipeline("tiktok.yaml", &with_long_ack_wait(&long_pause));
    let engine = storing_with_term_grace(&env, &proxy).await;
    proxy.stop().await;
    env.publish_event(&event("held")).await;
    wait_for("the write to fail and pause", DEADLINE, || async {
        let retries = engine.try_metrics().await?.sum(SINK_RETRIES, &[]);
        expect_eq(retries >= 1.0, true)
    })
    .await;
    term_then_second_process_stores_the_held_event(&env, &engine).await;
}

// ---------------------------------------------------------------------------
// 5. Dead letters are always deliverable
// ---------------------------------------------------------------------------

/// The original's JetStream control headers would make the dead-letter
/// stream refuse the letter (an expected stream that is not the queue's):
/// they travel as `Original-*`. While the queue's stream is missing, the
/// letter is retried and the original held, not acked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_keep_control_headers_aside_and_are_retried_until_accepted() {
    let (env, bus, dlq) = with_dead_letters(|v| v).await;
    let engine = bus.start(env.engine()).await;
    env.js
        .delete_stream(&dlq.stream)
        .await
        .expect("delete the queue");
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Expected-Stream", env.stream.as_str());
    headers.insert("Nats-Msg-Id", "original-id");
    bus.publish(TOP_VIEW, headers, b"not json".to_vec()).await;
    wait_for("the refused dead letter to be logged", DEADLINE, || async {
        if engine.log().contains("dead letters refused") {
            Ok(())
        } else {
            Err("not yet".to_string())
        }
    })
    .await;
    let held = bus.consumer_info().await;
    assert_eq!(
        (held.num_ack_pending, held.num_pending),
        (1, 0),
        "the original is held"
    );
    dlq.create_stream().await;
    let letters = dlq.wait_letters(1).await;
    let letter = &letters[0];
    assert_eq!(letter.header("Original-Nats-Expected-Stream"), env.stream);
    assert_eq!(letter.header("Original-Nats-Msg-Id"), "original-id");
    assert_eq!(letter.header("Nats-Expected-Stream"), "");
    assert_eq!(letter.header("Ingestd-Reason"), "not_json");
    let info = bus.wait_all_acked(DEADLINE).await;
    assert_eq!(redeliveries(&info), 0);
}

// ---------------------------------------------------------------------------
// 6. Secrets stay secret
// ---------------------------------------------------------------------------

/// Everything the engine showed: its log and three endpoints.
async fn everything_shown(engine: &Engine) -> String {
    let mut shown = engine.log();
    for path in ["/pipelines", "/metrics", "/ready"] {
        shown.push_str(&engine.get(path).await.body);
    }
    shown
}

/// A database URL with a `?password=` parameter and NATS credentials of
/// every kind (the shared server has no auth and ignores them): none is
/// ever shown, at debug level, in the log or the endpoints, and none is in
/// the errors of a start that fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_show_in_logs_endpoints_or_errors() {
    let env = TestEnv::new().await;
    let secret = |what: &str| format!("{what}Zq{}", env.id);
    let creds = env.dir.join("bad.creds");
    std::fs::write(&creds, secret("CredsContent")).expect("write creds");
    let db_url = format!(
        "postgresql://postgres@127.0.0.1:{PG_PORT}/{}?password={}",
        env.db_name,
        secret("QueryPassword")
    );
    let engine = env
        .engine()
        .database_url(db_url)
        .var("RUST_LOG", "debug")
        .var("NATS_TOKEN", secret("NatsToken"))
        .start()
        .await;
    reload::assert_stores(&env, "first").await;
    let shown = everything_shown(&engine).await;
    for s in [secret("QueryPassword"), secret("NatsToken")] {
        assert!(!shown.contains(&s), "{s} shown:\n{shown}");
    }
    let closed = free_port();
    let failing_starts: [(&str, String); 5] = [
        (
            "DATABASE_URL",
            format!(
                "postgresql://postgres@127.0.0.1:{closed}/x?password={}",
                secret("QueryPassword")
            ),
        ),
        ("NATS_TOKEN", secret("NatsToken")),
        ("NATS_PASSWORD", secret("NatsPassword")),
        ("NATS_NKEY", secret("SUAnkeySeed")),
        ("NATS_CREDS", creds.display().to_string()),
    ];
    let dir = env.pipelines_dir();
    for (var, value) in failing_starts {
        let mut builder = env.engine().var("RUST_LOG", "debug").var(var, value);
        if var != "DATABASE_URL" {
            builder = builder.var("NATS_URL", format!("nats://127.0.0.1:{closed}"));
        }
        if var == "NATS_PASSWORD" {
            builder = builder.var("NATS_USER", "ingestd");
        }
        let out = builder
            .output(&["run", "--pipelines", dir.to_str().unwrap()])
            .await;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.status.success(), "{var}: started");
        for what in [
            "QueryPassword",
            "NatsToken",
            "NatsPassword",
            "SUAnkeySeed",
            "CredsContent",
        ] {
            assert!(
                !text.contains(&secret(what)),
                "{var}: {what} printed:\n{text}"
            );
        }
    }
}

// ---------------------------------------------------------------------------
// 8. Cardinality guard
// ---------------------------------------------------------------------------

/// Subjects chosen by whoever publishes become `received{subject}` label
/// sets; beyond `max_label_sets` they are folded into `other`, counted and
/// warned about once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn label_sets_beyond_the_cap_fold_into_other() {
    let env = TestEnv::new().await;
    let yaml = reload::edit(
        &env.tiktok_pipeline(),
        "metrics:\n",
        "metrics:\n  max_label_sets: 3\n",
    );
    env.write_pipeline("tiktok.yaml", &yaml);
    let engine = env.engine().start().await;
    for i in 0..10 {
        let body = serde_json::to_vec(&event(&format!("e{i}"))).unwrap();
        env.publish(&format!("tiktok.top.s{i}"), body).await;
    }
    let m = engine.wait_metric(PROCESSED, &[], 10.0).await;
    let received: Vec<_> = m.series(RECEIVED, &[]).collect();
    assert_eq!(received.len(), 4, "{received:#?}");
    assert_eq!(m.sum(RECEIVED, &[("subject", "other")]), 7.0);
    assert_eq!(m.sum(RECEIVED, &[]), 10.0);
    let folds = m.sum("ingestd_metric_label_folds_total", &[("family", RECEIVED)]);
    assert_eq!(folds, 7.0);
    assert_eq!(
        m.series(PROCESSED, &[]).count(),
        1,
        "below the cap labels stay"
    );
    assert_eq!(
        engine.log_lines("reached max_label_sets"),
        1,
        "{}",
        engine.log()
    );
}

// ---------------------------------------------------------------------------
// 3. Bounded by bytes, not only by count
// ---------------------------------------------------------------------------

/// A backlog of 200 events of about 600 KB: with 1,000-message pulls NATS
/// would have to push 120 MB at once and drop the engine as a slow
/// consumer. Pulls and batches are bounded by bytes, so it drains without
/// a disconnect and in bounded memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_event_backlog_drains_without_disconnect_in_bounded_memory() {
    const EVENTS: usize = 200;
    let env = TestEnv::new().await;
    large_event_backlog(&env, EVENTS, 600 * 1000).await;
    let started = std::time::Instant::now();
    let engine = env.engine().start().await;
    wait_for(
        "the large backlog to be stored",
        Duration::from_secs(60),
        || async { expect_eq(env.try_count(LARGE_EVENT_TABLE).await?, EVENTS as i64) },
    )
    .await;
    let took = started.elapsed();
    env.wait_all_acked().await;
    let rss = engine.memory_kib("VmHWM").expect("VmHWM") as f64 / 1024.0;
    let disconnects = engine.log_lines("NATS disconnected");
    eprintln!("large events: {EVENTS} × 600 KB drained in {took:?}, peak RSS {rss:.1} MiB, {disconnects} disconnects");
    assert_eq!(disconnects, 0, "{}", engine.log());
    assert!(rss < 256.0, "peak RSS {rss:.1} MiB");
}

// ---------------------------------------------------------------------------
// 7. Probes don't compete with writes
// ---------------------------------------------------------------------------

/// Requests `/ready` and `/health` as fast as 8 clients pacing 8 ms can
/// until stopped; returns the answers and those that were not a healthy
/// 200.
fn hammer(
    port: u16,
) -> (
    tokio::sync::watch::Sender<bool>,
    tokio::task::JoinHandle<(u64, Vec<String>)>,
) {
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(async move {
        let clients = (0..8).map(|i| {
            let mut stopped = stopped.clone();
            async move {
                let http = reqwest::Client::new();
                let path = if i % 2 == 0 { "ready" } else { "health" };
                let url = format!("http://127.0.0.1:{port}/{path}");
                let (mut answered, mut unhealthy) = (0u64, Vec::new());
                while !*stopped.borrow() {
                    match http.get(&url).send().await {
                        Ok(r) if r.status() == 200 => answered += 1,
                        Ok(r) => unhealthy.push(format!("{path}: {}", r.status())),
                        Err(e) => unhealthy.push(format!("{path}: {e}")),
                    }
                    tokio::select! {
                        _ = stopped.changed() => {}
                        _ = tokio::time::sleep(Duration::from_millis(8)) => {}
                    }
                }
                (answered, unhealthy)
            }
        });
        futures::future::join_all(clients).await.into_iter().fold(
            (0, Vec::new()),
            |(n, mut bad), (m, more)| {
                bad.extend(more);
                (n + m, bad)
            },
        )
    });
    (stop, task)
}

/// Probes never take a connection from the write pool: with `pool_size: 1`
/// and that connection held by a batch waiting on a row lock, `/ready`
/// still finds the database up on its own connection (a probe waiting for
/// the pool would give up after its 2 s timeout and answer 503) while 8
/// clients hammer `/ready` and `/health`; once the lock is released the
/// batch is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_answer_while_the_only_write_connection_is_taken() {
    let env = TestEnv::new().await;
    env.write_pipeline(
        "tiktok.yaml",
        &with_sink_settings(&env, "    pool_size: 1\n"),
    );
    let engine = started(&env).await;
    let blocker = block_event(&env, "slow").await;
    env.publish_event(&event("slow")).await;
    wait_for("the slow batch to wait", DEADLINE, || {
        engine_waits_on_a_lock(&env)
    })
    .await;
    let (stop, probes) = hammer(engine.port);
    let up = serde_json::json!({"status": "ok", "checks": {"database": "up", "nats": "up"}});
    // Longer than a probe's cached answer (0.5 s) and its timeout (2 s).
    assert_holds("/ready healthy", Duration::from_secs(3), || async {
        let ready = engine.try_get("/ready").await?;
        expect_eq((ready.status, ready.json()), (200, up.clone()))
    })
    .await;
    engine_waits_on_a_lock(&env)
        .await
        .expect("the write connection was taken throughout");
    let _ = stop.send(true);
    let (answered, unhealthy) = probes.await.expect("hammer");
    eprintln!("probes while the write pool was taken: {answered} answered");
    assert!(unhealthy.is_empty(), "unhealthy answers: {unhealthy:?}");
    assert!(answered > 0, "no probe was answered");
    blocker.rollback().await.expect("release the row");
    wait_for("the slow event stored", DEADLINE, || async {
        expect_eq(
            stored_ids(&env).await,
            vec!["first".to_string(), "slow".to_string()],
        )
    })
    .await;
}

/// Holds a row of eventId `event_id` in an open transaction: the engine's
/// insert of that event waits for it (a slow batch), nothing else does.
async fn block_event(env: &TestEnv, event_id: &str) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut tx = env.db.begin().await.expect("begin");
    sqlx::query(
        r#"INSERT INTO "TiktokEvent" ("id", "eventId", "timestamp", "funnelStage", "eventType", "data")
           VALUES ('blocker', $1, now(), 'top', 'video.view', '{}')"#,
    )
    .bind(event_id)
    .execute(&mut *tx)
    .await
    .expect("hold the row");
    tx
}

/// Four reloads in quick succession while a batch waits on a row lock:
/// each reload takes effect at once (the replaced versions finish in the
/// background), the pull requests handed down the chain of versions are
/// all read, and every event is stored once without a redelivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn back_to_back_reloads_during_a_slow_batch_lose_no_pull_request() {
    let env = TestEnv::new().await;
    let engine = started(&env).await;
    let bus = Bus::shared(&env);
    let blocker = block_event(&env, "slow").await;
    env.publish_event(&event("slow")).await;
    wait_for("the slow batch to wait", DEADLINE, || {
        engine_waits_on_a_lock(&env)
    })
    .await;
    let mut ids = vec!["first".to_string(), "slow".to_string()];
    let yaml = env.tiktok_pipeline();
    let began = std::time::Instant::now();
    for round in 0..4 {
        let round_ids = event_ids(&format!("r{round}"), 25);
        bus.publish_events(&round_ids).await;
        ids.extend(round_ids);
        let before = reload::status(&engine, "tiktok.yaml").await;
        env.write_pipeline("tiktok.yaml", &reload::revision(&yaml, &round.to_string()));
        reload::wait_new_version(&engine, "tiktok.yaml", &before).await;
    }
    eprintln!("4 reloads during a slow batch took {:?}", began.elapsed());
    engine_waits_on_a_lock(&env)
        .await
        .expect("the reloads took effect while the slow batch still waited");
    blocker.rollback().await.expect("release the row");
    ids.sort();
    wait_for("every event stored once", DEADLINE, || async {
        expect_eq(stored_ids(&env).await, ids.clone())
    })
    .await;
    let info = bus.wait_all_acked(DEADLINE).await;
    assert_eq!(redeliveries(&info), 0, "{info:?}");
}

/// A reload while the database is down fails (the running version stays)
/// and costs the held event no delivery attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_during_a_database_outage_costs_no_delivery_attempt() {
    let env = TestEnv::new().await;
    let (mut proxy, engine) = env.engine_behind_proxy().await;
    reload::assert_stores(&env, "first").await;
    proxy.stop().await;
    env.publish_event(&event("held")).await;
    engine.wait_metric_at_least(SINK_RETRIES, &[], 1.0).await;
    env.write_pipeline(
        "tiktok.yaml",
        &reload::revision(&env.tiktok_pipeline(), "outage"),
    );
    let failed = reload::wait_status(&engine, "tiktok.yaml", "a failed reload", |s| {
        s.last_error
            .as_deref()
            .is_some_and(|e| e.contains("cannot connect to Postgres"))
    })
    .await;
    assert_eq!(
        failed.state,
        reload::PipelineState::Retrying,
        "the running version holds the event"
    );
    proxy.start().await;
    env.wait_row("held").await;
    let info = env.wait_all_acked().await;
    assert_eq!(redeliveries(&info), 0, "{info:?}");
}
