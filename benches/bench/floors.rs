//! The floors: what the libraries the engine is built on cost alone, so that
//! ingestd's figures can be read against them.
//!
//! - [6] the engine's per-event transform in a loop, without I/O, and the
//!   JSON decode it starts with (jsonschema validates only `serde_json`
//!   trees);
//! - [7] the backlog pulled and acknowledged by a bare async-nats consumer:
//!   no transform, no database. Its rate is the most a NATS pull consumer
//!   drains on this machine, its client CPU per event the part of ingestd's
//!   that receiving and acknowledging costs, and nats-server's CPU per event
//!   what serving any such consumer costs the server.

use std::path::Path;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy, PullConsumer};
use futures::StreamExt as _;
use serde_json::Value;

use super::harness::{all_acked, nats_url, wait_for_every, TestEnv};
use super::{
    backlog_event_id, clock_ticks_per_sec, generate, micros_per, per_sec, secs, stat_ticks,
    thousands, CpuSnapshot, DRAIN_POLL,
};

/// Events of the backlog the transform loop runs over.
pub const TRANSFORM_EVENTS: u64 = 50_000;
/// Passes over them; the fastest counts (the least disturbed by the host).
const TRANSFORM_PASSES: usize = 3;
/// The bare consumer's pull requests: the engine's (`max_rows` 1,000 of
/// tiktok.yaml, one request open at a time, expiring after 1 s).
const FLOOR_BATCH: usize = 1_000;
const FLOOR_EXPIRES: Duration = Duration::from_secs(1);

/// What the transform loop measured, in µs per event.
pub struct TransformFigures {
    /// `Compiled::prepare`: decode, validate and strip, values and labels.
    pub prepare_us: f64,
    /// The JSON decode into a `serde_json::Value` tree, and its drop.
    pub decode_us: f64,
}

impl TransformFigures {
    pub fn print(&self) {
        println!(
            "   prepare (decode, validate and strip, values and labels): {:.2} µs/event, of which the JSON decode into a tree and its drop: {:.2} µs",
            self.prepare_us, self.decode_us
        );
        println!(
            "   (the fastest of {TRANSFORM_PASSES} passes; the rest of ingestd's CPU per event is receiving, writing, acknowledging and counting)"
        );
    }
}

/// Runs the engine's own transform of tiktok.yaml over the backlog's
/// payloads, and the JSON decode alone: jsonschema validates only
/// `serde_json::Value` trees, so the decode is a floor no change inside
/// the engine can lower.
pub fn transform_alone() -> TransformFigures {
    use ingestd::config::PipelineFile;
    use ingestd::transform::{event::Compiled, template::MsgMeta};
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/tiktok.yaml");
    let file = PipelineFile::load(&path).expect("tiktok.yaml loads");
    let compiled = Compiled::new(&file).expect("tiktok.yaml compiles");
    let payloads: Vec<Vec<u8>> = (0..TRANSFORM_EVENTS)
        .map(|i| generate(i, backlog_event_id(i)).payload)
        .collect();
    let (meta, headers) = (MsgMeta::default(), std::collections::BTreeMap::new());
    let prepare_us = fastest_pass(&payloads, |p| {
        let prepared = compiled.prepare(p, &meta, &headers);
        assert!(prepared.is_ok(), "a backlog event is valid");
    });
    let decode_us = fastest_pass(&payloads, |p| {
        let tree: Value = serde_json::from_slice(p).expect("a backlog event is JSON");
        drop(std::hint::black_box(tree));
    });
    TransformFigures {
        prepare_us,
        decode_us,
    }
}

/// The fastest of [`TRANSFORM_PASSES`] passes of `each` over the payloads,
/// in µs per payload.
fn fastest_pass(payloads: &[Vec<u8>], mut each: impl FnMut(&[u8])) -> f64 {
    (0..TRANSFORM_PASSES)
        .map(|_| {
            let start = Instant::now();
            payloads.iter().for_each(|p| each(p));
            start.elapsed().as_secs_f64() * 1e6 / payloads.len() as f64
        })
        .fold(f64::INFINITY, f64::min)
}

/// What the bare consumer measured.
pub struct NatsFloor {
    pub events: u64,
    /// First pull request → nothing pending or unacknowledged (polled as
    /// the drain's end is).
    pub wall: Duration,
    /// CPU seconds of the consumer's thread: the client and its connection.
    pub client_cpu: f64,
    pub nats_cpu: f64,
}

impl NatsFloor {
    pub fn rate(&self) -> f64 {
        self.events as f64 / self.wall.as_secs_f64()
    }

    pub fn client_us(&self) -> f64 {
        micros_per(self.client_cpu, self.events)
    }

    pub fn nats_us(&self) -> f64 {
        micros_per(self.nats_cpu, self.events)
    }

    pub fn print(&self, copy_rate: f64) {
        println!(
            "   pulled and acknowledged {} events in {} = {} events/s = {:.0}% of COPY's median",
            thousands(self.events),
            secs(self.wall),
            thousands(per_sec(self.events, self.wall)),
            100.0 * self.rate() / copy_rate
        );
        println!(
            "   CPU per event: the consumer (async-nats, one thread) {:.1} µs, nats-server {:.1} µs",
            self.client_us(),
            self.nats_us()
        );
    }
}

/// Pulls and acknowledges every event of the stream (the backlog and the
/// latency phase's) through a durable consumer of its own (the engine's
/// filter, explicit acks), on a thread and runtime of its own so that its
/// CPU time is the client's alone. The consumer is deleted afterwards.
pub async fn nats_alone(env: &TestEnv) -> NatsFloor {
    let engines = env.consumer_info().await.config;
    let durable = format!("{}-floor", env.durable);
    let config = pull::Config {
        durable_name: Some(durable.clone()),
        filter_subject: engines.filter_subject,
        deliver_policy: DeliverPolicy::All,
        ack_policy: AckPolicy::Explicit,
        ack_wait: engines.ack_wait,
        max_ack_pending: engines.max_ack_pending,
        ..Default::default()
    };
    let stream = env
        .js
        .get_stream(&env.stream)
        .await
        .expect("get the stream");
    let n = stream
        .create_consumer(config)
        .await
        .expect("create the floor's consumer")
        .cached_info()
        .num_pending;
    let before = CpuSnapshot::take();
    let start = Instant::now();
    let (stream_name, consumer) = (env.stream.clone(), durable.clone());
    let client_cpu = tokio::task::spawn_blocking(move || pull_and_ack(&stream_name, &consumer, n))
        .await
        .expect("the floor's consumer thread");
    let what = "the floor's consumer to have every event acknowledged";
    let within = Duration::from_secs(60 + n / 1_000);
    wait_for_every(what, within, DRAIN_POLL, || async {
        let info = super::harness::consumer_info(&env.js, &env.stream, &durable).await?;
        all_acked(info)
    })
    .await;
    let wall = start.elapsed();
    let nats_cpu = CpuSnapshot::take().since(&before, None).nats;
    stream
        .delete_consumer(&durable)
        .await
        .expect("delete the floor's consumer");
    NatsFloor {
        events: n,
        wall,
        client_cpu,
        nats_cpu,
    }
}

/// On the calling thread: connects, pulls `n` messages in requests of
/// [`FLOOR_BATCH`], acknowledges each, flushes. Returns the thread's CPU
/// seconds from the connection on.
fn pull_and_ack(stream: &str, durable: &str, n: u64) -> f64 {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("the floor's runtime");
    runtime.block_on(async {
        let cpu_before = thread_cpu_secs();
        let client = async_nats::connect(nats_url())
            .await
            .expect("connect the floor's consumer");
        let js = async_nats::jetstream::new(client.clone());
        let consumer: PullConsumer = js
            .get_consumer_from_stream::<pull::Config, _, _>(durable, stream)
            .await
            .expect("the floor's consumer");
        let mut taken = 0;
        while taken < n {
            let mut batch = consumer
                .batch()
                .max_messages(FLOOR_BATCH)
                .expires(FLOOR_EXPIRES)
                .messages()
                .await
                .expect("a pull request");
            while let Some(message) = batch.next().await {
                message.expect("a message").ack().await.expect("an ack");
                taken += 1;
            }
        }
        client.flush().await.expect("flush the acks");
        thread_cpu_secs() - cpu_before
    })
}

/// CPU seconds (user + system) of the calling thread, in the clock ticks
/// every other CPU figure of the benchmark is read in.
fn thread_cpu_secs() -> f64 {
    let (_, ticks) = stat_ticks(Path::new("/proc/thread-self/stat")).expect("this thread's stat");
    ticks as f64 / clock_ticks_per_sec()
}
