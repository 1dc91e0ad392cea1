//! Helpers of the batching and scale-out tests (`tests/it/batching.rs`).
//!
//! Those tests need what the shared harness leaves to the engine: a backlog
//! already stored in the stream when the engine starts (so that it is pulled
//! in full batches), the engine's table altered before its first write, and
//! pipeline variants with other batch settings. The backlog of large events
//! also serves the `world` suite and the benchmark.

// Shared by several test binaries, each using part of it.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use async_nats::jetstream::consumer;
use serde_json::{json, Value};

use crate::harness::{
    adapt_pipeline, example_event, publish_windowed, repo_root, wait_for, Engine, TestEnv,
    PROCESSED,
};

pub const VALIDATION_ERROR: &[(&str, &str)] = &[("reason", "validation_error")];

/// The subject every backlog is published on (the README example's).
pub const TOP_VIEW: &str = "tiktok.top.video.view";

/// Publish acks awaited at a time while publishing a backlog: one ack per
/// round trip would make 30,000 events take seconds; a window keeps the
/// connection busy and memory bounded.
const PUBLISH_WINDOW: usize = 2_000;

/// The shipped tiktok.yaml's batch settings, rewritten by [`Batch::apply`].
pub const SHIPPED_MAX_ROWS: &str = "max_rows: 1000";
const SHIPPED_MAX_IN_FLIGHT: &str = "max_in_flight: 2";
pub const SHIPPED_MAX_WAIT: &str = "max_wait: 3ms";
/// The consumer's last line in tiktok.yaml, after which `max_ack_pending` goes.
const SHIPPED_MAX_DELIVER: &str = "max_deliver: 5";

/// The README's example event under another eventId.
pub fn top_event(event_id: &str) -> Value {
    let mut event = example_event("top-video-view.json");
    event["eventId"] = json!(event_id);
    event
}

/// Publishes `events` in order on [`TOP_VIEW`], with [`PUBLISH_WINDOW`]
/// acks outstanding, and returns once JetStream confirmed every one (the
/// test's stream is created first when missing).
pub async fn publish_backlog(env: &TestEnv, events: impl IntoIterator<Item = Value>) -> u64 {
    env.create_stream().await;
    let subject = env.subject(TOP_VIEW);
    let messages = events.into_iter().map(|event| {
        let body = serde_json::to_vec(&event).expect("serialize event");
        (subject.clone(), body)
    });
    publish_windowed(&env.js, PUBLISH_WINDOW, messages).await
}

/// The table [`large_event_pipeline`] writes.
pub const LARGE_EVENT_TABLE: &str = "big";

/// A pipeline of the test's stream storing any JSON event `{id, body}`
/// into [`LARGE_EVENT_TABLE`] (no schema: the tiktok one refuses such events).
pub fn large_event_pipeline(env: &TestEnv) -> String {
    format!(
        r#"name: big
max_payload: 1MiB
source:
  nats:
    stream: {{name: {stream}, subjects: ["{prefix}>"]}}
    consumer: {{durable: {durable}, filter_subject: "{prefix}>"}}
sink:
  postgres:
    insert: INSERT INTO {LARGE_EVENT_TABLE} (id, body) VALUES ({{{{ event.id }}}}, {{{{ event.body }}}}) ON CONFLICT (id) DO NOTHING
metrics:
  prefix: big
"#,
        stream = env.stream,
        prefix = env.subject_prefix,
        durable = env.durable
    )
}

/// A backlog of `events` events whose body is `bytes` long, stored before
/// any engine runs, with [`large_event_pipeline`] written over the test's
/// tiktok.yaml and its table created. Published one at a time: a window of
/// them would hold hundreds of MB.
pub async fn large_event_backlog(env: &TestEnv, events: usize, bytes: usize) {
    env.exec(&format!(
        "CREATE TABLE {LARGE_EVENT_TABLE} (id text PRIMARY KEY, body text NOT NULL)"
    ))
    .await;
    env.write_pipeline("tiktok.yaml", &large_event_pipeline(env));
    env.create_stream().await;
    let body = "x".repeat(bytes);
    for i in 0..events {
        let event = json!({"id": format!("big-{i}"), "body": body});
        env.publish("big", serde_json::to_vec(&event).expect("serialize event"))
            .await;
    }
}

/// Applies the shipped migrations with the engine's own migrator (so the
/// engine finds them applied and leaves the table alone), adds a `txid`
/// column and runs `ddl`.
///
/// `txid` defaults to the inserting transaction's id: rows committed
/// together share it, so `SELECT count(DISTINCT txid)` is exactly the
/// number of transactions that wrote rows, in this database only and
/// without the millisecond collisions of `createdAt`.
pub async fn prepare_table(env: &TestEnv, ddl: &str) {
    let migrations = repo_root().join("migrations");
    sqlx::migrate::Migrator::new(migrations.as_path())
        .await
        .expect("read the shipped migrations")
        .run(&env.db)
        .await
        .expect("apply the shipped migrations");
    env.exec(
        r#"ALTER TABLE "TiktokEvent" ADD COLUMN "txid" bigint NOT NULL DEFAULT txid_current()"#,
    )
    .await;
    if !ddl.is_empty() {
        env.exec(ddl).await;
    }
}

/// Transactions that wrote rows, and the most rows one of them wrote
/// (needs [`prepare_table`]'s `txid` column).
pub async fn transactions(env: &TestEnv) -> (i64, i64) {
    let sql = r#"SELECT count(*), COALESCE(max(n), 0)
                 FROM (SELECT count(*) AS n FROM "TiktokEvent" GROUP BY "txid") AS t"#;
    sqlx::query_as(sql)
        .fetch_one(&env.db)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// Batch settings of a tiktok.yaml variant; `max_ack_pending: None` keeps
/// the engine's default (`max_rows × (max_in_flight + 3)`).
pub struct Batch {
    pub max_rows: usize,
    pub max_in_flight: usize,
    pub max_ack_pending: Option<i64>,
}

impl Batch {
    /// The most messages one process may hold, as the README promises: the
    /// batches being written, one waiting for a slot, one pull request.
    pub fn capacity(&self) -> usize {
        self.max_rows * (self.max_in_flight + 2)
    }

    /// What the server may count as unacknowledged: [`Self::capacity`]
    /// plus one batch, because nats-server processes acknowledgements
    /// asynchronously and can serve the next pull request before it has
    /// counted the acks sent just before it (seen: 500 with a capacity of
    /// 400, about one run in three).
    pub fn server_view_bound(&self) -> usize {
        self.capacity() + self.max_rows
    }

    /// Writes the test's tiktok.yaml with these settings.
    pub fn apply(&self, env: &TestEnv) {
        let mut replacements = vec![
            (
                SHIPPED_MAX_ROWS.to_owned(),
                format!("max_rows: {}", self.max_rows),
            ),
            (
                SHIPPED_MAX_IN_FLIGHT.to_owned(),
                format!("max_in_flight: {}", self.max_in_flight),
            ),
        ];
        if let Some(pending) = self.max_ack_pending {
            replacements.push((
                SHIPPED_MAX_DELIVER.to_owned(),
                format!("{SHIPPED_MAX_DELIVER}\n      max_ack_pending: {pending}"),
            ));
        }
        let yaml = adapt_pipeline(&env.tiktok_pipeline(), &replacements);
        env.write_pipeline("tiktok.yaml", &yaml);
    }
}

/// `Ok` once `total` messages were delivered and none is pending or
/// awaiting its ack, else the state seen.
fn drained(info: &consumer::Info, total: u64) -> Result<(), String> {
    let seen = (
        info.delivered.stream_sequence,
        info.num_pending,
        info.num_ack_pending,
    );
    if seen == (total, 0, 0) {
        Ok(())
    } else {
        Err(format!(
            "(last delivered stream seq, num_pending, num_ack_pending) = {seen:?}, want ({total}, 0, 0)"
        ))
    }
}

/// Waits until the `total` messages of the backlog were delivered and
/// acknowledged; returns the consumer's state.
pub async fn wait_drained(env: &TestEnv, total: u64, timeout: Duration) -> consumer::Info {
    wait_for(&format!("all {total} messages acked"), timeout, || async {
        let info = env.try_consumer_info().await?;
        drained(&info, total).map(|()| info)
    })
    .await
}

/// Fails unless each of the `total` messages was delivered exactly once:
/// the consumer sequence counts every delivery, redeliveries included
/// (`num_redelivered` only counts those still unacknowledged).
pub fn assert_delivered_once(info: &consumer::Info, total: u64) {
    assert_eq!(
        info.delivered.consumer_sequence,
        total,
        "deliveries for {total} messages: {} were redeliveries",
        info.delivered.consumer_sequence.saturating_sub(total)
    );
}

/// Waits until the engines' `processed` counters add up to `want`; returns
/// each engine's count.
pub async fn wait_processed(engines: &[&Engine], want: f64, timeout: Duration) -> Vec<f64> {
    wait_for(
        &format!("{PROCESSED} summing to {want}"),
        timeout,
        || async {
            let mut counts = Vec::with_capacity(engines.len());
            for engine in engines {
                counts.push(engine.try_metrics().await?.sum(PROCESSED, &[]));
            }
            if counts.iter().sum::<f64>() == want {
                Ok(counts)
            } else {
                Err(format!("per engine: {counts:?}"))
            }
        },
    )
    .await
}

/// The largest `num_ack_pending` of the consumer seen until the `total`
/// messages are acked. Samples back to back rather than at
/// [`wait_for`]'s pace: a drain lasts about a second, and an engine holding
/// too much may do so only briefly.
pub async fn peak_ack_pending_until_drained(env: &TestEnv, total: u64, timeout: Duration) -> usize {
    let deadline = Instant::now() + timeout;
    let mut peak = 0;
    loop {
        let info = env.consumer_info().await;
        peak = peak.max(info.num_ack_pending);
        match drained(&info, total) {
            Ok(()) => return peak,
            Err(seen) if Instant::now() >= deadline => {
                panic!("not drained after {timeout:?}: {seen}; peak num_ack_pending {peak}")
            }
            Err(_) => {}
        }
    }
}
