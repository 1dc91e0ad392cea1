//! [8] A three-node cluster: the same backlog drained from an R1 and from
//! an R3 stream, on a current nats-server and on Debian's, with the
//! engine given every member's URL. The R3 drain pays for replication
//! (every acknowledgement and delivery goes through Raft); what it must not
//! pay is redeliveries, so each drain's deliveries are printed beside the
//! events.

use std::path::Path;
use std::time::{Duration, Instant};

use async_nats::jetstream::stream;

use super::harness::cluster::{NatsCluster, ServerBuild};
use super::harness::faults::Bus;
use super::harness::{adapt_pipeline, publish_windowed, wait_for_every, TestEnv, TIKTOK_TABLE};
use super::{backlog_event_id, generate, secs, thousands, PUBLISH_WINDOW};

/// How often the consumer is asked whether the drain is done.
const POLL: Duration = Duration::from_millis(50);

/// One drain of the backlog from a stream of `replicas`.
pub struct ClusterDrain {
    pub replicas: usize,
    pub wall: Duration,
    pub deliveries: u64,
}

/// Both drains on one server build.
pub struct ClusterFigures {
    pub build: ServerBuild,
    pub events: u64,
    pub r1: ClusterDrain,
    pub r3: ClusterDrain,
}

impl ClusterFigures {
    fn rate(&self, d: &ClusterDrain) -> f64 {
        self.events as f64 / d.wall.as_secs_f64()
    }

    /// The R3 drain's rate as a share of the R1 drain's.
    pub fn r3_share(&self) -> f64 {
        self.rate(&self.r3) / self.rate(&self.r1)
    }

    pub fn print(&self) {
        for d in [&self.r1, &self.r3] {
            println!(
                "   {:?} server, R{}: {} events in {} = {} events/s, {} deliveries",
                self.build,
                d.replicas,
                thousands(self.events),
                secs(d.wall),
                thousands(self.rate(d) as u64),
                thousands(d.deliveries)
            );
        }
        println!(
            "   {:?} server: R3 drains at {:.2} × R1",
            self.build,
            self.r3_share()
        );
    }
}

/// Starts a cluster of `build` and drains `n` events from an R1 stream,
/// then from an R3 stream, with `program`.
pub async fn r1_and_r3(program: &Path, build: ServerBuild, n: u64) -> ClusterFigures {
    let env = TestEnv::new().await;
    let cluster = NatsCluster::start(env.fresh_dir("cluster"), build).await;
    let bus = cluster.bus(&env).await;
    let r1 = drain(program, &env, &cluster, &bus, 1, n).await;
    let r3 = drain(program, &env, &cluster, &bus, 3, n).await;
    ClusterFigures {
        build,
        events: n,
        r1,
        r3,
    }
}

/// A fresh stream of `replicas` with the backlog, drained by one engine
/// from start to the last acknowledgement.
async fn drain(
    program: &Path,
    env: &TestEnv,
    cluster: &NatsCluster,
    bus: &Bus,
    replicas: usize,
    n: u64,
) -> ClusterDrain {
    let _ = bus.js.delete_stream(&bus.stream).await;
    let _ = sqlx::raw_sql(&format!("TRUNCATE {TIKTOK_TABLE}"))
        .execute(&env.db)
        .await;
    bus.js
        .create_stream(stream::Config {
            name: bus.stream.clone(),
            subjects: vec![bus.subject(">")],
            num_replicas: replicas,
            ..Default::default()
        })
        .await
        .expect("create the cluster's stream");
    let messages = (0..n).map(|i| {
        let g = generate(i, backlog_event_id(i));
        (bus.subject(&g.subject_suffix), g.payload)
    });
    publish_windowed(&bus.js, PUBLISH_WINDOW, messages).await;
    let pipeline = adapt_pipeline(
        &env.tiktok_pipeline(),
        &[("replicas: 1".into(), format!("replicas: {replicas}"))],
    );
    env.write_pipeline("tiktok.yaml", &pipeline);

    let start = Instant::now();
    let engine = env
        .engine()
        .program(program)
        .var("NODE_ENV", "production")
        .var("RUST_LOG", "warn")
        .var("LISTEN_ADDR", "127.0.0.1")
        .var("NATS_URL", cluster.urls())
        .spawn();
    let within = Duration::from_secs(120 + n / 500);
    let info = wait_for_every("the cluster drain", within, POLL, || async {
        engine.assert_running();
        let info = bus.try_consumer_info().await?;
        let done = info.ack_floor.stream_sequence >= n && info.num_ack_pending == 0;
        if done {
            Ok(info)
        } else {
            Err(format!("ack floor {}", info.ack_floor.stream_sequence))
        }
    })
    .await;
    let wall = start.elapsed();
    engine.terminate().await;
    ClusterDrain {
        replicas,
        wall,
        deliveries: info.delivered.consumer_sequence,
    }
}
