//! Throughput and scale: the batching write path and horizontal scale-out.
//!
//! Each test publishes a backlog *before* starting the engine, so that the
//! engine meets full pull requests and writes full batches, then checks
//! what the batching promises: one statement and one commit per batch,
//! row-level failures isolated without sinking their batch, idempotent
//! duplicates, work shared by processes on one durable consumer, and a
//! bounded number of messages held.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::harness::batching::*;
use crate::harness::*;
use serde_json::{json, Value};

/// Deadline of a drain: the backlogs are larger than the contract tests'
/// single events, and CI runs the suites side by side on two cores.
const DRAIN_DEADLINE: Duration = Duration::from_secs(60);

/// The eventIds `prefix-0` .. `prefix-(n-1)`.
fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

/// One valid event per eventId, in order.
fn events<'a>(ids: impl IntoIterator<Item = &'a String> + 'a) -> impl Iterator<Item = Value> + 'a {
    ids.into_iter().map(|id| top_event(id))
}

/// 1. Events that pass the schema but that the database refuses (a CHECK
/// constraint: class 23; a year Postgres cannot hold: class 22; a NUL
/// character, caught before sending) are spread through a backlog of valid
/// ones. Each is rejected on its own; every valid row of their batches is
/// committed, and each batch still commits once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_level_failures_do_not_sink_their_batch() {
    let env = TestEnv::new().await;
    prepare_table(
        &env,
        r#"ALTER TABLE "TiktokEvent"
           ADD CONSTRAINT "no_rejects" CHECK ("eventId" NOT LIKE 'reject-%')"#,
    )
    .await;
    let mut year_zero = top_event("year-zero");
    year_zero["timestamp"] = json!("0000-01-01T00:00:00Z");
    let mut nul = top_event("nul");
    nul["data"]["user"]["username"] = json!("a\u{0}b");
    let bad = [
        top_event("reject-1"),
        year_zero,
        nul,
        top_event("reject-2"),
        top_event("reject-3"),
    ];
    let valid = ids("ok", 500);
    // One bad event in the middle of every hundred valid ones.
    let backlog = valid.iter().enumerate().flat_map(|(i, id)| {
        let bad_here = (i % 100 == 50).then(|| bad[i / 100].clone());
        bad_here.into_iter().chain([top_event(id)])
    });
    let total = publish_backlog(&env, backlog).await;
    assert_eq!(total, 505);

    let engine = env.engine().start().await;
    wait_processed(&[&engine], 500.0, DRAIN_DEADLINE).await;
    let info = wait_drained(&env, total, DRAIN_DEADLINE).await;
    assert_delivered_once(&info, total);
    let metrics = engine.wait_metric(FAILED, VALIDATION_ERROR, 5.0).await;
    assert_eq!(metrics.sum(PROCESSED, &[]), 500.0);
    assert_eq!(metrics.sum(FAILED, &[]), 5.0, "only validation errors");

    assert_stored_exactly(&env, &valid).await;
    // Each refused event's log line names it by its eventId (`log.event_id`,
    // logged as `event_id=Some("…")`).
    let log = engine.log();
    for id in ["reject-1", "year-zero", "nul", "reject-3"] {
        let named = format!("event_id=Some(\"{id}\")");
        assert!(
            log.lines()
                .any(|l| l.contains("invalid event") && l.contains(&named)),
            "no `invalid event` line has {named}:\n{log}"
        );
    }
    // The bad rows are found in one second attempt of their batch, which
    // commits the rest: one transaction per batch, however many bad rows.
    let (commits, _) = transactions(&env).await;
    eprintln!("500 valid rows among 5 bad ones committed in {commits} transactions");
    assert!(
        commits <= 10,
        "{commits} transactions wrote the 500 valid rows: the bad rows were not isolated in one attempt"
    );
}

/// 2. A backlog is written in few large transactions: far fewer commits
/// than rows, and no transaction larger than `max_rows`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_is_written_in_few_large_transactions() {
    const ROWS: i64 = 5_000;
    const MAX_ROWS: i64 = 1_000; // tiktok.yaml's batch.max_rows
    let env = TestEnv::new().await;
    prepare_table(&env, "").await;
    let stored = ids("b", ROWS as usize);
    let total = publish_backlog(&env, events(&stored)).await;

    let engine = env.engine().start().await;
    wait_processed(&[&engine], ROWS as f64, DRAIN_DEADLINE).await;
    let info = wait_drained(&env, total, DRAIN_DEADLINE).await;
    assert_delivered_once(&info, total);
    assert_stored_exactly(&env, &stored).await;

    let (commits, largest) = transactions(&env).await;
    eprintln!("{ROWS} rows in {commits} transactions, the largest of {largest} rows");
    assert!(
        commits * 20 <= ROWS,
        "{ROWS} rows took {commits} transactions: not batched"
    );
    assert!(
        largest <= MAX_ROWS,
        "one transaction wrote {largest} rows, above max_rows {MAX_ROWS}"
    );
}

/// 2b. A backlog fills its batches although they would not wait, over a
/// slow link: with `max_wait: 0ms` a batch would hold only what had
/// arrived with its first event (a few messages of each trickling pull
/// request). JetStream reports more pending with each delivery, so the
/// engine keeps filling; the backlog takes as many transactions as it has
/// full batches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_fills_batches_that_would_not_wait() {
    const ROWS: usize = 1_000;
    const MAX_ROWS: usize = 100;
    let env = TestEnv::new().await;
    let yaml = adapt_pipeline(
        &env.tiktok_pipeline(),
        &[
            (SHIPPED_MAX_ROWS.to_owned(), format!("max_rows: {MAX_ROWS}")),
            (SHIPPED_MAX_WAIT.to_owned(), "max_wait: 0ms".to_owned()),
        ],
    );
    env.write_pipeline("tiktok.yaml", &yaml);
    prepare_table(&env, "").await;
    let stored = ids("f", ROWS);
    let total = publish_backlog(&env, events(&stored)).await;

    // About 8 KB every 2 ms: a pull request of 100 events (about 80 KB)
    // arrives over some 20 ms, well within the 60 ms a batch may fill.
    let nats = TcpProxy::to_nats().await;
    nats.pace(Some(Pace {
        bytes: 8 * 1024,
        pause: Duration::from_millis(2),
    }));
    let engine = env.engine().var("NATS_URL", nats.nats_url()).start().await;
    wait_processed(&[&engine], ROWS as f64, DRAIN_DEADLINE).await;
    wait_drained(&env, total, DRAIN_DEADLINE).await;
    assert_stored_exactly(&env, &stored).await;

    let (commits, largest) = transactions(&env).await;
    eprintln!("{ROWS} rows in {commits} transactions, the largest of {largest} rows");
    assert_eq!(largest as usize, MAX_ROWS);
    // Under load a batch may now and then be cut at 60 ms; cut by
    // `max_wait`, nearly all of them would be.
    assert!(
        commits as usize <= ROWS / MAX_ROWS + 2,
        "{ROWS} rows took {commits} transactions: batches of a backlog were cut short"
    );
}

/// 3. Duplicates (same eventId) are stored once and each copy is acked and
/// counted as processed: copies side by side (one batch), copies further
/// apart than a batch, and copies published again after the drain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_within_and_across_batches_are_idempotent() {
    let env = TestEnv::new().await;
    Batch {
        max_rows: 100,
        max_in_flight: 2,
        max_ack_pending: None,
    }
    .apply(&env);
    let unique = ids("dup", 300);
    let (adjacent, apart) = unique.split_at(150);
    // a a b b ... then x y z ... x y z: 150 messages separate the copies of
    // the second half, more than a batch of 100.
    let backlog = adjacent
        .iter()
        .flat_map(|id| [id, id])
        .chain(apart)
        .chain(apart);
    let first = publish_backlog(&env, events(backlog)).await;
    assert_eq!(first, 600);

    let engine = env.engine().start().await;
    wait_processed(&[&engine], 600.0, DRAIN_DEADLINE).await;
    wait_drained(&env, first, DRAIN_DEADLINE).await;
    assert_stored_exactly(&env, &unique).await;
    let before = row_ids_by_event(&env).await;

    // Again, after the drain: 50 of each kind.
    let again = adjacent[..50].iter().chain(&apart[..50]);
    let total = first + publish_backlog(&env, events(again)).await;
    wait_processed(&[&engine], 700.0, DRAIN_DEADLINE).await;
    let info = wait_drained(&env, total, DRAIN_DEADLINE).await;
    assert_delivered_once(&info, total);
    assert_eq!(engine.metrics().await.sum(FAILED, &[]), 0.0);
    assert_eq!(
        row_ids_by_event(&env).await,
        before,
        "rows changed when their duplicates arrived"
    );
}

/// eventId → id of every stored row: a row replaced or inserted twice
/// changes it (the id is a fresh cuid per insert).
async fn row_ids_by_event(env: &TestEnv) -> BTreeMap<String, String> {
    env.rows()
        .await
        .into_iter()
        .map(|r| (r.event_id, r.id))
        .collect()
}

/// 4. Three processes on one pipeline file (one durable consumer) drain a
/// backlog together: every event stored once, and each process did part
/// of the work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_share_one_durable_consumer() {
    let env = TestEnv::new().await;
    let stored = ids("s", 30_000);
    let total = publish_backlog(&env, events(&stored)).await;

    // Spawned together, so that none drains the backlog before the others
    // are up; each gets its own HTTP port from the builder.
    let engines: Vec<Engine> = (0..3).map(|_| env.engine().spawn()).collect();
    for engine in &engines {
        engine.wait_ready().await;
    }
    let engines: Vec<&Engine> = engines.iter().collect();
    let info = wait_drained(&env, total, DRAIN_DEADLINE).await;
    let redelivered = info.delivered.consumer_sequence - total;
    let want = (total + redelivered) as f64;
    let counts = wait_processed(&engines, want, DRAIN_DEADLINE).await;
    eprintln!("processed per process: {counts:?}; redeliveries: {redelivered}");

    assert_stored_exactly(&env, &stored).await;
    assert!(
        counts.iter().all(|&n| n > 0.0),
        "a process did no work: {counts:?}"
    );
    // Every delivery is processed once (a redelivered duplicate is acked
    // and counted too); with no redelivery that is exactly one per event.
    assert_eq!(
        redelivered, 0,
        "{redelivered} redeliveries within the ack wait; processed per process {counts:?}"
    );
}

/// 5. With `max_ack_pending` lifted far above it, the consumer never has
/// more messages out than one process may hold, `max_rows × (max_in_flight
/// + 2)`: the engine, not the server, keeps the bound. Writes are slowed
/// down so that the engine is always waiting on the database with as much
/// as it allows itself to hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_messages_stay_within_the_configured_bound() {
    let env = TestEnv::new().await;
    let batch = Batch {
        max_rows: 100,
        max_in_flight: 2,
        max_ack_pending: Some(100_000),
    };
    batch.apply(&env);
    prepare_table(
        &env,
        r#"CREATE FUNCTION slow_insert() RETURNS trigger LANGUAGE plpgsql AS
               $$ BEGIN PERFORM pg_sleep(0.004); RETURN NULL; END $$;
           CREATE TRIGGER slow_insert BEFORE INSERT ON "TiktokEvent"
               FOR EACH STATEMENT EXECUTE FUNCTION slow_insert();"#,
    )
    .await;
    let stored = ids("m", 5_000);
    let total = publish_backlog(&env, events(&stored)).await;

    let engine = env.engine().spawn();
    let info = env.wait_consumer().await;
    assert_eq!(
        info.config.max_ack_pending, 100_000,
        "the server would enforce the bound itself"
    );
    let peak = peak_ack_pending_until_drained(&env, total, DRAIN_DEADLINE).await;
    let bound = batch.server_view_bound();
    eprintln!("peak num_ack_pending {peak}, bound {bound}");
    assert!(peak > 0, "the drain was not observed");
    assert!(
        peak <= bound,
        "the engine held {peak} messages, above max_rows × (max_in_flight + 2) = {} \
         plus one batch of acks the server may not have counted yet",
        batch.capacity()
    );
    wait_processed(&[&engine], total as f64, DRAIN_DEADLINE).await;
    assert_stored_exactly(&env, &stored).await;
}
