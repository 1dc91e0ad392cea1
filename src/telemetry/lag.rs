//! Lag and freshness per pipeline: how far behind the stream a pipeline is
//! (the consumer's pending, ack-pending and redelivered counts, read from
//! the server every `source.nats.lag_interval`), how old events are when
//! their row commits (measured from the JetStream publish time, so a
//! backlog shows even when each batch is fast), when the last commit was,
//! and what the engine holds in memory right now.
//!
//! Two versions of a pipeline run side by side during a reload and share
//! the same series; the series disappear when the last version stops (a
//! removed pipeline file), so a stale gauge can never keep an alert firing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::Message;
use prometheus::{
    Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntGauge, IntGaugeVec, Opts, Registry,
};
use tokio_util::sync::CancellationToken;

/// Publish → commit buckets, in seconds: from a quiet pipeline's
/// milliseconds to an hour-old backlog.
const AGE_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
];

/// The engine-wide lag families (label `pipeline`).
#[derive(Clone)]
pub struct LagMetrics {
    pending: IntGaugeVec,
    ack_pending: IntGaugeVec,
    redelivered: IntGaugeVec,
    age: HistogramVec,
    last_commit: GaugeVec,
    held_messages: IntGaugeVec,
    held_bytes: IntGaugeVec,
    /// Running versions per pipeline name.
    users: Arc<Mutex<HashMap<String, usize>>>,
}

impl LagMetrics {
    pub fn new() -> prometheus::Result<Self> {
        let gauge = |name: &str, help: &str| IntGaugeVec::new(Opts::new(name, help), &["pipeline"]);
        Ok(Self {
            pending: gauge(
                "ingestd_consumer_pending_messages",
                "Messages in the stream the pipeline's consumer has not delivered yet",
            )?,
            ack_pending: gauge(
                "ingestd_consumer_ack_pending_messages",
                "Messages delivered to the pipeline's consumer and not acknowledged yet",
            )?,
            redelivered: gauge(
                "ingestd_consumer_redelivered_messages",
                "Unacknowledged messages the consumer has delivered more than once",
            )?,
            age: HistogramVec::new(
                HistogramOpts::new(
                    "ingestd_publish_to_commit_seconds",
                    "Time from an event's JetStream publish to the commit of its row",
                )
                .buckets(AGE_BUCKETS.to_vec()),
                &["pipeline"],
            )?,
            last_commit: GaugeVec::new(
                Opts::new(
                    "ingestd_last_commit_timestamp_seconds",
                    "Unix time of the pipeline's last committed (and acknowledged) row",
                ),
                &["pipeline"],
            )?,
            held_messages: gauge(
                "ingestd_held_messages",
                "Messages the pipeline holds: received and not yet settled",
            )?,
            held_bytes: gauge(
                "ingestd_held_bytes",
                "Payload bytes of the messages the pipeline holds",
            )?,
            users: Arc::default(),
        })
    }

    pub fn register(&self, registry: &Registry) -> prometheus::Result<()> {
        registry.register(Box::new(self.pending.clone()))?;
        registry.register(Box::new(self.ack_pending.clone()))?;
        registry.register(Box::new(self.redelivered.clone()))?;
        registry.register(Box::new(self.age.clone()))?;
        registry.register(Box::new(self.last_commit.clone()))?;
        registry.register(Box::new(self.held_messages.clone()))?;
        registry.register(Box::new(self.held_bytes.clone()))
    }

    /// One pipeline's series.
    pub fn pipeline(&self, name: &str) -> PipelineLag {
        let labels = [name];
        PipelineLag {
            name: name.to_string(),
            pending: self.pending.with_label_values(&labels),
            ack_pending: self.ack_pending.with_label_values(&labels),
            redelivered: self.redelivered.with_label_values(&labels),
            age: self.age.with_label_values(&labels),
            last_commit: std::sync::OnceLock::new(),
            held_messages: self.held_messages.with_label_values(&labels),
            held_bytes: self.held_bytes.with_label_values(&labels),
            families: self.clone(),
        }
    }

    fn remove(&self, name: &str) {
        let labels = [name];
        let _ = self.pending.remove_label_values(&labels);
        let _ = self.ack_pending.remove_label_values(&labels);
        let _ = self.redelivered.remove_label_values(&labels);
        let _ = self.age.remove_label_values(&labels);
        let _ = self.last_commit.remove_label_values(&labels);
        let _ = self.held_messages.remove_label_values(&labels);
        let _ = self.held_bytes.remove_label_values(&labels);
    }
}

/// One pipeline's lag series.
pub struct PipelineLag {
    name: String,
    pending: IntGauge,
    ack_pending: IntGauge,
    redelivered: IntGauge,
    age: Histogram,
    /// Created at the first commit: a pipeline that never committed has no
    /// last commit (not one in 1970).
    last_commit: std::sync::OnceLock<Gauge>,
    held_messages: IntGauge,
    held_bytes: IntGauge,
    families: LagMetrics,
}

impl PipelineLag {
    /// Counts `msg` as held until the returned guard is dropped (when the
    /// message is settled one way or another).
    pub fn hold(&self, msg: &Message) -> HeldGuard {
        let bytes = msg.payload.len() as i64;
        self.held_messages.inc();
        self.held_bytes.add(bytes);
        HeldGuard {
            messages: self.held_messages.clone(),
            bytes: self.held_bytes.clone(),
            size: bytes,
        }
    }

    /// Records the commit of `msg`'s row at `at`: its age since publish,
    /// and `at` as the last commit.
    pub fn committed(&self, msg: &Message, at: SystemTime) {
        let now = at.duration_since(UNIX_EPOCH).unwrap_or_default();
        self.last_commit
            .get_or_init(|| self.families.last_commit.with_label_values(&[&self.name]))
            .set(now.as_secs_f64());
        if let Ok(info) = msg.info() {
            let published = info.published.unix_timestamp_nanos() as f64 / 1e9;
            self.age.observe((now.as_secs_f64() - published).max(0.0));
        }
    }

    fn record(&self, info: &async_nats::jetstream::consumer::Info) {
        self.pending.set(info.num_pending as i64);
        self.ack_pending.set(info.num_ack_pending as i64);
        self.redelivered.set(info.num_redelivered as i64);
    }
}

/// A message counted in the held gauges while this lives.
pub struct HeldGuard {
    messages: IntGauge,
    bytes: IntGauge,
    size: i64,
}

impl Drop for HeldGuard {
    fn drop(&mut self) {
        self.messages.dec();
        self.bytes.sub(self.size);
    }
}

/// A running version's share of its pipeline's lag series: the last
/// version of a pipeline to end its poll removes them.
struct Users {
    lag: Arc<PipelineLag>,
}

impl Users {
    fn join(lag: Arc<PipelineLag>) -> Self {
        *lag.families
            .users
            .lock()
            .expect("lag users lock")
            .entry(lag.name.clone())
            .or_default() += 1;
        Self { lag }
    }
}

impl Drop for Users {
    fn drop(&mut self) {
        let families = &self.lag.families;
        let mut users = families.users.lock().expect("lag users lock");
        let left = users.get_mut(&self.lag.name).map(|n| {
            *n -= 1;
            *n
        });
        if left == Some(0) {
            users.remove(&self.lag.name);
            families.remove(&self.lag.name);
        }
    }
}

/// Reads the consumer's state now and every `interval`, until `stop` is
/// cancelled (or the task panics): then this version's share of the
/// series is given up.
pub async fn poll(
    lag: Arc<PipelineLag>,
    consumer: PullConsumer,
    interval: Duration,
    stop: CancellationToken,
) {
    let users = Users::join(lag);
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = poll_every(&users.lag, &consumer, interval) => {}
    }
}

async fn poll_every(lag: &PipelineLag, consumer: &PullConsumer, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match consumer.get_info().await {
            Ok(info) => lag.record(&info),
            Err(e) => {
                tracing::debug!(pipeline = %lag.name, error = %e, "cannot read the consumer's state")
            }
        }
    }
}
