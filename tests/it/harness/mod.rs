//! Test harness shared by the integration tests of `ingestd`.
//!
//! The tests run the real binary against the machine's NATS (JetStream) and
//! PostgreSQL, in parallel. Everything a test touches on those servers is
//! therefore named after a per-test id ([`TestEnv`]): its own database, its own
//! stream, subjects and durable consumer. Nothing here sleeps to synchronise:
//! every wait polls a condition against a deadline ([`wait_for`]).

// Every test binary compiles this module but uses only part of it.
#![allow(dead_code)]

pub mod batching;
pub mod faults;
pub mod operations;
pub mod reload;
pub mod statements;

use std::collections::BTreeMap;
use std::fmt::Display;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{self, consumer, stream};
use serde_json::Value;
use sqlx::postgres::{PgPool, PgPoolOptions};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};

/// The families of the shipped tiktok.yaml (prefix `collector`).
pub const RECEIVED: &str = "collector_events_received_total";
pub const PROCESSED: &str = "collector_events_processed_total";
pub const FAILED: &str = "collector_events_failed_total";

/// Default deadline of every wait: generous for a loaded CI machine, short
/// enough that a broken engine fails the suite quickly.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// How often [`wait_for`] probes its condition.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// The NATS server of the tests: `$NATS_URL`, by default the machine's
/// (to run the suite against another server version, start one and point
/// `NATS_URL` at it; see also [`nats_server_bin`]).
pub fn nats_url() -> &'static str {
    static URL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    URL.get_or_init(|| {
        std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
    })
}

/// The `nats-server` binary tests start servers of their own with:
/// `$NATS_SERVER`, by default Debian's.
pub fn nats_server_bin() -> String {
    std::env::var("NATS_SERVER").unwrap_or_else(|_| "/usr/sbin/nats-server".to_owned())
}
pub const PG_HOST: &str = "127.0.0.1";
pub const PG_PORT: u16 = 5432;

/// The repository root, so that pipelines copied to temp dirs can point at
/// the shipped schemas/ and migrations/ with absolute paths.
pub fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The `ingestd` binary cargo built for this test run.
pub fn ingestd_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_ingestd"))
}

/// Postgres URL of `database` on `port` (the real server or a [`TcpProxy`]).
/// Written the way the original service's `.env` wrote it (Prisma style).
pub fn postgres_url(port: u16, database: &str) -> String {
    format!("postgresql://postgres:postgres@{PG_HOST}:{port}/{database}")
}

// ---------------------------------------------------------------------------
// Waiting
// ---------------------------------------------------------------------------

/// Polls `probe` until it returns `Ok`, or panics once `timeout` has passed.
///
/// `probe` reports the state it saw as `Err(description)`; the last one goes
/// into the panic message so that a timeout says *why* it timed out.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let last = match probe().await {
            Ok(value) => return value,
            Err(state) => state,
        };
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}; last state: {last}");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// `Ok(())` when `actual == expected`, else the mismatch as the probe state.
pub fn expect_eq<T: PartialEq + std::fmt::Debug>(actual: T, expected: T) -> Result<(), String> {
    if actual == expected {
        Ok(())
    } else {
        Err(format!("got {actual:?}, want {expected:?}"))
    }
}

/// Turns any error into a probe state, for `?` inside [`wait_for`] probes.
pub fn state<E: Display>(context: &str) -> impl FnOnce(E) -> String + '_ {
    move |e| format!("{context}: {e}")
}

// ---------------------------------------------------------------------------
// Naming and files
// ---------------------------------------------------------------------------

/// An id unique across parallel tests and test processes, usable as a NATS
/// subject token, a stream/consumer name and part of a database name.
pub fn unique_id() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let micros = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_micros();
    format!("t{:x}x{n:x}x{:x}", std::process::id(), micros & 0xff_ffff)
}

/// A free TCP port on 127.0.0.1 (bound, read, released) for the engine's HTTP
/// server. Racy in theory, fine for tests.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind an ephemeral port")
        .port()
}

/// Applies textual `(from, to)` replacements to a pipeline file.
///
/// Panics when a `from` does not occur: if the shipped pipeline changed so
/// that a name is no longer rewritten, tests would silently share a stream or
/// consumer, which is worse than failing loudly.
pub fn adapt_pipeline(yaml: &str, replacements: &[(String, String)]) -> String {
    replacements
        .iter()
        .fold(yaml.to_owned(), |text, (from, to)| {
            assert!(
                text.contains(from.as_str()),
                "pipeline adaptation: {from:?} not found in the pipeline text"
            );
            text.replace(from.as_str(), to)
        })
}

/// The text of a file of the repository (pipelines, examples, ...).
pub fn repo_file(relative: &str) -> String {
    let path = repo_root().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// One of the example events of `examples/events/`, parsed.
pub fn example_event(file_name: &str) -> Value {
    let text = repo_file(&format!("examples/events/{file_name}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parse example {file_name}: {e}"))
}

/// 1-based number of the first line of `text` that contains `needle`.
pub fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .map(|i| i + 1)
        .unwrap_or_else(|| panic!("{needle:?} not found in text"))
}

/// Whether `output` names `file_name` at `line` as `file:line` (optionally
/// followed by `:column`), without mistaking line 3 for line 35.
pub fn names_location(output: &str, file_name: &str, line: usize) -> bool {
    let needle = format!("{file_name}:{line}");
    output.match_indices(&needle).any(|(at, _)| {
        !output[at + needle.len()..]
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_digit())
    })
}

// ---------------------------------------------------------------------------
// The per-test environment
// ---------------------------------------------------------------------------

/// A row of the contract's `TiktokEvent` table, with the timestamp rendered
/// as text (the column has no time zone; text makes the comparison exact)
/// and `createdAt` as its age in seconds relative to the database's UTC now.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct TiktokRow {
    pub id: String,
    #[sqlx(rename = "eventId")]
    pub event_id: String,
    pub timestamp: String,
    #[sqlx(rename = "funnelStage")]
    pub funnel_stage: String,
    #[sqlx(rename = "eventType")]
    pub event_type: String,
    pub data: Value,
    #[sqlx(rename = "createdAt")]
    pub created_at: String,
    pub created_age_secs: f64,
}

/// The unquoted name of the contract's table, as SQL.
pub const TIKTOK_TABLE: &str = r#""TiktokEvent""#;

/// Everything one test owns on the shared servers, removed again on drop:
/// a database, a stream (with its consumer), and a temp directory holding the
/// adapted pipeline, engine logs and empty working directories.
pub struct TestEnv {
    pub id: String,
    pub db_name: String,
    pub stream: String,
    pub durable: String,
    /// `<id>.raw.events.`: what the shipped `raw.events.` becomes.
    pub subject_prefix: String,
    pub dir: PathBuf,
    pub js: jetstream::Context,
    /// A pool on the test's database, straight to Postgres (never proxied).
    pub db: PgPool,
    spawned: AtomicU32,
}

impl TestEnv {
    /// A fresh database, a temp dir, and `pipelines/tiktok.yaml` adapted to
    /// this test's names. The stream is left to the engine to create.
    pub async fn new() -> Self {
        let id = unique_id();
        let db_name = format!("ingestd_{id}");
        let dir = std::env::temp_dir().join(format!("ingestd-test-{id}"));
        std::fs::create_dir_all(dir.join("pipelines")).expect("create the test dir");
        create_database(&db_name).await;
        let db = PgPoolOptions::new()
            .max_connections(4)
            .connect(&postgres_url(PG_PORT, &db_name))
            .await
            .expect("connect to the test database");
        let nats = async_nats::connect(nats_url())
            .await
            .expect("connect to NATS");
        let env = Self {
            stream: format!("RAW_EVENTS_{id}"),
            durable: format!("ttk-collector-tiktok-{id}"),
            subject_prefix: format!("{id}.raw.events."),
            js: jetstream::new(nats),
            id,
            db_name,
            dir,
            db,
            spawned: AtomicU32::new(0),
        };
        env.write_pipeline("tiktok.yaml", &env.tiktok_pipeline());
        env
    }

    /// The rewrites that make the shipped tiktok pipeline this test's own.
    pub fn replacements(&self) -> Vec<(String, String)> {
        let root = repo_root().display();
        vec![
            ("RAW_EVENTS".into(), self.stream.clone()),
            ("raw.events.".into(), self.subject_prefix.clone()),
            ("ttk-collector-tiktok".into(), self.durable.clone()),
            ("../schemas/".into(), format!("{root}/schemas/")),
            ("../migrations".into(), format!("{root}/migrations")),
        ]
    }

    /// `pipelines/tiktok.yaml` with [`Self::replacements`] applied.
    pub fn tiktok_pipeline(&self) -> String {
        adapt_pipeline(&repo_file("pipelines/tiktok.yaml"), &self.replacements())
    }

    pub fn pipelines_dir(&self) -> PathBuf {
        self.dir.join("pipelines")
    }

    /// Writes (or overwrites) a pipeline file of this test's pipelines dir.
    pub fn write_pipeline(&self, file_name: &str, yaml: &str) -> PathBuf {
        let path = self.pipelines_dir().join(file_name);
        std::fs::write(&path, yaml).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        path
    }

    /// A new empty directory, used as an engine's cwd so that no stray
    /// `.env` is loaded, and as a home for its log.
    pub fn fresh_dir(&self, prefix: &str) -> PathBuf {
        let n = self.spawned.fetch_add(1, Ordering::Relaxed);
        let path = self.dir.join(format!("{prefix}-{n}"));
        std::fs::create_dir_all(&path).expect("create a fresh dir");
        path
    }

    /// URL of this test's database, direct.
    pub fn database_url(&self) -> String {
        postgres_url(PG_PORT, &self.db_name)
    }

    /// An engine with the default environment for this test; adjust with the
    /// builder, then `start()` (ready and consuming) or `spawn()`.
    pub fn engine(&self) -> EngineBuilder<'_> {
        EngineBuilder::new(self)
    }

    /// An engine started on this test's database behind a proxy the test
    /// stops and starts (an outage).
    pub async fn engine_behind_proxy(&self) -> (TcpProxy, Engine) {
        let proxy = TcpProxy::to_postgres().await;
        let engine = self
            .engine()
            .database_url(proxied(self, &proxy))
            .start()
            .await;
        (proxy, engine)
    }

    /// The full subject for a suffix such as `tiktok.top.video.view`.
    pub fn subject(&self, suffix: &str) -> String {
        format!("{}{suffix}", self.subject_prefix)
    }

    /// Publishes raw bytes and waits for JetStream to confirm storing them.
    pub async fn publish(&self, suffix: &str, payload: impl Into<Vec<u8>>) {
        let subject = self.subject(suffix);
        self.js
            .publish(subject.clone(), payload.into().into())
            .await
            .unwrap_or_else(|e| panic!("publish to {subject}: {e}"))
            .await
            .unwrap_or_else(|e| panic!("publish ack for {subject}: {e}"));
    }

    /// Publishes an event on the subject the producers use for it:
    /// `raw.events.tiktok.<funnelStage>.<eventType>`.
    pub async fn publish_event(&self, event: &Value) {
        let stage = event["funnelStage"].as_str().unwrap_or("top");
        let kind = event["eventType"].as_str().unwrap_or("unknown");
        let body = serde_json::to_vec(event).expect("serialize event");
        self.publish(&format!("tiktok.{stage}.{kind}"), body).await;
    }

    /// Creates the test's stream (all of its subjects) unless it exists:
    /// a backlog must be stored before any engine runs, and the engine uses
    /// an existing stream as it is.
    pub async fn create_stream(&self) {
        self.js
            .get_or_create_stream(stream::Config {
                name: self.stream.clone(),
                subjects: vec![self.subject(">")],
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await
            .expect("create the test's stream");
    }

    pub async fn stream_info(&self) -> stream::Info {
        let stream = self.js.get_stream(&self.stream).await.expect("get stream");
        stream.get_info().await.expect("stream info")
    }

    /// The durable consumer's state, or why it could not be read.
    pub async fn try_consumer_info(&self) -> Result<consumer::Info, String> {
        consumer_info(&self.js, &self.stream, &self.durable).await
    }

    pub async fn consumer_info(&self) -> consumer::Info {
        self.try_consumer_info().await.expect("consumer info")
    }

    /// Waits until the engine has created the stream and its consumer.
    pub async fn wait_consumer(&self) -> consumer::Info {
        wait_for("the engine's durable consumer", DEADLINE, || {
            self.try_consumer_info()
        })
        .await
    }

    /// Waits until every message of the stream was delivered and acked.
    pub async fn wait_all_acked(&self) -> consumer::Info {
        wait_for("every message to be acked", DEADLINE, || async {
            all_acked(self.try_consumer_info().await?)
        })
        .await
    }

    /// Every row of `table` (SQL, e.g. `"TiktokEvent"` or
    /// `ingest."TiktokEvent"`), oldest first.
    pub async fn try_rows_in(&self, table: &str) -> Result<Vec<TiktokRow>, sqlx::Error> {
        let sql = format!(
            r#"SELECT "id", "eventId",
                      to_char("timestamp", 'YYYY-MM-DD HH24:MI:SS.MS') AS "timestamp",
                      "funnelStage", "eventType", "data",
                      to_char("createdAt", 'YYYY-MM-DD HH24:MI:SS.MS') AS "createdAt",
                      EXTRACT(EPOCH FROM (now() AT TIME ZONE 'UTC') - "createdAt")::float8
                          AS created_age_secs
               FROM {table} ORDER BY "createdAt", "id""#
        );
        sqlx::query_as(&sql).fetch_all(&self.db).await
    }

    pub async fn rows(&self) -> Vec<TiktokRow> {
        self.try_rows_in(TIKTOK_TABLE).await.expect("read rows")
    }

    /// Waits for the row of `event_id` in `table` and returns it.
    pub async fn wait_row_in(&self, table: &str, event_id: &str) -> TiktokRow {
        wait_for(&format!("the row of {event_id:?}"), DEADLINE, || async {
            let rows = self.try_rows_in(table).await.map_err(state("query"))?;
            let ids: Vec<_> = rows.iter().map(|r| r.event_id.clone()).collect();
            rows.into_iter()
                .find(|r| r.event_id == event_id)
                .ok_or_else(|| format!("rows present: {ids:?}"))
        })
        .await
    }

    pub async fn wait_row(&self, event_id: &str) -> TiktokRow {
        self.wait_row_in(TIKTOK_TABLE, event_id).await
    }

    /// Runs one SQL statement on the test database (fixtures).
    pub async fn exec(&self, sql: &str) {
        sqlx::raw_sql(sql)
            .execute(&self.db)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
}

impl Drop for TestEnv {
    /// Best-effort removal of the database and stream. Runs on its own thread
    /// and runtime because the test's runtime may be the one being dropped.
    fn drop(&mut self) {
        let (db_name, stream) = (self.db_name.clone(), self.stream.clone());
        on_own_runtime(async move {
            delete_stream(nats_url().to_owned(), stream).await;
            let _ = drop_database(&db_name).await;
        });
        if std::thread::panicking() {
            eprintln!("test files kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The state of `durable` on `stream`, or why it could not be read.
pub async fn consumer_info(
    js: &jetstream::Context,
    stream: &str,
    durable: &str,
) -> Result<consumer::Info, String> {
    let stream = js.get_stream(stream).await.map_err(state("get stream"))?;
    stream
        .consumer_info(durable)
        .await
        .map_err(state("consumer info"))
}

/// Runs `cleanup` to completion on a thread and runtime of its own: drops
/// run while the test's runtime may be the one shutting down.
pub fn on_own_runtime(cleanup: impl std::future::Future<Output = ()> + Send + 'static) {
    let thread = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("cleanup runtime")
            .block_on(cleanup)
    });
    let _ = thread.join();
}

/// Best-effort deletion of a stream on the server at `url`.
pub async fn delete_stream(url: String, stream: String) {
    if let Ok(client) = async_nats::connect(url).await {
        let _ = jetstream::new(client).delete_stream(&stream).await;
    }
}

/// A connection to the `postgres` maintenance database, for CREATE/DROP.
async fn admin_pool() -> Result<PgPool, sqlx::Error> {
    PgPoolOptions::new()
        .max_connections(1)
        .connect(&postgres_url(PG_PORT, "postgres"))
        .await
}

async fn create_database(name: &str) {
    let admin = admin_pool().await.expect("connect to the postgres db");
    sqlx::raw_sql(&format!(r#"CREATE DATABASE "{name}""#))
        .execute(&admin)
        .await
        .unwrap_or_else(|e| panic!("create database {name}: {e}"));
    admin.close().await;
}

/// FORCE: a killed engine's connections may not be gone yet.
async fn drop_database(name: &str) -> Result<(), sqlx::Error> {
    let admin = admin_pool().await?;
    sqlx::raw_sql(&format!(r#"DROP DATABASE IF EXISTS "{name}" WITH (FORCE)"#))
        .execute(&admin)
        .await?;
    admin.close().await;
    Ok(())
}

// ---------------------------------------------------------------------------
// The engine process
// ---------------------------------------------------------------------------

/// Configuration of one `ingestd run`, defaulting to this test's database,
/// NATS, a free HTTP port and the test's pipelines dir.
pub struct EngineBuilder<'a> {
    env: &'a TestEnv,
    pipelines_dir: PathBuf,
    vars: BTreeMap<String, String>,
}

impl<'a> EngineBuilder<'a> {
    fn new(env: &'a TestEnv) -> Self {
        let vars = [
            ("DATABASE_URL", env.database_url()),
            ("NATS_URL", nats_url().to_owned()),
            ("PORT", free_port().to_string()),
            ("HOSTNAME", format!("test-{}", env.id)),
            ("NODE_ENV", "test".to_owned()),
            // Logs are read in test output, not on a terminal.
            ("NO_COLOR", "1".to_owned()),
            (
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            ),
        ];
        Self {
            env,
            pipelines_dir: env.pipelines_dir(),
            vars: vars.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
        }
    }

    /// Sets (or overrides) an environment variable of the engine.
    pub fn var(mut self, key: &str, value: impl Into<String>) -> Self {
        self.vars.insert(key.to_owned(), value.into());
        self
    }

    pub fn database_url(self, url: impl Into<String>) -> Self {
        self.var("DATABASE_URL", url)
    }

    pub fn pipelines_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.pipelines_dir = dir.into();
        self
    }

    /// The environment the engine will get (on top of the inherited one).
    pub fn vars(&self) -> &BTreeMap<String, String> {
        &self.vars
    }

    /// Runs `ingestd ARGS` (not necessarily `run`) with this environment in a
    /// fresh empty cwd, to completion; see [`run_to_exit`].
    pub async fn output(self, args: &[&str]) -> Output {
        let cwd = self.env.fresh_dir("cli");
        run_to_exit(args, &self.vars, &cwd).await
    }

    /// Starts the process without waiting for anything.
    pub fn spawn(self) -> Engine {
        let port: u16 = self.vars["PORT"].parse().expect("PORT is a number");
        let dir = self.env.fresh_dir("engine");
        let args = [
            "run".as_ref(),
            "--pipelines".as_ref(),
            self.pipelines_dir.as_os_str(),
        ];
        Engine::spawn(&args, &self.vars, &dir, port)
    }

    /// Starts the engine and waits until it serves HTTP and has set up this
    /// test's stream and consumer, so that publishing is safe.
    pub async fn start(self) -> Engine {
        let env = self.env;
        let engine = self.spawn();
        engine.wait_ready().await;
        env.wait_consumer().await;
        engine
    }
}

/// A running `ingestd`, killed on drop. Its stdout and stderr go to a log
/// file, printed when the test fails (see `Drop`).
pub struct Engine {
    child: Mutex<Child>,
    pub port: u16,
    pub log_path: PathBuf,
    http: reqwest::Client,
}

/// An HTTP response of the engine, read completely.
#[derive(Debug)]
pub struct HttpReply {
    pub status: u16,
    pub body: String,
}

impl HttpReply {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.body))
    }
}

/// Starts `command` with no input and its output in a new file at
/// `log_path` (read back when a test fails).
pub fn spawn_logged(mut command: Command, log_path: &Path) -> Child {
    let log = std::fs::File::create(log_path).expect("create a log file");
    command
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("clone the log handle"))
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {:?}: {e}", command.get_program()))
}

/// The HTTP client of the tests: a request never waits more than 5 s.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("http client")
}

impl Engine {
    /// Runs the binary with `args` and exactly the given variables on top of
    /// the inherited environment, in the empty dir `dir` (which also gets the
    /// log, outside any pipelines dir).
    pub fn spawn(
        args: &[&std::ffi::OsStr],
        vars: &BTreeMap<String, String>,
        dir: &Path,
        port: u16,
    ) -> Self {
        let log_path = dir.join("engine.log");
        let cwd = dir.join("cwd");
        std::fs::create_dir_all(&cwd).expect("create engine cwd");
        let mut command = Command::new(ingestd_bin());
        command.args(args).envs(vars).current_dir(&cwd);
        Self {
            child: Mutex::new(spawn_logged(command, &log_path)),
            port,
            log_path,
            http: http_client(),
        }
    }

    /// Everything the engine printed so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.lock().unwrap().id()
    }

    /// The exit status if the process has ended.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        self.child.lock().unwrap().try_wait().expect("try_wait")
    }

    pub async fn try_get(&self, path: &str) -> Result<HttpReply, String> {
        let url = format!("http://127.0.0.1:{}{path}", self.port);
        let response = self.http.get(&url).send().await.map_err(state(&url))?;
        let status = response.status().as_u16();
        let body = response.text().await.map_err(state(&url))?;
        Ok(HttpReply { status, body })
    }

    pub async fn get(&self, path: &str) -> HttpReply {
        self.try_get(path)
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    /// Waits until `GET /live` answers 200. Fails at once, not at the
    /// deadline, if the process exits meanwhile.
    pub async fn wait_ready(&self) {
        wait_for("GET /live to answer 200", DEADLINE, || async {
            if let Some(status) = self.exit_status() {
                panic!("ingestd exited early ({status}); log:\n{}", self.log());
            }
            let reply = self.try_get("/live").await?;
            expect_eq(reply.status, 200).map_err(|e| format!("/live status {e}"))
        })
        .await
    }

    pub async fn try_metrics(&self) -> Result<Metrics, String> {
        let reply = self.try_get("/metrics").await?;
        expect_eq(reply.status, 200).map_err(|e| format!("/metrics status {e}"))?;
        Metrics::parse(&reply.body)
    }

    pub async fn metrics(&self) -> Metrics {
        self.try_metrics().await.expect("metrics")
    }

    /// Waits until the sum of the `name` series matching `labels` is `want`.
    pub async fn wait_metric(&self, name: &str, labels: &[(&str, &str)], want: f64) -> Metrics {
        let what = format!("{name}{labels:?} == {want}");
        wait_for(&what, DEADLINE, || async {
            let metrics = self.try_metrics().await?;
            expect_eq(metrics.sum(name, labels), want)?;
            Ok(metrics)
        })
        .await
    }

    /// Waits until the sum of the `name` series matching `labels` reaches
    /// `min` (for counters that may legitimately count more than once).
    pub async fn wait_metric_at_least(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        min: f64,
    ) -> Metrics {
        let what = format!("{name}{labels:?} >= {min}");
        wait_for(&what, DEADLINE, || async {
            let metrics = self.try_metrics().await?;
            let value = metrics.sum(name, labels);
            if value >= min {
                Ok(metrics)
            } else {
                Err(format!("value {value}"))
            }
        })
        .await
    }

    /// Waits until `GET path` answers `status` with exactly the JSON `body`.
    pub async fn wait_reply(&self, path: &str, status: u16, body: &Value) -> HttpReply {
        let what = format!("GET {path} -> {status} {body}");
        wait_for(&what, DEADLINE, || async {
            let reply = self.try_get(path).await?;
            let json: Option<Value> = serde_json::from_str(&reply.body).ok();
            if reply.status == status && json.as_ref() == Some(body) {
                Ok(reply)
            } else {
                Err(format!("{} {}", reply.status, reply.body))
            }
        })
        .await
    }

    /// Asks the engine to stop (SIGTERM) and waits for it to exit.
    pub async fn terminate(&self) -> ExitStatus {
        let sent = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -TERM failed");
        self.wait_exit().await
    }

    pub async fn wait_exit(&self) -> ExitStatus {
        wait_for("ingestd to exit", DEADLINE, || async {
            self.exit_status().ok_or_else(|| "still running".to_owned())
        })
        .await
    }
}

impl Drop for Engine {
    /// Kills the process (and reaps it, so its connections are gone before
    /// the database is dropped); prints its log when the test is failing.
    fn drop(&mut self) {
        let child = self.child.get_mut().unwrap_or_else(|e| e.into_inner());
        let _ = child.kill();
        let _ = child.wait();
        if std::thread::panicking() {
            eprintln!(
                "----- ingestd log ({}) -----\n{}\n----- end of ingestd log -----",
                self.log_path.display(),
                self.log()
            );
        }
    }
}

/// Runs `ingestd ARGS` to completion (a one-shot command such as `check`, or
/// `run` that is expected to fail), killing it if it outlives `DEADLINE`.
pub async fn run_to_exit(args: &[&str], vars: &BTreeMap<String, String>, cwd: &Path) -> Output {
    let child = tokio::process::Command::new(ingestd_bin())
        .args(args)
        .envs(vars)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(DEADLINE, child)
        .await
        .unwrap_or_else(|_| panic!("ingestd {args:?} still running after {DEADLINE:?}"))
        .expect("run ingestd")
}

// ---------------------------------------------------------------------------
// Prometheus text format
// ---------------------------------------------------------------------------

/// One sample line: `name{label="value",...} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Sample {
    /// Whether every `(key, value)` of `labels` is among this sample's labels.
    pub fn has_labels(&self, labels: &[(&str, &str)]) -> bool {
        labels
            .iter()
            .all(|(k, v)| self.labels.get(*k).map(String::as_str) == Some(*v))
    }

    /// The label names, sorted.
    pub fn label_names(&self) -> Vec<&str> {
        self.labels.keys().map(String::as_str).collect()
    }
}

/// A parsed `/metrics` page: samples plus the `# TYPE` of each family.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    pub samples: Vec<Sample>,
    pub types: BTreeMap<String, String>,
}

impl Metrics {
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut metrics = Self::default();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if let Some(comment) = line.strip_prefix('#') {
                let mut words = comment.split_whitespace();
                if let (Some("TYPE"), Some(name), Some(kind)) =
                    (words.next(), words.next(), words.next())
                {
                    metrics.types.insert(name.to_owned(), kind.to_owned());
                }
            } else if !line.is_empty() {
                let sample = parse_sample(line)
                    .map_err(|e| format!("metrics line {}: {e}: {line}", n + 1))?;
                metrics.samples.push(sample);
            }
        }
        Ok(metrics)
    }

    /// The samples named `name` that carry at least `labels`.
    pub fn series<'a, 'b>(
        &'a self,
        name: &'b str,
        labels: &'b [(&'b str, &'b str)],
    ) -> impl Iterator<Item = &'a Sample> + 'b
    where
        'a: 'b,
    {
        self.samples
            .iter()
            .filter(move |s| s.name == name && s.has_labels(labels))
    }

    /// Sum of the matching series; 0 when there are none (an absent counter
    /// is a zero counter).
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        // fold from +0.0: `sum()` of nothing is -0.0, which reads oddly.
        self.series(name, labels)
            .fold(0.0, |total, s| total + s.value)
    }

    /// The single matching series; panics (showing the page's series of that
    /// name) when there are none or several.
    pub fn one(&self, name: &str, labels: &[(&str, &str)]) -> &Sample {
        let found: Vec<_> = self.series(name, labels).collect();
        match found.as_slice() {
            [one] => one,
            _ => panic!(
                "want exactly one {name} with {labels:?}, found {}; all {name}: {:#?}",
                found.len(),
                self.series(name, &[]).collect::<Vec<_>>()
            ),
        }
    }

    pub fn type_of(&self, family: &str) -> Option<&str> {
        self.types.get(family).map(String::as_str)
    }
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line
        .find(['{', ' ', '\t'])
        .ok_or("no value after the name")?;
    let name = line[..name_end].to_owned();
    let (labels, rest) = if line[name_end..].starts_with('{') {
        parse_labels(&line[name_end + 1..])?
    } else {
        (BTreeMap::new(), &line[name_end..])
    };
    // A timestamp may follow the value; the format allows it.
    let value = rest.split_whitespace().next().ok_or("no value")?;
    Ok(Sample {
        name,
        labels,
        value: parse_value(value)?,
    })
}

/// Parses `k="v",k2="v2"}` (after the `{`); returns the labels and the text
/// after the `}`. Label values may escape `\\`, `\"` and `\n`.
fn parse_labels(mut text: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut labels = BTreeMap::new();
    loop {
        text = text.trim_start_matches([',', ' ']);
        if let Some(rest) = text.strip_prefix('}') {
            return Ok((labels, rest));
        }
        let eq = text.find('=').ok_or("label without '='")?;
        let key = text[..eq].trim().to_owned();
        let quoted = text[eq + 1..]
            .strip_prefix('"')
            .ok_or("label value not quoted")?;
        let (value, rest) = unescape_until_quote(quoted)?;
        labels.insert(key, value);
        text = rest;
    }
}

fn unescape_until_quote(text: &str) -> Result<(String, &str), String> {
    let mut value = String::new();
    let mut chars = text.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Ok((value, &text[i + 1..])),
            '\\' => match chars.next() {
                Some((_, 'n')) => value.push('\n'),
                Some((_, escaped)) => value.push(escaped),
                None => break,
            },
            c => value.push(c),
        }
    }
    Err("unterminated label value".into())
}

/// A sample value or `le` bound: a float, `+Inf`, `-Inf` or `NaN`.
pub fn parse_value(text: &str) -> Result<f64, String> {
    match text {
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => text.parse().map_err(|e| format!("value {text:?}: {e}")),
    }
}

// ---------------------------------------------------------------------------
// A TCP proxy to Postgres, for outages that do not touch the shared server
// ---------------------------------------------------------------------------

/// Forwards connections from a local port to an upstream address. `stop()`
/// makes the upstream look down (connections cut, new ones refused);
/// `start()` brings it back on the same port.
pub struct TcpProxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    running: Option<(oneshot::Sender<()>, JoinHandle<()>)>,
    /// While true, connections stay open but no byte is forwarded (and new
    /// ones are accepted but not forwarded): a server that stopped answering.
    frozen: tokio::sync::watch::Sender<bool>,
}

impl TcpProxy {
    /// A running proxy to the machine's Postgres.
    pub async fn to_postgres() -> Self {
        let upstream = format!("{PG_HOST}:{PG_PORT}").parse().expect("address");
        Self::start_new(upstream).await
    }

    pub async fn start_new(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let mut proxy = Self {
            addr,
            upstream,
            running: None,
            frozen: tokio::sync::watch::channel(false).0,
        };
        proxy.serve(listener);
        proxy
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Closes the listening socket and every forwarded connection; returns
    /// once both are gone, so the outage is in effect.
    pub async fn stop(&mut self) {
        if let Some((shutdown, task)) = self.running.take() {
            let _ = shutdown.send(());
            let _ = task.await;
        }
    }

    /// Listens again on the same port (retrying briefly should the port still
    /// be held by a socket being torn down).
    pub async fn start(&mut self) {
        if self.running.is_some() {
            return;
        }
        let addr = self.addr;
        let listener = wait_for("the proxy port to be bindable", DEADLINE, || async move {
            rebind(addr).map_err(state("bind"))
        })
        .await;
        self.serve(listener);
    }

    /// Stops forwarding while keeping every connection open.
    pub fn freeze(&self) {
        self.frozen.send_replace(true);
    }

    /// Forwards again what was held.
    pub fn thaw(&self) {
        self.frozen.send_replace(false);
    }

    fn serve(&mut self, listener: TcpListener) {
        let (shutdown, signal) = oneshot::channel();
        let frozen = self.frozen.subscribe();
        let task = tokio::spawn(accept_loop(listener, self.upstream, signal, frozen));
        self.running = Some((shutdown, task));
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        if let Some((_, task)) = self.running.take() {
            task.abort();
        }
    }
}

fn rebind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(128)
}

/// Accepts and forwards until `shutdown`, then drops the listener and aborts
/// (and awaits) every connection task, which closes their sockets.
async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    mut shutdown: oneshot::Receiver<()>,
    frozen: tokio::sync::watch::Receiver<bool>,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => {
                if let Ok((client, _)) = accepted {
                    connections.spawn(forward(client, upstream, frozen.clone()));
                }
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    connections.shutdown().await;
}

async fn forward(
    client: TcpStream,
    upstream: SocketAddr,
    mut frozen: tokio::sync::watch::Receiver<bool>,
) {
    let _ = frozen.wait_for(|f| !*f).await;
    if let Ok(server) = TcpStream::connect(upstream).await {
        let (client_read, client_write) = client.into_split();
        let (server_read, server_write) = server.into_split();
        tokio::join!(
            pump(client_read, server_write, frozen.clone()),
            pump(server_read, client_write, frozen)
        );
    }
}

/// Copies one direction of a connection, holding each chunk while frozen.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut frozen: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let _ = frozen.wait_for(|f| !*f).await;
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// How many deliveries were redeliveries, ever. `num_redelivered` only
/// counts messages still pending (an ack clears it), so it reads 0 at rest
/// whatever happened; the consumer sequence counts every delivery and the
/// stream sequence every message (all of the stream's messages match the
/// test's filter), so their difference is the redeliveries.
pub fn redeliveries(info: &consumer::Info) -> u64 {
    info.delivered.consumer_sequence - info.delivered.stream_sequence
}

/// Fails when a message was delivered more than once (see [`redeliveries`]).
pub fn assert_no_redelivery(info: &consumer::Info) {
    assert_eq!(
        redeliveries(info),
        0,
        "messages delivered more than once: {info:?}"
    );
}

/// The URL of `env`'s database through `proxy` (to stop and start it).
pub fn proxied(env: &TestEnv, proxy: &TcpProxy) -> String {
    postgres_url(proxy.port(), &env.db_name)
}

/// Fails unless the table holds exactly one row per eventId of `expected`
/// (in any order) and nothing else.
pub async fn assert_stored_exactly(env: &TestEnv, expected: &[String]) {
    let sql = r#"SELECT "eventId" FROM "TiktokEvent""#;
    let mut stored: Vec<String> = sqlx::query_scalar(sql)
        .fetch_all(&env.db)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    // Sorted here: the database's collation need not order like Rust.
    stored.sort_unstable();
    let mut expected = expected.to_vec();
    expected.sort_unstable();
    if stored != expected {
        let missing = expected
            .iter()
            .filter(|id| stored.binary_search(id).is_err());
        let extra = stored
            .iter()
            .filter(|id| expected.binary_search(id).is_err());
        panic!(
            "stored {} rows, want {}; missing {:?}; unexpected {:?} (first 10 of each)",
            stored.len(),
            expected.len(),
            missing.take(10).collect::<Vec<_>>(),
            extra.take(10).collect::<Vec<_>>(),
        );
    }
}

/// `info` when the consumer has delivered and seen acknowledged every
/// message, else what is still outstanding.
pub fn all_acked(info: consumer::Info) -> Result<consumer::Info, String> {
    expect_eq((info.num_pending, info.num_ack_pending), (0, 0))
        .map_err(|e| format!("(num_pending, num_ack_pending) {e}"))?;
    Ok(info)
}
