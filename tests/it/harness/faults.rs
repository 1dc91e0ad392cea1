//! Harness additions for the fault-tolerance tests (`tests/it/faults.rs`): a
//! NATS server of the test's own (to kill and restart), a dead-letter queue
//! to inspect, pipeline variants, bulk publishing, and probes that must keep
//! holding for a while (an outage) rather than become true once.
//!
//! Built on the rest of the harness.

// Shared by several test binaries, each using part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, stream};
use async_nats::HeaderMap;
use bytes::Bytes;
use futures::StreamExt;
use serde_json::{json, Value};

use crate::harness::{
    adapt_pipeline, all_acked, example_event, expect_eq, free_port, jetstream_answers,
    nats_server_bin, nats_url, publish_windowed, redeliveries, signal, state, wait_for, Engine,
    EngineBuilder, Metrics, TestEnv, DEADLINE, FAILED, PROCESSED, RECEIVED, TIKTOK_TABLE,
};

pub const NATS_STATUS: &str = "collector_nats_connection_status";
pub const SINK_RETRIES: &str = "ingestd_sink_retries_total";
pub const DEAD_LETTERS: &str = "ingestd_dead_letters_total";
pub const VALIDATION_ERROR: &[(&str, &str)] = &[("reason", "validation_error")];
pub const PROCESSING_ERROR: &[(&str, &str)] = &[("reason", "processing_error")];

/// The subject suffix valid events are published on.
pub const TOP_VIEW: &str = "tiktok.top.video.view";

/// How often [`assert_holds`] re-checks its condition: an outage lasts
/// minutes, and consumer info is not free for the shared server.
const HOLD_INTERVAL: Duration = Duration::from_millis(200);

// ---------------------------------------------------------------------------
// Events
// ---------------------------------------------------------------------------

/// The README's example event under another eventId: a valid event whose
/// row is known in advance.
pub fn event(event_id: &str) -> Value {
    let mut event = example_event("top-video-view.json");
    event["eventId"] = json!(event_id);
    event
}

pub fn to_bytes(event: &Value) -> Vec<u8> {
    serde_json::to_vec(event).expect("serialize event")
}

/// `count` distinct, sortable eventIds: `<prefix>-00000`, ...
pub fn event_ids(prefix: &str, count: usize) -> Vec<String> {
    (0..count).map(|i| format!("{prefix}-{i:05}")).collect()
}

// ---------------------------------------------------------------------------
// Probes that must keep holding
// ---------------------------------------------------------------------------

/// Checks `probe` repeatedly for the whole `window`, panicking at the first
/// failure: for "must not happen" properties (no redelivery, no dead
/// letter) that can only be observed over the time they would take.
pub async fn assert_holds<F, Fut>(what: &str, window: Duration, mut probe: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let started = Instant::now();
    loop {
        if let Err(broken) = probe().await {
            panic!(
                "{what} stopped holding after {:?}: {broken}",
                started.elapsed()
            );
        }
        if started.elapsed() >= window {
            return;
        }
        tokio::time::sleep(HOLD_INTERVAL).await;
    }
}

/// `Ok` when the engine's books balance: every delivery ended in exactly
/// one outcome, so `received = processed + failed` once it is idle.
pub fn books_balance(m: &Metrics) -> Result<(), String> {
    let (received, processed, failed) = (
        m.sum(RECEIVED, &[]),
        m.sum(PROCESSED, &[]),
        m.sum(FAILED, &[]),
    );
    if received == processed + failed {
        Ok(())
    } else {
        Err(format!(
            "received {received} != processed {processed} + failed {failed}"
        ))
    }
}

/// Waits until the engine has processed `processed` events and its books
/// balance (counters are updated just after the acks, so an all-acked
/// consumer may precede them by a moment).
pub async fn wait_settled(engine: &Engine, processed: f64) -> Metrics {
    wait_for("processed count and balanced books", DEADLINE, || async {
        let m = engine.try_metrics().await?;
        expect_eq(m.sum(PROCESSED, &[]), processed).map_err(|e| format!("processed {e}"))?;
        books_balance(&m)?;
        Ok(m)
    })
    .await
}

// ---------------------------------------------------------------------------
// Rows
// ---------------------------------------------------------------------------

/// Every stored eventId, sorted, duplicates kept: compared with the sorted
/// published ids it shows at once anything missing, extra or twice.
pub async fn stored_ids(env: &TestEnv) -> Vec<String> {
    sqlx::query_scalar(r#"SELECT "eventId" FROM "TiktokEvent" ORDER BY 1"#)
        .fetch_all(&env.db)
        .await
        .expect("read eventIds")
}

/// Waits until the table holds at least `min` rows (the table is created by
/// the engine's migration, so "no table yet" is just "not yet").
pub async fn wait_rows_at_least(env: &TestEnv, min: i64, timeout: Duration) -> i64 {
    wait_for(&format!("at least {min} rows"), timeout, || async {
        let n = env.try_count(TIKTOK_TABLE).await?;
        if n >= min {
            Ok(n)
        } else {
            Err(format!("{n} rows"))
        }
    })
    .await
}

// ---------------------------------------------------------------------------
// The JetStream side of a test, on the shared server or on a NatsServer
// ---------------------------------------------------------------------------

/// The test's stream and durable consumer on one server. [`TestEnv`]'s own
/// helpers only know the shared server; this also serves a [`NatsServer`].
#[derive(Clone)]
pub struct Bus {
    pub url: String,
    pub js: jetstream::Context,
    pub stream: String,
    pub durable: String,
    pub subject_prefix: String,
}

impl Bus {
    /// The test's names on the machine's NATS.
    pub fn shared(env: &TestEnv) -> Self {
        Self::with(env, nats_url(), env.js.clone())
    }

    /// The test's names on another server.
    pub async fn connect(env: &TestEnv, url: &str) -> Self {
        Self::with(env, url, jetstream::new(nats_client(url).await))
    }

    /// The test's names on a TLS server whose certificate `ca` signs.
    pub async fn connect_tls(env: &TestEnv, url: &str, ca: &str) -> Self {
        let client = nats_client_with(url, Some(Path::new(ca))).await;
        Self::with(env, url, jetstream::new(client))
    }

    pub fn with(env: &TestEnv, url: &str, js: jetstream::Context) -> Self {
        Self {
            url: url.to_owned(),
            js,
            stream: env.stream.clone(),
            durable: env.durable.clone(),
            subject_prefix: env.subject_prefix.clone(),
        }
    }

    pub fn subject(&self, suffix: &str) -> String {
        format!("{}{suffix}", self.subject_prefix)
    }

    /// Creates the test's stream before the engine does (which then uses it
    /// as is), so that events can be published before the engine starts and
    /// reach it as full batches.
    pub async fn create_stream(&self) {
        self.js
            .create_stream(stream::Config {
                name: self.stream.clone(),
                subjects: vec![self.subject(">")],
                ..Default::default()
            })
            .await
            .expect("create the stream");
    }

    /// Publishes and waits for JetStream's confirmation; returns the stream
    /// sequence (which dead letters must name).
    pub async fn publish(&self, suffix: &str, headers: HeaderMap, payload: Vec<u8>) -> u64 {
        let subject = self.subject(suffix);
        self.js
            .publish_with_headers(subject.clone(), headers, payload.into())
            .await
            .unwrap_or_else(|e| panic!("publish to {subject}: {e}"))
            .await
            .unwrap_or_else(|e| panic!("publish ack for {subject}: {e}"))
            .sequence
    }

    /// Publishes the valid events of `ids`, pipelined (confirmations awaited
    /// by windows): tens of thousands take seconds, not minutes.
    pub async fn publish_events(&self, ids: &[String]) {
        const WINDOW: usize = 500;
        let subject = self.subject(TOP_VIEW);
        // Collected: a lazy map's closure would keep the future from being
        // spawned (the compiler cannot prove it `Send` for every lifetime).
        let events: Vec<_> = ids
            .iter()
            .map(|id| (subject.clone(), to_bytes(&event(id))))
            .collect();
        publish_windowed(&self.js, WINDOW, events).await;
    }

    /// Pulls one message from the durable consumer, as a peer of the engine
    /// (another process sharing it) would, and does not settle it.
    pub async fn take_one(&self) -> jetstream::Message {
        let consumer: consumer::PullConsumer = self
            .js
            .get_stream(&self.stream)
            .await
            .expect("get stream")
            .get_consumer(&self.durable)
            .await
            .expect("get consumer");
        let mut batch = consumer
            .fetch()
            .max_messages(1)
            .messages()
            .await
            .expect("fetch");
        batch.next().await.expect("a message").expect("a delivery")
    }

    pub async fn try_consumer_info(&self) -> Result<consumer::Info, String> {
        crate::harness::consumer_info(&self.js, &self.stream, &self.durable).await
    }

    /// `Ok` while no message was ever delivered twice and the dead-letter
    /// queue holds exactly `letters`: what an outage must not change.
    pub async fn nothing_redelivered(
        &self,
        dlq: &DeadLetterQueue,
        letters: u64,
    ) -> Result<(), String> {
        let info = self.try_consumer_info().await?;
        expect_eq(redeliveries(&info), 0).map_err(|e| format!("redeliveries {e}"))?;
        expect_eq(dlq.try_count().await?, letters).map_err(|e| format!("dead letters {e}"))
    }

    pub async fn consumer_info(&self) -> consumer::Info {
        self.try_consumer_info().await.expect("consumer info")
    }

    /// Waits until every message of the stream was delivered and acked.
    pub async fn wait_all_acked(&self, timeout: Duration) -> consumer::Info {
        wait_for("every message to be acked", timeout, || async {
            all_acked(self.try_consumer_info().await?)
        })
        .await
    }

    /// Starts the engine and waits until it serves HTTP and has created the
    /// durable consumer on this bus's server.
    pub async fn start(&self, builder: EngineBuilder<'_>) -> Engine {
        let engine = builder.spawn();
        engine.wait_ready().await;
        wait_for("the engine's durable consumer", DEADLINE, || {
            self.try_consumer_info()
        })
        .await;
        engine
    }
}

/// A client that reconnects quickly and forever: publishers must survive a
/// server restart.
pub async fn nats_client(url: &str) -> async_nats::Client {
    nats_client_with(url, None).await
}

/// Options for `url`, with its `user:password@` or `token@` passed as
/// credentials (async-nats ignores credentials in URLs) and `ca` (a PEM
/// file) trusted for TLS; returns them with the URL without credentials.
pub fn client_options(url: &str, ca: Option<&Path>) -> (async_nats::ConnectOptions, String) {
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8_lossy()
            .into_owned()
    };
    let mut options = async_nats::ConnectOptions::new();
    let mut parsed = url::Url::parse(url).expect("a NATS URL");
    let user = decode(parsed.username());
    match (user.is_empty(), parsed.password().map(decode)) {
        (false, Some(pass)) => options = options.user_and_password(user, pass),
        (false, None) => options = options.token(user),
        _ => {}
    }
    let _ = parsed.set_username("");
    let _ = parsed.set_password(None);
    if let Some(ca) = ca {
        options = options
            .add_root_certificates(ca.to_path_buf())
            .require_tls(true);
    }
    (options, parsed.to_string())
}

/// A client for `url` (see [`client_options`]).
pub async fn nats_client_with(url: &str, ca: Option<&Path>) -> async_nats::Client {
    let (options, bare) = client_options(url, ca);
    options
        .max_reconnects(None)
        .reconnect_delay_callback(|_| Duration::from_millis(100))
        .connect(bare.as_str())
        .await
        .unwrap_or_else(|e| panic!("connect to NATS at {url}: {e}"))
}

// ---------------------------------------------------------------------------
// A NATS server of the test's own
// ---------------------------------------------------------------------------

/// A `nats-server` with JetStream that the test may stop and restart (same
/// port, same store, so streams and consumers survive), and whose limits it
/// chooses. Killed on drop; its files live in the test's dir.
pub struct NatsServer {
    pub port: u16,
    /// `user:password@`, `token@` or empty: what clients put in the URL.
    userinfo: String,
    /// The CA clients need, for a TLS server.
    ca: Option<PathBuf>,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl NatsServer {
    /// Starts a server in `dir` with `extra` appended to its config file
    /// (e.g. `max_payload: 4MB`; nats-server 2.9 takes that only from a
    /// file), and waits until JetStream answers.
    pub async fn start(dir: PathBuf, extra: &str) -> Self {
        Self::start_with_credentials(dir, extra, "").await
    }

    /// As [`Self::start`], for a server whose `extra` config demands
    /// credentials: `userinfo` (`user:password@` or `token@`) goes into
    /// [`Self::url`].
    pub async fn start_with_credentials(dir: PathBuf, extra: &str, userinfo: &str) -> Self {
        Self::start_configured(dir, extra, userinfo, None).await
    }

    /// As [`Self::start`], for a server with a `tls {}` block in `extra`
    /// whose certificate `ca` (a PEM file) signs.
    pub async fn start_with_tls(dir: PathBuf, extra: &str, ca: &str) -> Self {
        Self::start_configured(dir, extra, "", Some(PathBuf::from(ca))).await
    }

    async fn start_configured(
        dir: PathBuf,
        extra: &str,
        userinfo: &str,
        ca: Option<PathBuf>,
    ) -> Self {
        let port = free_port();
        let store = dir.join("jetstream");
        let config = dir.join("nats.conf");
        let text = format!(
            "host: 127.0.0.1\nport: {port}\n{extra}\njetstream {{\n  store_dir: {:?}\n}}\n",
            store.display().to_string()
        );
        std::fs::write(&config, text).expect("write the nats config");
        let mut server = Self {
            port,
            userinfo: userinfo.to_string(),
            ca,
            config,
            log: dir.join("nats.log"),
            child: None,
        };
        server.restart().await;
        server
    }

    pub fn url(&self) -> String {
        format!("nats://{}127.0.0.1:{}", self.userinfo, self.port)
    }

    /// Starts the process again on the same port and store, and waits until
    /// JetStream answers (it has recovered its streams by then).
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "nats-server is already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open the nats log");
        let child = Command::new(nats_server_bin())
            .arg("-c")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log)
            .spawn()
            .expect("spawn nats-server");
        self.child = Some(child);
        let url = self.url();
        wait_for("our nats-server's JetStream", DEADLINE, || async {
            let (options, bare) = client_options(&url, self.ca.as_deref());
            let client = options.connect(bare).await.map_err(state("connect"))?;
            jetstream_answers(&client).await
        })
        .await;
    }

    /// Stops the server (SIGTERM: it flushes its store, so what it confirmed
    /// survives; a SIGKILL could lose confirmed messages, which would be
    /// the server's fault, not the engine's) and waits for it to exit.
    pub async fn stop(&mut self) {
        let mut child = self.child.take().expect("nats-server is running");
        signal(child.id(), "TERM");
        wait_for("nats-server to exit", DEADLINE, || {
            let exited = child.try_wait().map_err(state("try_wait"));
            async move {
                match exited? {
                    Some(_) => Ok(()),
                    None => Err("still running".to_owned()),
                }
            }
        })
        .await;
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("----- nats-server log -----\n{}", self.log());
        }
    }
}

/// SIGKILLs the engine (no chance to ack, flush or say goodbye) and waits
/// for it to be gone.
pub async fn kill9(engine: &Engine) {
    signal(engine.pid(), "KILL");
    engine.wait_exit().await;
}

// ---------------------------------------------------------------------------
// Dead letters
// ---------------------------------------------------------------------------

/// A stream capturing a unique dead-letter subject, for pipelines with
/// `action: dead_letter` (which refuse to load without one). Deleted on
/// drop.
pub struct DeadLetterQueue {
    pub subject: String,
    pub stream: String,
    /// The stream the engine keeps the consumer's max-deliveries
    /// advisories in (its name as the engine forms it).
    pub advisories: String,
    js: jetstream::Context,
    url: String,
}

/// One dead letter as JetStream stored it.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub payload: Bytes,
    pub headers: HeaderMap,
}

impl DeadLetter {
    /// The first value of header `name` ("" when absent, which no expected
    /// value is).
    pub fn header(&self, name: &str) -> String {
        self.headers
            .get(name)
            .map(|v| v.to_string())
            .unwrap_or_default()
    }
}

impl DeadLetterQueue {
    pub async fn create(env: &TestEnv, bus: &Bus) -> Self {
        let queue = Self {
            subject: format!("{}.dlq.tiktok", env.id),
            stream: format!("DLQ_{}", env.id),
            advisories: format!("INGESTD_MAX_DELIVERIES_{}_{}", bus.stream, bus.durable),
            js: bus.js.clone(),
            url: bus.url.clone(),
        };
        queue.create_stream().await;
        queue
    }

    /// Creates the queue's stream (again, after a test deleted it).
    pub async fn create_stream(&self) {
        self.js
            .create_stream(stream::Config {
                name: self.stream.clone(),
                subjects: vec![self.subject.clone()],
                ..Default::default()
            })
            .await
            .expect("create the dead-letter stream");
    }

    /// Every dead letter, in order.
    pub async fn letters(&self) -> Vec<DeadLetter> {
        let mut stream = self
            .js
            .get_stream(&self.stream)
            .await
            .expect("get the dead-letter stream");
        let info = stream
            .info()
            .await
            .expect("dead-letter stream info")
            .state
            .clone();
        let mut letters = Vec::new();
        if info.messages == 0 {
            return letters;
        }
        for seq in info.first_sequence..=info.last_sequence {
            let m = stream
                .get_raw_message(seq)
                .await
                .unwrap_or_else(|e| panic!("dead letter {seq}: {e}"));
            letters.push(DeadLetter {
                payload: m.payload,
                headers: m.headers,
            });
        }
        letters
    }

    pub async fn try_count(&self) -> Result<u64, String> {
        let mut stream = self
            .js
            .get_stream(&self.stream)
            .await
            .map_err(state("get the dead-letter stream"))?;
        let info = stream.info().await.map_err(state("stream info"))?;
        Ok(info.state.messages)
    }

    /// Waits for exactly `count` dead letters and returns them.
    pub async fn wait_letters(&self, count: u64) -> Vec<DeadLetter> {
        wait_for(&format!("{count} dead letters"), DEADLINE, || async {
            expect_eq(self.try_count().await?, count)
        })
        .await;
        self.letters().await
    }
}

impl Drop for DeadLetterQueue {
    /// Best effort, on its own runtime (the test's may be shutting down).
    fn drop(&mut self) {
        for stream in [&self.stream, &self.advisories] {
            let (stream, url) = (stream.clone(), self.url.clone());
            crate::harness::on_own_runtime(crate::harness::delete_stream(url, stream));
        }
    }
}

// ---------------------------------------------------------------------------
// Pipeline variants
// ---------------------------------------------------------------------------

/// The test's tiktok pipeline with some settings changed. Each change
/// replaces a line of the shipped file and panics if the line is gone, so
/// a changed shipped file cannot silently leave a test on default settings.
pub struct Variant(String);

impl Variant {
    pub fn of(env: &TestEnv) -> Self {
        Self(env.tiktok_pipeline())
    }

    fn replace(self, from: &str, to: String) -> Self {
        Self(adapt_pipeline(&self.0, &[(from.to_owned(), to)]))
    }

    pub fn ack_wait(self, value: Duration) -> Self {
        let ms = value.as_millis();
        self.replace("      ack_wait: 30s\n", format!("      ack_wait: {ms}ms\n"))
    }

    /// With the exactly-once ledger.
    pub fn exactly_once(self) -> Self {
        self.replace(
            "    batch:\n",
            "    exactly_once: true\n    batch:\n".into(),
        )
    }

    pub fn max_deliver(self, n: u32) -> Self {
        self.replace(
            "      max_deliver: 5\n",
            format!("      max_deliver: {n}\n"),
        )
    }

    /// How often the lag gauges are read from the consumer.
    pub fn lag_interval(self, value: Duration) -> Self {
        let ms = value.as_millis();
        self.replace(
            "    consumer:\n",
            format!("    lag_interval: {ms}ms\n    consumer:\n"),
        )
    }

    pub fn max_payload(self, size: &str) -> Self {
        self.replace(
            "name: tiktok\n",
            format!("name: tiktok\nmax_payload: {size}\n"),
        )
    }

    /// `on_error.invalid` with `lines` (YAML at the key's indentation)
    /// after `action: <action>`.
    pub fn invalid(self, action: &str, lines: &[&str]) -> Self {
        let extra: String = lines.iter().map(|l| format!("    {l}\n")).collect();
        self.replace(
            "    action: ack\n",
            format!("    action: {action}\n{extra}"),
        )
    }

    pub fn dead_letter_to(self, queue: &DeadLetterQueue) -> Self {
        let subject = format!("subject: {}", queue.subject);
        self.invalid("dead_letter", &[&subject])
    }

    /// Writes it over the test's `tiktok.yaml`.
    pub fn write(self, env: &TestEnv) {
        env.write_pipeline("tiktok.yaml", &self.0);
    }
}

/// A test's environment, a bus on the shared server and a dead-letter
/// queue, with the pipeline `variant` makes of one that dead-letters to the
/// queue written (not started).
pub async fn with_dead_letters(
    variant: impl FnOnce(Variant) -> Variant,
) -> (TestEnv, Bus, DeadLetterQueue) {
    let env = TestEnv::new().await;
    let bus = Bus::shared(&env);
    let dlq = DeadLetterQueue::create(&env, &bus).await;
    variant(Variant::of(&env).dead_letter_to(&dlq)).write(&env);
    (env, bus, dlq)
}

// ---------------------------------------------------------------------------
// Health, watched throughout
// ---------------------------------------------------------------------------

/// Polls `/live` and `/ready` in the background and records every answer
/// that is not 200 with status "ok": "stays healthy throughout" is a
/// property of the whole run, not of one request at the end.
pub struct HealthWatch {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<(u32, Vec<String>)>,
}

impl HealthWatch {
    pub fn start(port: u16) -> Self {
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .expect("http client");
            let (mut polls, mut bad) = (0, Vec::new());
            loop {
                for path in ["/live", "/ready"] {
                    if let Err(e) = healthy(&http, port, path).await {
                        bad.push(format!("{path}: {e}"));
                    }
                }
                polls += 1;
                tokio::select! {
                    _ = stopped.changed() => return (polls, bad),
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
            }
        });
        Self { stop, task }
    }

    /// Stops watching; returns how many rounds were polled and every
    /// unhealthy answer.
    pub async fn finish(self) -> (u32, Vec<String>) {
        let _ = self.stop.send(true);
        self.task.await.expect("health watch task")
    }
}

async fn healthy(http: &reqwest::Client, port: u16, path: &str) -> Result<(), String> {
    let url = format!("http://127.0.0.1:{port}{path}");
    let reply = http.get(&url).send().await.map_err(state("request"))?;
    let status = reply.status().as_u16();
    let body = reply.text().await.map_err(state("body"))?;
    let json: Value = serde_json::from_str(&body).map_err(state("not JSON"))?;
    if status == 200 && json["status"] == "ok" {
        Ok(())
    } else {
        Err(format!("{status} {body}"))
    }
}
