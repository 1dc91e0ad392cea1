//! Helpers of the exactly-once suite (`tests/it/exactly_once.rs`): the
//! counter pipeline (an upsert that adds one per event, which
//! every redelivery would count again), its events, its counters and the
//! ledger.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::json;

use crate::harness::faults::Bus;
use crate::harness::{
    expect_eq, ingestd_bin, nats_source, publish_windowed, run_to_exit, wait_for, TestEnv,
};

/// The subject (under the test's prefix) the counter events go to.
pub const COUNTER_SUBJECT: &str = "counter.add";

/// Short, so that what a killed engine held comes back soon.
pub const ACK_WAIT: &str = "3s";

/// The counter pipeline on `bus`'s stream and durable, with or without
/// `exactly_once`. Small batches, two in flight: many transactions for the
/// faults to fall between.
pub fn counter_pipeline(bus: &Bus, exactly_once: bool) -> String {
    format!(
        r#"name: counters
{source}sink:
  postgres:
    exactly_once: {exactly_once}
    insert: |
      INSERT INTO counters (k, n) VALUES ({{{{ event.k }}}}, 1)
      ON CONFLICT (k) DO UPDATE SET n = counters.n + 1
    batch:
      max_rows: 50
      max_in_flight: 2
on_error:
  invalid:
    action: ack
"#,
        source = nats_source(
            &bus.stream,
            &bus.subject_prefix,
            &bus.durable,
            "counter.>",
            ACK_WAIT
        ),
    )
}

/// Creates the counters table and writes the counter pipeline as the
/// test's only pipeline file; returns its path.
pub async fn prepare_counters(env: &TestEnv, bus: &Bus, exactly_once: bool) -> PathBuf {
    env.exec("CREATE TABLE counters (k int PRIMARY KEY, n bigint NOT NULL)")
        .await;
    std::fs::remove_file(env.pipelines_dir().join("tiktok.yaml")).expect("remove tiktok.yaml");
    env.write_pipeline("counters.yaml", &counter_pipeline(bus, exactly_once))
}

/// A test environment on the shared NATS with its stream, the counters
/// table and the counter pipeline with `exactly_once` (its path returned).
pub async fn counters_on_the_shared_server() -> (TestEnv, Bus, PathBuf) {
    let env = TestEnv::new().await;
    let bus = Bus::shared(&env);
    bus.create_stream().await;
    let file = prepare_counters(&env, &bus, true).await;
    (env, bus, file)
}

/// Publishes `events` counter events over `keys` keys (event i adds one to
/// key i % keys); returns how many each key must count.
pub async fn publish_counts(bus: &Bus, events: usize, keys: usize) -> BTreeMap<i32, i64> {
    let subject = bus.subject(COUNTER_SUBJECT);
    let messages: Vec<_> = (0..events)
        .map(|i| {
            let body = serde_json::to_vec(&json!({ "k": i % keys })).expect("serialize");
            (subject.clone(), body)
        })
        .collect();
    publish_windowed(&bus.js, 500, messages).await;
    let mut want = BTreeMap::new();
    for i in 0..events {
        *want.entry((i % keys) as i32).or_default() += 1;
    }
    want
}

/// Each key's counter.
pub async fn try_counters(env: &TestEnv) -> Result<BTreeMap<i32, i64>, String> {
    let rows: Vec<(i32, i64)> = sqlx::query_as("SELECT k, n FROM counters")
        .fetch_all(&env.db)
        .await
        .map_err(|e| e.to_string())?;
    Ok(rows.into_iter().collect())
}

/// The sum of the counters.
pub async fn try_counted(env: &TestEnv) -> Result<i64, String> {
    Ok(try_counters(env).await?.values().sum())
}

/// Waits until the counters add up to at least `min`; returns the sum.
pub async fn wait_counted_at_least(env: &TestEnv, min: i64, timeout: Duration) -> i64 {
    wait_for(
        &format!("counters summing to {min} or more"),
        timeout,
        || async {
            let n = try_counted(env).await?;
            (n >= min).then_some(n).ok_or(format!("{n} counted"))
        },
    )
    .await
}

/// Waits until the counters are exactly `want`.
pub async fn wait_counters(env: &TestEnv, want: &BTreeMap<i32, i64>, timeout: Duration) {
    wait_for("every counter at its number of events", timeout, || async {
        let have = try_counters(env).await?;
        let off: Vec<_> = want
            .iter()
            .filter(|(k, n)| have.get(k) != Some(n))
            .map(|(k, n)| (k, n, have.get(k).copied()))
            .take(5)
            .collect();
        expect_eq(off, Vec::new())
    })
    .await
}

/// The ledger's entries of the test's stream and durable, by sequence.
pub async fn ledger(env: &TestEnv, bus: &Bus) -> BTreeMap<i64, String> {
    let rows: Vec<(i64, String)> = sqlx::query_as(
        "SELECT seq, outcome FROM ingestd_ledger WHERE stream = $1 AND durable = $2",
    )
    .bind(&bus.stream)
    .bind(&bus.durable)
    .fetch_all(&env.db)
    .await
    .expect("read the ledger");
    rows.into_iter().collect()
}

/// Runs `ingestd ARGS` (a one-shot command) against `bus`'s server and
/// the test's database; returns its exit code and output.
pub async fn ingestd(env: &TestEnv, bus: &Bus, args: &[&str]) -> (i32, String, String) {
    let vars = BTreeMap::from([
        ("NATS_URL".to_owned(), bus.url.clone()),
        ("DATABASE_URL".to_owned(), env.database_url()),
    ]);
    let out = run_to_exit(ingestd_bin(), args, &vars, &env.fresh_dir("cmd")).await;
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
