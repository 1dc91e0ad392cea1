//! Fault tolerance of `ingestd`: database and NATS outages, crashes,
//! shutdowns, hostile payloads and the invalid-event policies, each checked
//! against the rows stored, the consumer's state, the dead letters and the
//! metrics. See README "Delivery and errors".
//!
//! Outages of the database go through a [`TcpProxy`]; NATS restarts use a
//! server of the test's own ([`NatsServer`]). The machine's servers are
//! never stopped, so these tests run in parallel with every other.

use std::time::{Duration, Instant};

use crate::harness::faults::*;
use crate::harness::*;
use async_nats::jetstream::AckKind;
use async_nats::HeaderMap;
use serde_json::{json, Value};

/// An `ack_wait` short enough that what a lost or killed engine held comes
/// back within seconds, and that a held message not kept alive by progress
/// acks (sent every third of it) reaches `max_deliver` within seconds.
const SHORT_ACK_WAIT: Duration = Duration::from_secs(3);
/// With [`SHORT_ACK_WAIT`]: a message not kept alive is given up on after
/// `SHORT_ACK_WAIT × SHORT_MAX_DELIVER`.
const SHORT_MAX_DELIVER: u32 = 2;

/// Long enough to see a message that is not kept alive reach max_deliver.
const KEEPALIVE_WINDOW: Duration =
    Duration::from_secs(SHORT_ACK_WAIT.as_secs() * (SHORT_MAX_DELIVER as u64 + 1));

/// The exact `/ready` answer for the given checks.
fn ready_body(database: &str, nats: &str) -> Value {
    let ok = database == "up" && nats == "up";
    let status = if ok { "ok" } else { "degraded" };
    json!({"status": status, "checks": {"database": database, "nats": nats}})
}

/// Waits until exactly `ids.len()` rows are stored, then checks they are
/// exactly `ids`.
async fn wait_stored_exactly(env: &TestEnv, ids: &[String], timeout: Duration) {
    let n = ids.len() as i64;
    wait_for(&format!("{n} rows"), timeout, || async {
        expect_eq(env.try_count(TIKTOK_TABLE).await?, n)
    })
    .await;
    assert_stored_exactly(env, ids).await;
}

/// Publishes the valid events of `ids` at a steady pace, like a live
/// producer. Each is retried until JetStream confirms it, with the same
/// eventId and `Nats-Msg-Id` (deduplicated by JetStream), so that every
/// event is confirmed exactly once whatever the server goes through.
/// Returns the number of failed attempts.
async fn publish_paced(bus: Bus, ids: Vec<String>, every: Duration) -> u32 {
    let subject = bus.subject(TOP_VIEW);
    let mut tick = tokio::time::interval(every);
    let mut failures = 0;
    for id in &ids {
        tick.tick().await;
        let payload = bytes::Bytes::from(to_bytes(&event(id)));
        loop {
            let mut headers = HeaderMap::new();
            headers.insert("Nats-Msg-Id", id.as_str());
            let sent = bus
                .js
                .publish_with_headers(subject.clone(), headers, payload.clone())
                .await;
            let confirmed = match sent {
                Ok(confirmation) => confirmation.await.is_ok(),
                Err(_) => false,
            };
            if confirmed {
                break;
            }
            failures += 1;
            // Back off: the server is down.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    failures
}

// ---------------------------------------------------------------------------
// 1. A long database outage
// ---------------------------------------------------------------------------

/// A database outage longer than `max_deliver × ack_wait`, with events
/// published throughout its first part.
struct Outage {
    /// Applied to the pipeline; `None` leaves the shipped 30 s × 5.
    consumer: Option<(Duration, u32)>,
    length: Duration,
    events: usize,
    publish_every: Duration,
}

/// The outage is three [`SHORT_ACK_WAIT`]s, a third longer than
/// `max_deliver × ack_wait` (2 × 3 s): only working progress acks keep the
/// held messages from being redelivered until JetStream gives up on them.
/// 1,000 events × 3 ms are published over its first 3 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_outage_longer_than_max_deliver_loses_nothing_and_spends_no_delivery() {
    database_outage_loses_nothing(Outage {
        consumer: Some((SHORT_ACK_WAIT, SHORT_MAX_DELIVER)),
        length: KEEPALIVE_WINDOW,
        events: 1_000,
        publish_every: Duration::from_millis(3),
    })
    .await;
}

/// The same with the shipped pipeline's 30 s × 5 and an outage of three
/// minutes, 10,000 events × 14 ms published over its first 140 s. Run it
/// with `cargo test --test it -- --ignored faults::three_minute`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "three minutes; the short version above proves the same property"]
async fn three_minute_database_outage_loses_nothing_and_spends_no_delivery() {
    database_outage_loses_nothing(Outage {
        consumer: None,
        length: Duration::from_secs(180),
        events: 10_000,
        publish_every: Duration::from_millis(14),
    })
    .await;
}

/// The database is down for `outage.length` while events keep coming: held
/// messages are kept alive, the rest wait in the stream, and everything is
/// stored once the database is back, without a redelivery or a dead letter.
async fn database_outage_loses_nothing(outage: Outage) {
    let (env, bus, dlq) = with_dead_letters(|v| match outage.consumer {
        Some((ack_wait, max_deliver)) => v.ack_wait(ack_wait).max_deliver(max_deliver),
        None => v,
    })
    .await;
    let mut proxy = TcpProxy::to_postgres().await;
    let engine = bus
        .start(env.engine().database_url(proxied(&env, &proxy)))
        .await;

    let ids = event_ids("outage", outage.events);
    let publisher = tokio::spawn(publish_paced(
        bus.clone(),
        ids.clone(),
        outage.publish_every,
    ));
    let before = wait_rows_at_least(&env, 20, DEADLINE).await;
    proxy.stop().await;
    let down = Instant::now();
    engine
        .wait_reply("/ready", 503, &ready_body("down", "up"))
        .await;
    assert_holds(
        "no redelivery and no dead letter while the database is down",
        outage.length.saturating_sub(down.elapsed()),
        || bus.nothing_redelivered(&dlq, 0),
    )
    .await;
    assert!(
        publisher.is_finished(),
        "the publisher did not finish during the outage"
    );
    assert_eq!(publisher.await.expect("publisher"), 0, "publish failures");
    let held = engine.metrics().await;
    proxy.start().await;

    wait_stored_exactly(&env, &ids, Duration::from_secs(90)).await;
    let info = bus.wait_all_acked(DEADLINE).await;
    assert_no_redelivery(&info);
    bus.nothing_redelivered(&dlq, 0)
        .await
        .expect("after the outage");
    let m = wait_settled(&engine, outage.events as f64).await;
    assert_eq!(m.sum(FAILED, VALIDATION_ERROR), 0.0);
    assert!(
        held.sum(FAILED, PROCESSING_ERROR) > 0.0 && held.sum(SINK_RETRIES, &[]) > 0.0,
        "the outage was not felt: {:?}",
        held.series(SINK_RETRIES, &[]).collect::<Vec<_>>()
    );
    engine
        .wait_reply("/ready", 200, &ready_body("up", "up"))
        .await;
    eprintln!(
        "outage {:?} with {before} rows before it; {} failed attempts, {} retries",
        outage.length,
        m.sum(FAILED, PROCESSING_ERROR),
        m.sum(SINK_RETRIES, &[])
    );
}

// ---------------------------------------------------------------------------
// 2. NATS restarts
// ---------------------------------------------------------------------------

/// NATS restarts under load: the engine reports it (gauge, /ready),
/// reconnects by itself, and every confirmed event is stored exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restart_while_publishing_loses_nothing() {
    const EVENTS: usize = 3_000;
    let env = TestEnv::new().await;
    let mut nats = NatsServer::start(env.fresh_dir("nats"), "").await;
    let bus = Bus::connect(&env, &nats.url()).await;
    // Acks sent as the connection drops are lost: those messages come back
    // after ack_wait (and are deduplicated).
    Variant::of(&env).ack_wait(SHORT_ACK_WAIT).write(&env);
    let engine = bus.start(env.engine().var("NATS_URL", nats.url())).await;
    assert_eq!(engine.metrics().await.sum(NATS_STATUS, &[]), 1.0);

    let ids = event_ids("restart", EVENTS);
    let publisher = tokio::spawn(publish_paced(
        bus.clone(),
        ids.clone(),
        Duration::from_millis(2),
    ));
    wait_rows_at_least(&env, 300, DEADLINE).await;
    nats.stop().await;
    engine.wait_metric(NATS_STATUS, &[], 0.0).await;
    engine
        .wait_reply("/ready", 503, &ready_body("up", "down"))
        .await;
    assert!(
        !publisher.is_finished(),
        "publishing ended before the restart"
    );
    nats.restart().await;
    engine.wait_metric(NATS_STATUS, &[], 1.0).await;
    engine
        .wait_reply("/ready", 200, &ready_body("up", "up"))
        .await;

    let failures = tokio::time::timeout(Duration::from_secs(60), publisher)
        .await
        .expect("the publisher finishes after the restart")
        .expect("publisher");
    wait_stored_exactly(&env, &ids, Duration::from_secs(60)).await;
    bus.wait_all_acked(DEADLINE).await;
    let m = engine.metrics().await;
    books_balance(&m).expect("books balance");
    eprintln!(
        "{EVENTS} events confirmed ({failures} failed publish attempts), processed {}",
        m.sum(PROCESSED, &[])
    );
}

// ---------------------------------------------------------------------------
// 3. SIGKILL during a drain
// ---------------------------------------------------------------------------

/// Crashes at arbitrary points of a drain: whatever a killed engine had not
/// acked comes back, and ON CONFLICT DO NOTHING absorbs what it had
/// stored but not acked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_sigkills_during_a_drain_lose_nothing_and_store_nothing_twice() {
    const EVENTS: usize = 20_000;
    const KILLS: i64 = 5;
    let env = TestEnv::new().await;
    let bus = Bus::shared(&env);
    Variant::of(&env).ack_wait(SHORT_ACK_WAIT).write(&env);
    bus.create_stream().await;
    let ids = event_ids("kill", EVENTS);
    bus.publish_events(&ids).await;

    let step = EVENTS as i64 / (KILLS + 2);
    let mut kills_at = Vec::new();
    for k in 1..=KILLS {
        let engine = bus.start(env.engine()).await;
        let stored = wait_rows_at_least(&env, k * step, Duration::from_secs(60)).await;
        kill9(&engine).await;
        kills_at.push(stored);
    }
    let engine = bus.start(env.engine()).await;
    wait_stored_exactly(&env, &ids, Duration::from_secs(60)).await;
    let info = bus.wait_all_acked(DEADLINE).await;
    let m = engine.metrics().await;
    assert_eq!(m.sum(FAILED, &[]), 0.0);
    assert!(
        kills_at.iter().all(|&n| n < EVENTS as i64),
        "killed only after the drain: rows at each kill {kills_at:?}"
    );
    eprintln!(
        "rows at each kill: {kills_at:?}; {} redeliveries",
        redeliveries(&info)
    );
}

// ---------------------------------------------------------------------------
// 4. Hostile payloads
// ---------------------------------------------------------------------------

/// A payload of the hostile corpus and what must become of it.
struct Case {
    name: &'static str,
    payload: Vec<u8>,
    /// The dead letter's `Ingestd-Reason`; None for an event to store.
    reason: Option<&'static str>,
}

const INJECTION: &str = r#"'); DROP TABLE "TiktokEvent"; --"#;

/// A valid event's JSON with `marker` (which must occur in it) replaced
/// by raw bytes: for payloads serde_json would never write.
fn spliced(event: &Value, marker: &str, with: &[u8]) -> Vec<u8> {
    let text = serde_json::to_string(event).expect("serialize");
    let at = text.find(marker).expect("marker in the event");
    [
        &text.as_bytes()[..at],
        with,
        &text.as_bytes()[at + marker.len()..],
    ]
    .concat()
}

/// A valid event padded (with a key the schema strips) to exactly `len`
/// bytes.
fn padded_event(event_id: &str, len: usize) -> Vec<u8> {
    let mut e = event(event_id);
    e["pad"] = json!("");
    let base = to_bytes(&e).len();
    assert!(len >= base, "{len} bytes is below the event's own {base}");
    e["pad"] = json!("x".repeat(len - base));
    let bytes = to_bytes(&e);
    assert_eq!(bytes.len(), len);
    bytes
}

fn hostile_corpus() -> Vec<Case> {
    let case = |name, payload, reason| Case {
        name,
        payload,
        reason,
    };
    let mut nul = event("nul");
    nul["data"]["user"]["username"] = json!("nul\u{0}here");
    let mut wrong_type = event("wrong-type");
    wrong_type["data"]["user"]["followers"] = json!("many");
    let deep = [vec![b'['; 10_000], vec![b']'; 10_000]].concat();
    vec![
        case("empty", Vec::new(), Some("not_json")),
        case(
            "two-mib",
            padded_event("two-mib", 2 << 20),
            Some("too_large"),
        ),
        case("deep-nesting", deep, Some("not_json")),
        case(
            "invalid-utf8",
            spliced(&event("utf8-MARK"), "MARK", &[0xc3, 0x28, 0xff]),
            Some("not_json"),
        ),
        case("nul", to_bytes(&nul), Some("unstorable")),
        case(
            "huge-number",
            spliced(
                &event("huge-number"),
                r#""followers":1000"#,
                br#""followers":1e400"#,
            ),
            Some("not_json"),
        ),
        case("sql-injection", to_bytes(&event(INJECTION)), None),
        case("wrong-type", to_bytes(&wrong_type), Some("schema")),
    ]
}

fn case_header(name: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert("Test-Case", name);
    headers
}

/// Checks a dead letter against the message it stands for.
/// (Every test event is published on [`TOP_VIEW`]; one delivery is all a
/// dead letter ever takes.)
fn assert_dead_letter(letter: &DeadLetter, bus: &Bus, seq: u64, payload: &[u8], reason: &str) {
    let name = letter.header("Test-Case");
    let expect = |header: &str, want: &str| {
        assert_eq!(
            letter.header(header),
            want,
            "{header} of dead letter {name:?}"
        );
    };
    expect("Ingestd-Pipeline", "tiktok");
    expect("Ingestd-Reason", reason);
    expect("Ingestd-Subject", &bus.subject(TOP_VIEW));
    expect("Ingestd-Stream-Sequence", &seq.to_string());
    expect("Ingestd-Delivered", "1");
    expect("Nats-Msg-Id", &format!("{}:{seq}", bus.stream));
    assert!(
        !letter.header("Ingestd-Error").is_empty(),
        "no Ingestd-Error on {name:?}"
    );
    assert!(
        letter.payload == payload,
        "dead letter {name:?} does not carry the original payload ({} bytes, want {})",
        letter.payload.len(),
        payload.len()
    );
}

/// Every kind of payload that can never be stored, between valid events:
/// each is dead-lettered at once with its reason, the valid ones are
/// stored, and the engine stays healthy throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_payloads_are_dead_lettered_once_and_valid_ones_stored() {
    let env = TestEnv::new().await;
    // Our own server: the shared one refuses messages over 1 MiB, and the
    // engine must see a 2 MiB one to refuse it itself.
    let nats = NatsServer::start(env.fresh_dir("nats"), "max_payload: 4MB").await;
    let bus = Bus::connect(&env, &nats.url()).await;
    let dlq = DeadLetterQueue::create(&env, &bus).await;
    Variant::of(&env).dead_letter_to(&dlq).write(&env);
    let engine = bus.start(env.engine().var("NATS_URL", nats.url())).await;
    let health = HealthWatch::start(engine.port);

    let corpus = hostile_corpus();
    let mut valid_ids = Vec::new();
    let mut sequences = Vec::new();
    for (i, case) in corpus.iter().enumerate() {
        let id = format!("valid-{i}");
        bus.publish(TOP_VIEW, case_header(&id), to_bytes(&event(&id)))
            .await;
        valid_ids.push(id);
        let seq = bus
            .publish(TOP_VIEW, case_header(case.name), case.payload.clone())
            .await;
        sequences.push(seq);
    }
    valid_ids.push(INJECTION.to_owned());
    let bad: Vec<_> = corpus.iter().filter(|c| c.reason.is_some()).collect();

    let letters = dlq.wait_letters(bad.len() as u64).await;
    wait_stored_exactly(&env, &valid_ids, DEADLINE).await;
    let m = wait_settled(&engine, valid_ids.len() as f64).await;
    let info = bus.wait_all_acked(DEADLINE).await;
    let (polls, unhealthy) = health.finish().await;

    for (case, seq) in corpus.iter().zip(&sequences) {
        let Some(reason) = case.reason else { continue };
        let letter = letters
            .iter()
            .find(|l| l.header("Test-Case") == case.name)
            .unwrap_or_else(|| panic!("no dead letter for {:?}", case.name));
        assert_dead_letter(letter, &bus, *seq, &case.payload, reason);
    }
    assert_eq!(m.sum(FAILED, VALIDATION_ERROR), bad.len() as f64);
    for reason in ["not_json", "too_large", "unstorable", "schema"] {
        let want = bad.iter().filter(|c| c.reason == Some(reason)).count();
        assert_eq!(
            m.sum(DEAD_LETTERS, &[("reason", reason)]),
            want as f64,
            "dead letters counted as {reason}"
        );
    }
    assert_eq!(
        m.sum(RECEIVED, &[]),
        (corpus.len() * 2) as f64,
        "one delivery each"
    );
    assert_eq!(redeliveries(&info), 0);
    let row = env.wait_row(INJECTION).await;
    assert_eq!(row.event_id, INJECTION, "stored verbatim");
    assert!(polls > 1, "health polled {polls} times");
    assert!(
        unhealthy.is_empty(),
        "unhealthy answers ({} of {polls} rounds): {unhealthy:?}",
        unhealthy.len()
    );
}

/// `max_payload` is the pipeline's own limit, well below the server's: a
/// payload of exactly the limit is stored, one byte more is dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeline_max_payload_is_exact() {
    let (env, bus, dlq) = with_dead_letters(|v| v.max_payload("1KiB")).await;
    let engine = bus.start(env.engine()).await;

    let at_limit = padded_event("at-limit", 1024);
    let over = padded_event("over-limit", 1025);
    bus.publish(TOP_VIEW, HeaderMap::new(), at_limit).await;
    let seq = bus
        .publish(TOP_VIEW, case_header("over-limit"), over.clone())
        .await;
    bus.publish(TOP_VIEW, HeaderMap::new(), to_bytes(&event("small")))
        .await;

    let letters = dlq.wait_letters(1).await;
    assert_dead_letter(&letters[0], &bus, seq, &over, "too_large");
    let error = letters[0].header("Ingestd-Error");
    assert!(error.contains("1025"), "Ingestd-Error {error:?}");
    wait_stored_exactly(&env, &["at-limit".into(), "small".into()], DEADLINE).await;
    let m = wait_settled(&engine, 2.0).await;
    assert_eq!(m.sum(FAILED, VALIDATION_ERROR), 1.0);
}

// ---------------------------------------------------------------------------
// 5. Permanent versus transient database failures
// ---------------------------------------------------------------------------

/// The contract's table, plus a CHECK constraint that events whose
/// eventId starts with `reject-` violate (SQLSTATE 23514).
async fn create_table_rejecting_some(env: &TestEnv) {
    env.exec(&repo_file("migrations/20250101000000_init.sql"))
        .await;
    env.exec(
        r#"ALTER TABLE "TiktokEvent" ADD CONSTRAINT "no_rejects" CHECK ("eventId" NOT LIKE 'reject-%')"#,
    )
    .await;
}

/// A row the database refuses (a CHECK constraint) is dead-lettered after
/// one try while its batch-mates are stored; an event the database cannot
/// take for now (it is down) is held, never dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_the_database_refuses_is_dead_lettered_at_once_a_transient_failure_never() {
    let (env, bus, dlq) =
        with_dead_letters(|v| v.ack_wait(SHORT_ACK_WAIT).max_deliver(SHORT_MAX_DELIVER)).await;
    create_table_rejecting_some(&env).await;
    bus.create_stream().await;

    // Published before the engine starts: one batch, mates of the bad row.
    let mut mates = event_ids("mate", 10);
    bus.publish_events(&mates[..5]).await;
    let reject = to_bytes(&event("reject-1"));
    let seq = bus
        .publish(TOP_VIEW, HeaderMap::new(), reject.clone())
        .await;
    bus.publish_events(&mates[5..]).await;
    let mut proxy = TcpProxy::to_postgres().await;
    let engine = bus
        .start(env.engine().database_url(proxied(&env, &proxy)))
        .await;

    let letters = dlq.wait_letters(1).await;
    assert_dead_letter(&letters[0], &bus, seq, &reject, "unstorable");
    let error = letters[0].header("Ingestd-Error");
    assert!(error.contains("23514"), "Ingestd-Error {error:?}");
    wait_stored_exactly(&env, &mates, DEADLINE).await;
    bus.wait_all_acked(DEADLINE).await;
    bus.nothing_redelivered(&dlq, 1)
        .await
        .expect("before the outage");

    proxy.stop().await;
    bus.publish(TOP_VIEW, HeaderMap::new(), to_bytes(&event("held")))
        .await;
    engine
        .wait_metric_at_least(FAILED, PROCESSING_ERROR, 2.0)
        .await;
    assert_holds(
        "the held event neither redelivered nor dead-lettered",
        KEEPALIVE_WINDOW,
        || bus.nothing_redelivered(&dlq, 1),
    )
    .await;
    proxy.start().await;
    mates.push("held".into());
    wait_stored_exactly(&env, &mates, DEADLINE).await;
    bus.wait_all_acked(DEADLINE).await;
    bus.nothing_redelivered(&dlq, 1)
        .await
        .expect("after the outage");
    let m = wait_settled(&engine, mates.len() as f64).await;
    assert_eq!(m.sum(FAILED, VALIDATION_ERROR), 1.0);
}

/// Waiting on the database is not only failing: a write blocked by a lock
/// (a migration's, say) for longer than ack_wait must keep its messages
/// alive all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_waiting_on_a_lock_keeps_its_messages_alive() {
    let (env, bus, dlq) =
        with_dead_letters(|v| v.ack_wait(SHORT_ACK_WAIT).max_deliver(SHORT_MAX_DELIVER)).await;
    let engine = bus.start(env.engine()).await;
    bus.publish(TOP_VIEW, HeaderMap::new(), to_bytes(&event("before")))
        .await;
    env.wait_row("before").await;

    let mut lock = env.db.begin().await.expect("begin");
    sqlx::query(r#"LOCK TABLE "TiktokEvent" IN ACCESS EXCLUSIVE MODE"#)
        .execute(&mut *lock)
        .await
        .expect("lock the table");
    bus.publish(TOP_VIEW, HeaderMap::new(), to_bytes(&event("blocked")))
        .await;
    engine.wait_metric(RECEIVED, &[], 2.0).await;
    assert_holds(
        "the blocked event neither redelivered nor dead-lettered",
        KEEPALIVE_WINDOW,
        || bus.nothing_redelivered(&dlq, 0),
    )
    .await;
    lock.rollback().await.expect("release the lock");

    env.wait_row("blocked").await;
    bus.wait_all_acked(DEADLINE).await;
    bus.nothing_redelivered(&dlq, 0)
        .await
        .expect("after the lock");
    wait_settled(&engine, 2.0).await;
}

// ---------------------------------------------------------------------------
// 6. SIGTERM during a drain
// ---------------------------------------------------------------------------

/// SIGTERM mid-drain: the engine finishes and acks the batches it holds,
/// exits 0 at once, and leaves nothing to redeliver.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_drain_exits_at_once_and_acks_what_it_stored() {
    const EVENTS: usize = 20_000;
    let env = TestEnv::new().await;
    let bus = Bus::shared(&env);
    bus.create_stream().await;
    let ids = event_ids("term", EVENTS);
    bus.publish_events(&ids).await;

    let engine = bus.start(env.engine()).await;
    wait_rows_at_least(&env, 1_000, DEADLINE).await;
    let asked = Instant::now();
    let status = engine.terminate().await;
    let took = asked.elapsed();
    // Exit 0: the engine's own shutdown, not the deadline that ends the
    // process after shutdown_grace (exit 1); the backlog's rest is left.
    assert!(status.success(), "exit status {status}");

    // It finished and acked everything it had taken, and what is acked is
    // exactly what is stored. A message it took and left un-acked, however
    // the server counts it meanwhile, comes to the next engine as a
    // redelivery, which the end of the test refuses.
    let info = wait_for("no un-acked message after the exit", DEADLINE, || async {
        let info = bus.try_consumer_info().await?;
        expect_eq(info.num_ack_pending, 0).map_err(|e| format!("num_ack_pending {e}"))?;
        Ok(info)
    })
    .await;
    let stored = env.try_count(TIKTOK_TABLE).await.expect("count rows");
    assert!(stored < EVENTS as i64, "the drain was over before SIGTERM");
    assert_eq!(
        info.ack_floor.stream_sequence, stored as u64,
        "acked {} messages, stored {stored} rows",
        info.ack_floor.stream_sequence
    );

    let engine = bus.start(env.engine()).await;
    wait_stored_exactly(&env, &ids, Duration::from_secs(60)).await;
    let info = bus.wait_all_acked(DEADLINE).await;
    assert_eq!(redeliveries(&info), 0, "SIGTERM left messages to redeliver");
    wait_settled(&engine, (EVENTS as i64 - stored) as f64).await;
    eprintln!("SIGTERM after {stored} rows; exited in {took:?}");
}

// ---------------------------------------------------------------------------
// 7. The invalid policies nak and term, and max_deliver
// ---------------------------------------------------------------------------

/// An event the schema refuses, on its own subject (so that its deliveries
/// can be counted apart).
const INVALID_SUBJECT: &str = "tiktok.top.like";

fn invalid_event() -> Vec<u8> {
    to_bytes(&example_event("invalid-bad-enum.json"))
}

/// `action: nak`: the invalid event comes back until max_deliver, then
/// JetStream stops. (No dead letter: the pipeline's dead-letter subject,
/// and with it the max_deliver advisory watch, exists only with
/// `action: dead_letter`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nak_policy_redelivers_an_invalid_event_until_max_deliver() {
    const MAX_DELIVER: u32 = 3;
    let env = TestEnv::new().await;
    let bus = Bus::shared(&env);
    Variant::of(&env)
        .invalid("nak", &["delay: 100ms"])
        .max_deliver(MAX_DELIVER)
        .write(&env);
    let engine = bus.start(env.engine()).await;

    bus.publish(INVALID_SUBJECT, HeaderMap::new(), invalid_event())
        .await;
    bus.publish(TOP_VIEW, HeaderMap::new(), to_bytes(&event("after-nak")))
        .await;
    env.wait_row("after-nak").await;
    let subject = bus.subject(INVALID_SUBJECT);
    let invalid_deliveries = [("subject", subject.as_str())];
    engine
        .wait_metric(RECEIVED, &invalid_deliveries, f64::from(MAX_DELIVER))
        .await;
    // With a 100 ms delay, one more delivery would come within the second.
    assert_holds(
        "no delivery beyond max_deliver",
        Duration::from_secs(2),
        || async {
            let m = engine.try_metrics().await?;
            expect_eq(m.sum(RECEIVED, &invalid_deliveries), f64::from(MAX_DELIVER))
        },
    )
    .await;
    let m = engine.metrics().await;
    assert_eq!(m.sum(FAILED, VALIDATION_ERROR), f64::from(MAX_DELIVER));
    assert_eq!(m.sum(PROCESSED, &[]), 1.0);
    books_balance(&m).expect("books balance");
    let info = bus.consumer_info().await;
    assert_eq!(redeliveries(&info), u64::from(MAX_DELIVER - 1));
}

/// `action: term`: the invalid event is delivered once, and is settled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn term_policy_never_redelivers_an_invalid_event() {
    let env = TestEnv::new().await;
    let bus = Bus::shared(&env);
    Variant::of(&env).invalid("term", &[]).write(&env);
    let engine = bus.start(env.engine()).await;

    bus.publish(INVALID_SUBJECT, HeaderMap::new(), invalid_event())
        .await;
    bus.publish(TOP_VIEW, HeaderMap::new(), to_bytes(&event("after-term")))
        .await;
    env.wait_row("after-term").await;
    // Terminated counts as settled: nothing is pending, nothing will return.
    let info = bus.wait_all_acked(DEADLINE).await;
    assert_eq!(redeliveries(&info), 0);
    let m = wait_settled(&engine, 1.0).await;
    assert_eq!(m.sum(RECEIVED, &[]), 2.0);
    assert_eq!(m.sum(FAILED, VALIDATION_ERROR), 1.0);
}

/// A message whose last allowed delivery went to a peer that died with it
/// (here: the test, pulling from the same durable) is dead-lettered by the
/// engine from JetStream's MAX_DELIVERIES advisory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_reaching_max_deliver_is_dead_lettered_from_the_advisory() {
    let (env, bus, dlq) = with_dead_letters(|v| v.max_deliver(1)).await;
    // The engine creates the stream and the consumer, then stops.
    let engine = bus.start(env.engine()).await;
    assert!(engine.terminate().await.success());

    let poison = to_bytes(&event("poison"));
    let seq = bus
        .publish(TOP_VIEW, case_header("poison"), poison.clone())
        .await;
    let taken = bus.take_one().await;
    assert_eq!(taken.info().expect("info").delivered, 1);

    let _engine = bus.start(env.engine()).await;
    bus.publish(TOP_VIEW, HeaderMap::new(), to_bytes(&event("warm-up")))
        .await;
    env.wait_row("warm-up").await;
    taken.ack_with(AckKind::Nak(None)).await.expect("nak");

    let letters = dlq.wait_letters(1).await;
    assert_dead_letter(&letters[0], &bus, seq, &poison, "max_deliver");
    assert_eq!(
        letters[0].header("Test-Case"),
        "poison",
        "original headers kept"
    );
    assert_stored_exactly(&env, &["warm-up".into()]).await;
}

// ---------------------------------------------------------------------------
// 8. Passwords
// ---------------------------------------------------------------------------

const PASSWORD: &str = "S3cretPassw0rd";

/// The engine's whole output, stdout and stderr.
fn printed(output: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Starts the engine with `var` set to a URL holding [`PASSWORD`] for a
/// port nobody listens on: the start-up must fail, say where, and print no
/// password, at the default log level and at `debug` (which the README
/// offers for troubleshooting, when logs are most likely to be shared).
async fn assert_failed_start_hides_password(var: &str, url_to: impl Fn(u16) -> String) {
    let env = TestEnv::new().await;
    let dir = env.pipelines_dir();
    let dir = dir.to_str().expect("utf-8 path");
    let closed = free_port();
    for level in ["info", "debug"] {
        let output = env
            .engine()
            .var(var, url_to(closed))
            .var("RUST_LOG", level)
            .output(&["run", "--pipelines", dir])
            .await;
        let text = printed(&output);
        assert!(!output.status.success(), "started with {var}:\n{text}");
        assert!(
            text.contains(&format!("127.0.0.1:{closed}")),
            "the error does not say where it failed ({var}, RUST_LOG={level}):\n{text}"
        );
        assert!(
            !text.contains(PASSWORD),
            "{var}'s password printed at RUST_LOG={level}:\n{text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_password_stays_out_of_start_up_errors() {
    let url = |port| format!("postgresql://postgres:{PASSWORD}@127.0.0.1:{port}/x");
    assert_failed_start_hides_password("DATABASE_URL", url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_password_stays_out_of_start_up_errors() {
    let url = |port| format!("nats://ingestd:{PASSWORD}@127.0.0.1:{port}");
    assert_failed_start_hides_password("NATS_URL", url).await;
}

/// Errors logged at run time (at `debug`) and the endpoints never show the
/// database password either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_password_stays_out_of_logs_and_endpoints_during_an_outage() {
    let env = TestEnv::new().await;
    let mut proxy = TcpProxy::to_postgres().await;
    // The server trusts local connections: any password is accepted.
    let url = format!(
        "postgresql://postgres:{PASSWORD}@127.0.0.1:{}/{}",
        proxy.port(),
        env.db_name
    );
    let engine = env
        .engine()
        .database_url(url)
        .var("RUST_LOG", "debug")
        .start()
        .await;
    proxy.stop().await;
    env.publish_event(&event("during-outage")).await;
    engine
        .wait_metric_at_least(FAILED, PROCESSING_ERROR, 2.0)
        .await;
    let mut answers = Vec::new();
    for path in ["/ready", "/pipelines", "/metrics"] {
        answers.push((path, engine.get(path).await.body));
    }
    proxy.start().await;
    env.wait_row("during-outage").await;
    for (path, body) in answers {
        assert!(
            !body.contains(PASSWORD),
            "{path} shows the password: {body}"
        );
    }
    let log = engine.log();
    assert!(
        log.contains("write failed"),
        "the outage was not logged:\n{log}"
    );
    assert!(
        !log.contains(PASSWORD),
        "the log shows the password:\n{log}"
    );
}
