//! A panic in any stage surfaces and passes: injected through the engine's
//! test hook (`INGESTD_TEST_PANIC=<point>` panics once, on the first event
//! whose payload carries the marker), it shows as the pipeline's `failing`
//! problem in `/pipelines` and `/ready`, and the pipeline recovers by
//! itself: every event is stored (or dead-lettered) in the end and the
//! problem clears. Before, a panicking task vanished and `/pipelines` went
//! on saying `running`.

use std::time::Duration;

use crate::harness::faults::*;
use crate::harness::*;
use async_nats::HeaderMap;

/// What a panicking task held comes back after this.
const ACK_WAIT: Duration = Duration::from_secs(2);
/// The payload bytes that arm the hook (the engine's `testhook::MARKER`).
const MARKER: &str = "ingestd-test-panic";

/// Waits until `/pipelines` shows the panic on `side` and `/ready` is 503.
async fn wait_panic_shown(engine: &Engine, side: &str) {
    wait_for("the panic shown as failing", DEADLINE, || async {
        let status = engine.try_pipeline_status().await?;
        let problem = &status["problem"];
        expect_eq(problem["side"].as_str(), Some(side))
            .map_err(|e| format!("side {e}: {status}"))?;
        expect_eq(problem["severity"].as_str(), Some("failing"))?;
        let error = problem["error"].as_str().unwrap_or_default();
        if !error.contains("panicked") {
            return Err(format!("problem {error:?}"));
        }
        let ready = engine.try_get("/ready").await?;
        expect_eq(ready.status, 503).map_err(|e| format!("/ready {e}"))
    })
    .await;
}

/// Waits until the problem has cleared and `/ready` answers 200.
async fn wait_recovered(engine: &Engine) {
    wait_for("the pipeline recovered", DEADLINE, || async {
        let status = engine.try_pipeline_status().await?;
        if !status["problem"].is_null() {
            return Err(format!("problem left: {status}"));
        }
        expect_eq(status["state"].as_str(), Some("running"))?;
        let ready = engine.try_get("/ready").await?;
        expect_eq(ready.status, 200).map_err(|e| format!("/ready {e}"))
    })
    .await;
}

/// A panic at `point` while a marked valid event and others flow.
async fn panic_in_a_stage_of_valid_events(point: &str, side: &str) {
    let env = TestEnv::new().await;
    Variant::of(&env).ack_wait(ACK_WAIT).write(&env);
    let engine = env.engine().var("INGESTD_TEST_PANIC", point).start().await;
    let mut ids = event_ids("before", 5);
    let marked = format!("{MARKER}-{point}");
    ids.push(marked.clone());
    ids.extend(event_ids("after", 5));
    for id in &ids {
        env.publish_event(&event(id)).await;
    }
    wait_panic_shown(&engine, side).await;
    let n = ids.len() as i64;
    wait_for(&format!("{n} rows"), DEADLINE, || async {
        expect_eq(env.try_count(TIKTOK_TABLE).await?, n)
    })
    .await;
    ids.sort();
    assert_stored_exactly(&env, &ids).await;
    wait_recovered(&engine).await;
    assert!(
        engine.log().contains("panicked"),
        "the panic is logged:\n{}",
        engine.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_the_pipelines_loop_surfaces_and_the_loop_restarts() {
    panic_in_a_stage_of_valid_events("prepare", "source").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_a_writer_surfaces_and_the_batch_comes_back() {
    panic_in_a_stage_of_valid_events("write", "sink").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_the_dead_letter_stage_surfaces_and_the_letter_comes_back() {
    let (env, bus, dlq) = with_dead_letters(|v| v.ack_wait(ACK_WAIT)).await;
    let engine = bus
        .start(env.engine().var("INGESTD_TEST_PANIC", "dead_letter"))
        .await;
    let marked = format!("{{\"eventId\": \"{MARKER}\"}}").into_bytes();
    let seq = bus.publish(TOP_VIEW, HeaderMap::new(), marked).await;
    wait_panic_shown(&engine, "dead_letters").await;
    bus.publish(TOP_VIEW, HeaderMap::new(), to_bytes(&event("valid")))
        .await;
    env.wait_row("valid").await;
    let letters = dlq.wait_letters(1).await;
    assert_eq!(
        letters[0].header("Ingestd-Stream-Sequence"),
        seq.to_string()
    );
    wait_recovered(&engine).await;
}
