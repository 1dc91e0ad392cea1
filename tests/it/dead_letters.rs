//! Dead letters on their failure paths: a dead-letter stream that refuses
//! letters, and max-deliveries advisories published while no engine runs.
//! Each checks the rows, the consumer's state, the letters, `/ready` and
//! `/pipelines`.

use std::time::Duration;

use crate::harness::faults::*;
use crate::harness::*;
use async_nats::jetstream::AckKind;
use async_nats::HeaderMap;
use serde_json::Value;

/// Short enough that letters not kept alive would come back within the
/// window the tests watch.
const ACK_WAIT: Duration = Duration::from_secs(3);
/// Longer than two ack waits: a held letter not kept alive by progress
/// acks would be redelivered within it.
const KEEPALIVE_WINDOW: Duration = Duration::from_secs(7);

/// An event the schema refuses (reason `schema`).
fn invalid_event(id: &str) -> Vec<u8> {
    let mut e = example_event("invalid-bad-enum.json");
    e["eventId"] = Value::String(id.into());
    to_bytes(&e)
}

fn assert_max_deliver_letter(letter: &DeadLetter, seq: u64) {
    assert_eq!(letter.header("Ingestd-Reason"), "max_deliver");
    assert_eq!(letter.header("Ingestd-Stream-Sequence"), seq.to_string());
}

/// One pull request from the durable, as a peer would, expected to find
/// nothing to deliver.
async fn pull_once(bus: &Bus) {
    let consumer: async_nats::jetstream::consumer::PullConsumer = bus
        .js
        .get_stream(&bus.stream)
        .await
        .expect("get stream")
        .get_consumer(&bus.durable)
        .await
        .expect("get consumer");
    let mut batch = consumer
        .batch()
        .max_messages(1)
        .expires(Duration::from_secs(1))
        .messages()
        .await
        .expect("fetch");
    use futures::StreamExt;
    let drained = tokio::time::timeout(DEADLINE, async {
        while let Some(m) = batch.next().await {
            assert!(m.is_err(), "nothing is deliverable, got a message");
        }
    });
    drained.await.expect("the pull request ends");
}

/// Waits until `/pipelines` shows the refused letters and `/ready` is 503.
async fn wait_letters_refused_shown(engine: &Engine) {
    wait_for(
        "refused dead letters in /pipelines and /ready",
        DEADLINE,
        || async {
            let status = engine.try_pipeline_status().await?;
            expect_eq(status["problem"]["side"].as_str(), Some("dead_letters"))
                .map_err(|e| format!("problem side {e} in {status}"))?;
            let ready = engine.try_get("/ready").await?;
            expect_eq(ready.status, 503).map_err(|e| format!("/ready {e}"))
        },
    )
    .await;
}

/// While JetStream refuses every dead letter (its stream deleted), valid
/// events go on being stored and acknowledged; the invalid ones wait, kept
/// alive, and each is dead-lettered once the stream is back. Before, the
/// policy ran inline and a refused letter held its whole batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_dead_letters_hold_back_only_themselves() {
    const VALID: usize = 1_000;
    const INVALID: usize = 10;
    let (env, bus, dlq) = with_dead_letters(|v| v.ack_wait(ACK_WAIT)).await;
    let engine = bus.start(env.engine()).await;
    bus.js
        .delete_stream(&dlq.stream)
        .await
        .expect("delete the dead-letter stream");

    let mut valid = event_ids("valid", VALID);
    for (n, chunk) in valid.chunks(VALID / INVALID).enumerate() {
        bus.publish_events(chunk).await;
        bus.publish(
            TOP_VIEW,
            HeaderMap::new(),
            invalid_event(&format!("bad-{n}")),
        )
        .await;
    }
    // Every valid event is stored while the letters are still refused.
    let n = VALID as i64;
    wait_for(&format!("{n} rows"), DEADLINE, || async {
        expect_eq(env.try_count(TIKTOK_TABLE).await?, n)
    })
    .await;
    wait_letters_refused_shown(&engine).await;
    wait_for("only the letters held", DEADLINE, || async {
        expect_eq(bus.try_consumer_info().await?.num_ack_pending, INVALID)
    })
    .await;
    assert_holds(
        "held letters kept alive: nothing redelivered while refused",
        KEEPALIVE_WINDOW,
        || async { expect_eq(redeliveries(&bus.try_consumer_info().await?), 0) },
    )
    .await;
    assert!(
        bus.js.get_stream(&dlq.stream).await.is_err(),
        "the dead-letter stream stayed deleted"
    );

    dlq.create_stream().await;
    let letters = dlq.wait_letters(INVALID as u64).await;
    for letter in &letters {
        assert_eq!(letter.header("Ingestd-Reason"), "schema");
    }
    engine.wait_ok("/ready", DEADLINE, POLL_INTERVAL).await;
    let info = bus.wait_all_acked(DEADLINE).await;
    assert_eq!(redeliveries(&info), 0, "nothing delivered twice");
    valid.sort();
    assert_stored_exactly(&env, &valid).await;
    let m = wait_settled(&engine, VALID as f64).await;
    assert_eq!(m.sum(FAILED, VALIDATION_ERROR), INVALID as f64);
    let status = engine.try_pipeline_status().await.expect("/pipelines");
    assert!(status["problem"].is_null(), "problem left: {status}");
}

/// Messages a peer took on their last allowed delivery and gave back (a
/// process that died with them): one while no engine ran, one while the
/// dead-letter stream was gone. Both are dead-lettered once possible: the
/// engine keeps the server's advisories in a stream of its own and
/// acknowledges each only once its letter is confirmed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_deliver_letters_survive_an_absent_engine_and_a_refusal() {
    let (env, bus, dlq) = with_dead_letters(|v| v.max_deliver(1)).await;
    // The engine creates the stream, the consumer and its advisory stream.
    let engine = bus.start(env.engine()).await;
    assert!(engine.terminate().await.success());

    let away = bus
        .publish(TOP_VIEW, HeaderMap::new(), to_bytes(&event("away")))
        .await;
    let refused = bus
        .publish(TOP_VIEW, HeaderMap::new(), to_bytes(&event("refused")))
        .await;
    let first = bus.take_one().await;
    let second = bus.take_one().await;
    first.ack_with(AckKind::Nak(None)).await.expect("nak");
    // The server announces a message it gives up on when it next looks for
    // one to deliver: a peer's pull request, while no engine listens.
    pull_once(&bus).await;

    let engine = bus.start(env.engine()).await;
    let letters = dlq.wait_letters(1).await;
    assert_max_deliver_letter(&letters[0], away);

    bus.js
        .delete_stream(&dlq.stream)
        .await
        .expect("delete the dead-letter stream");
    second.ack_with(AckKind::Nak(None)).await.expect("nak");
    wait_letters_refused_shown(&engine).await;
    dlq.create_stream().await;
    let letters = dlq.wait_letters(1).await;
    assert_max_deliver_letter(&letters[0], refused);
    engine.wait_ok("/ready", DEADLINE, POLL_INTERVAL).await;
    wait_for("the kept advisories acknowledged", DEADLINE, || async {
        let mut stream = bus
            .js
            .get_stream(&dlq.advisories)
            .await
            .map_err(|e| e.to_string())?;
        let info = stream.info().await.map_err(|e| e.to_string())?;
        expect_eq(info.state.messages, 0)
    })
    .await;
    assert_stored_exactly(&env, &[]).await;
}

/// With the exactly-once ledger, a message JetStream gave up on (announced
/// by its max-deliveries advisory) is recorded as dead-lettered with its
/// letter, so `ingestd audit` does not count it missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_deliver_letters_are_recorded_in_the_ledger() {
    let (env, bus, dlq) = with_dead_letters(|v| v.max_deliver(1).exactly_once()).await;
    // The engine creates the stream, the consumer, the advisory stream and
    // the ledger.
    let engine = bus.start(env.engine()).await;
    assert!(engine.terminate().await.success());
    let seq = bus
        .publish(TOP_VIEW, HeaderMap::new(), to_bytes(&event("away")))
        .await;
    let taken = bus.take_one().await;
    taken.ack_with(AckKind::Nak(None)).await.expect("nak");
    pull_once(&bus).await;

    let _engine = bus.start(env.engine()).await;
    let letters = dlq.wait_letters(1).await;
    assert_max_deliver_letter(&letters[0], seq);
    wait_for("the letter's message in the ledger", DEADLINE, || async {
        let outcome: Option<String> =
            sqlx::query_scalar("SELECT outcome FROM ingestd_ledger WHERE seq = $1")
                .bind(seq as i64)
                .fetch_optional(&env.db)
                .await
                .map_err(|e| e.to_string())?;
        expect_eq(outcome.as_deref(), Some("dead_lettered"))
    })
    .await;
}
