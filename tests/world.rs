//! The world changing under a running engine: consumers and streams
//! deleted or replaced, pipeline files renamed or swapped, servers that stop
//! answering, hostile label values. Every test runs the engine binary
//! against the machine's NATS and PostgreSQL (or processes it starts
//! itself: a TCP proxy, a NATS server).

mod common;
#[path = "common/faults.rs"]
mod faults;
#[path = "common/reload.rs"]
mod reload;

use std::time::Duration;

use async_nats::jetstream::stream;
use common::*;
use faults::*;

const SOURCE_FAILURES: &str = "ingestd_pipeline_failures_total";

/// `/ready`'s status code now.
async fn ready_status(engine: &Engine) -> u16 {
    engine.get("/ready").await.status
}

/// How many lines of the engine's log contain `needle`.
fn log_lines(engine: &Engine, needle: &str) -> usize {
    engine.log().lines().filter(|l| l.contains(needle)).count()
}

// ---------------------------------------------------------------------------
// 1. Consumers and streams are watched, not assumed
// ---------------------------------------------------------------------------

/// `nats consumer rm` under a running engine: the pull errors are noticed,
/// reported once, the consumer is recreated and storing continues.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_consumer_is_recreated_and_storing_continues() {
    let env = TestEnv::new().await;
    let engine = env.engine().start().await;
    env.publish_event(&event("before")).await;
    env.wait_row("before").await;
    let stream = env.js.get_stream(&env.stream).await.expect("stream");
    stream.delete_consumer(&env.durable).await.expect("delete");
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
    assert_eq!(log_lines(&engine, "cannot pull"), 1, "{}", engine.log());
    assert_eq!(log_lines(&engine, "pulling again"), 1, "{}", engine.log());
}

/// The stream deleted and recreated by someone else with subjects that do
/// not cover the pipeline's filter: the consumer cannot be recreated, so the
/// pipeline is failing (503, `/pipelines`, metric) and retries with backoff
/// rather than hot; once the stream is gone again, the engine recreates
/// both and stores what is published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaced_stream_fails_the_pipeline_with_backoff_until_repaired() {
    let env = TestEnv::new().await;
    let engine = env.engine().start().await;
    env.publish_event(&event("before")).await;
    env.wait_row("before").await;
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
    let failures = |m: &Metrics| m.sum(SOURCE_FAILURES, &[("side", "source")]);
    let first = failures(&engine.metrics().await);
    let logged = log_lines(&engine, "cannot pull");
    let window = Duration::from_secs(4);
    tokio::time::sleep(window).await; // the property is a rate over time
    let later = failures(&engine.metrics().await);
    assert!(
        later - first <= 10.0,
        "{} failed pulls in {window:?}: a rejected pull loops hot",
        later - first
    );
    assert!(failures(&engine.metrics().await) > first, "no retry at all");
    assert_eq!(
        log_lines(&engine, "cannot pull"),
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
