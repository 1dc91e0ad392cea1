//! The engine process: configuring, spawning and querying `ingestd` (HTTP,
//! logs, exit).

use super::*;

/// Configuration of one `ingestd run`, defaulting to the binary cargo built,
/// this test's database, NATS, a free HTTP port and the test's pipelines dir.
pub struct EngineBuilder<'a> {
    env: &'a TestEnv,
    program: PathBuf,
    pipelines_dir: PathBuf,
    vars: BTreeMap<String, String>,
}

impl<'a> EngineBuilder<'a> {
    pub(super) fn new(env: &'a TestEnv) -> Self {
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
            program: ingestd_bin().to_owned(),
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

    /// Another `ingestd` binary than the one cargo built.
    pub fn program(mut self, path: impl Into<PathBuf>) -> Self {
        self.program = path.into();
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
        run_to_exit(&self.program, args, &self.vars, &cwd).await
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
        Engine::spawn(&self.program, &args, &self.vars, &dir, port)
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
    started: Instant,
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
    /// Runs `program` with `args` and exactly the given variables on top of
    /// the inherited environment, in the empty dir `dir` (which also gets the
    /// log, outside any pipelines dir).
    pub fn spawn(
        program: &Path,
        args: &[&std::ffi::OsStr],
        vars: &BTreeMap<String, String>,
        dir: &Path,
        port: u16,
    ) -> Self {
        let log_path = dir.join("engine.log");
        let cwd = dir.join("cwd");
        std::fs::create_dir_all(&cwd).expect("create engine cwd");
        let mut command = Command::new(program);
        command.args(args).envs(vars).current_dir(&cwd);
        Self {
            started: Instant::now(),
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

    /// How many lines of the log so far contain `needle`.
    pub fn log_lines(&self, needle: &str) -> usize {
        self.log().lines().filter(|l| l.contains(needle)).count()
    }

    pub fn pid(&self) -> u32 {
        self.child.lock().unwrap().id()
    }

    /// Time since the process was started.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// A memory field of `/proc/<pid>/status` (`VmRSS`, `VmHWM`, ...) in KiB;
    /// `None` once the process is gone.
    pub fn memory_kib(&self, field: &str) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        let line = status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?;
        line.split_whitespace().next()?.parse().ok()
    }

    /// The exit status if the process has ended.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        self.child.lock().unwrap().try_wait().expect("try_wait")
    }

    /// Panics, with the log, if the process has exited: a wait on an engine
    /// that died must fail at once, not at its deadline.
    pub fn assert_running(&self) {
        if let Some(status) = self.exit_status() {
            panic!("ingestd exited early ({status}); log:\n{}", self.log());
        }
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
        self.wait_ok("/live", DEADLINE, POLL_INTERVAL).await
    }

    /// Waits until `GET path` answers 200, asking every `every`. Fails at
    /// once, not at the deadline, if the process exits meanwhile.
    pub async fn wait_ok(&self, path: &str, timeout: Duration, every: Duration) {
        let what = format!("GET {path} to answer 200");
        wait_for_every(&what, timeout, every, || async {
            self.assert_running();
            let reply = self.try_get(path).await?;
            expect_eq(reply.status, 200).map_err(|e| format!("{path} status {e}"))
        })
        .await
    }

    /// The first pipeline's entry in `/pipelines` (the tests' engines
    /// mostly run one).
    pub async fn try_pipeline_status(&self) -> Result<serde_json::Value, String> {
        let reply = self.try_get("/pipelines").await?;
        let all: serde_json::Value =
            serde_json::from_str(&reply.body).map_err(|e| e.to_string())?;
        all["pipelines"]
            .get(0)
            .cloned()
            .ok_or_else(|| format!("no pipeline in {}", reply.body))
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
        signal(self.pid(), "TERM");
        self.wait_exit().await
    }

    /// Asks the engine to stop (SIGTERM) and waits up to `timeout` for it to
    /// exit; `None` if it is still running then (it is killed on drop).
    pub async fn terminate_within(&self, timeout: Duration) -> Option<ExitStatus> {
        signal(self.pid(), "TERM");
        self.try_wait_exit(timeout).await
    }

    pub async fn wait_exit(&self) -> ExitStatus {
        self.try_wait_exit(DEADLINE)
            .await
            .unwrap_or_else(|| panic!("ingestd still running after {DEADLINE:?}"))
    }

    async fn try_wait_exit(&self, timeout: Duration) -> Option<ExitStatus> {
        try_wait_for(timeout, POLL_INTERVAL, || async {
            self.exit_status().ok_or_else(|| "still running".to_owned())
        })
        .await
        .ok()
    }
}

/// Sends `SIG<name>` to a process this test started.
pub fn signal(pid: u32, name: &str) {
    let sent = Command::new("kill")
        .args([format!("-{name}"), pid.to_string()])
        .status()
        .expect("run kill");
    assert!(sent.success(), "kill -{name} {pid} failed");
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

/// Runs `program ARGS` (`ingestd` with a one-shot command such as `check`,
/// or `run` that is expected to fail) to completion, killing it if it
/// outlives `DEADLINE`.
pub async fn run_to_exit(
    program: &Path,
    args: &[&str],
    vars: &BTreeMap<String, String>,
    cwd: &Path,
) -> Output {
    let child = tokio::process::Command::new(program)
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
