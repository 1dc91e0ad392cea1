//! What the scale suite and the benchmark's many-pipelines phase need: a
//! PostgreSQL server of their own (so that counting the engine's
//! connections is exact), and many pipelines on one stream and one table.

use super::*;

/// The Postgres binaries the tests start servers with.
const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// A PostgreSQL server of the test's own: initdb into a directory under
/// `target/`, a free port, `max_connections` as given; stopped on drop.
pub struct PgServer {
    pub port: u16,
    dir: PathBuf,
}

impl PgServer {
    pub async fn start(max_connections: u32) -> Self {
        let dir = repo_root()
            .join("target")
            .join(format!("pg-{}", unique_id()));
        std::fs::create_dir_all(&dir).expect("create the server's directory");
        let server = Self {
            port: free_port(),
            dir,
        };
        if running_as_root() {
            let status = Command::new("chown")
                .args(["-R", "postgres"])
                .arg(&server.dir)
                .status()
                .expect("chown");
            assert!(status.success(), "chown the server's directory");
        }
        server.pg(
            "initdb",
            &[
                "-D",
                &server.data(),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
            ],
        );
        let conf = format!(
            "port = {}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = ''\n\
             max_connections = {max_connections}\nfsync = off\n",
            server.port
        );
        std::fs::OpenOptions::new()
            .append(true)
            .open(server.dir.join("data/postgresql.conf"))
            .and_then(|mut f| std::io::Write::write_all(&mut f, conf.as_bytes()))
            .expect("configure the server");
        server.resume().await;
        server
    }

    fn data(&self) -> String {
        self.dir.join("data").display().to_string()
    }

    /// Runs a Postgres program to completion, as the `postgres` user when
    /// the tests run as root (the server refuses to run as root).
    fn pg(&self, program: &str, args: &[&str]) {
        let out = pg_command(program, args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("{program} {args:?}: {e}"));
        assert!(
            out.status.success(),
            "{program} {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts the server (again) and waits until it accepts connections.
    pub async fn resume(&self) {
        let log = self.dir.join("server.log").display().to_string();
        self.pg("pg_ctl", &["-D", &self.data(), "-l", &log, "-w", "start"]);
        wait_for("the test's Postgres", DEADLINE, || async {
            self.admin().await.map(|_| ()).map_err(state("connect"))
        })
        .await;
    }

    /// Stops the server (an outage of the database, not of the network).
    pub fn halt(&self) {
        self.pg("pg_ctl", &["-D", &self.data(), "-m", "fast", "-w", "stop"]);
    }

    pub fn url(&self, database: &str) -> String {
        postgres_url(self.port, database)
    }

    pub async fn admin(&self) -> Result<PgPool, sqlx::Error> {
        PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(2))
            .connect(&self.url("postgres"))
            .await
    }

    /// Connections the engine holds (its `application_name`).
    pub async fn engine_connections(&self, admin: &PgPool) -> Result<i64, String> {
        sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'ingestd'",
        )
        .fetch_one(admin)
        .await
        .map_err(state("pg_stat_activity"))
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let _ = pg_command(
            "pg_ctl",
            &["-D", &self.data(), "-m", "immediate", "-w", "stop"],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// `program` of the Postgres binaries with `args`, as `postgres` if root.
fn pg_command(program: &str, args: &[&str]) -> Command {
    let program = format!("{PG_BIN}/{program}");
    let mut command = if running_as_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--", &program]);
        c
    } else {
        Command::new(program)
    };
    command.args(args);
    command
}

/// The table every many-pipelines file writes to: one row per pipeline and
/// event, so a second copy of an event fails the primary key (and is
/// counted as a rejection, never stored twice).
pub const EVENTS_TABLE: &str =
    "CREATE TABLE events (pipeline text NOT NULL, n int NOT NULL, PRIMARY KEY (pipeline, n))";

/// Pipeline `name` reading `<prefix><name>` from `env`'s stream, writing
/// `{"n": …}` events to `events` at `url`; `extra` is more YAML of
/// `sink.postgres` (indented by four spaces).
pub fn many_yaml(env: &TestEnv, name: &str, url: &str, extra: &str) -> String {
    format!(
        r#"name: {name}
{source}sink:
  postgres:
    url: {url}
    insert: INSERT INTO events (pipeline, n) VALUES ('{name}', {{{{ event.n }}}})
{extra}    batch:
      max_rows: 100
      max_wait: 5ms
"#,
        source = nats_source(
            &env.stream,
            &env.subject_prefix,
            &format!("{name}-{}", env.id),
            name,
            "30s"
        ),
    )
}

/// `count` pipelines `p000`, `p001`, … (see [`many_yaml`]) in place of
/// tiktok.yaml, writing to the `events` table of a Postgres of their own
/// (`max_connections = 100`), with their stream created and `events`
/// events published for each.
pub struct ManyPipelines {
    pub env: TestEnv,
    pub server: PgServer,
    pub admin: PgPool,
    pub names: Vec<String>,
}

impl ManyPipelines {
    pub async fn set_up(count: usize, events: usize) -> Self {
        let env = TestEnv::new().await;
        std::fs::remove_file(env.pipelines_dir().join("tiktok.yaml")).expect("remove tiktok.yaml");
        let server = PgServer::start(100).await;
        let admin = server.admin().await.expect("admin connection");
        sqlx::raw_sql(EVENTS_TABLE)
            .execute(&admin)
            .await
            .expect("table");
        let names: Vec<String> = (0..count).map(|i| format!("p{i:03}")).collect();
        for name in &names {
            let yaml = many_yaml(&env, name, &server.url("postgres"), "");
            env.write_pipeline(&format!("{name}.yaml"), &yaml);
        }
        env.create_stream().await;
        publish_many(&env, &names, events).await;
        Self {
            env,
            server,
            admin,
            names,
        }
    }
}

/// Publishes `count` events `{"n": 1..=count}` for each of `names`,
/// confirmed in windows.
pub async fn publish_many(env: &TestEnv, names: &[String], count: usize) {
    let mut pending = VecDeque::new();
    for n in 1..=count {
        for name in names {
            let body = serde_json::to_vec(&serde_json::json!({"n": n})).expect("json");
            pending.push_back(publish_unconfirmed(&env.js, &env.subject(name), body).await);
            if pending.len() >= 2000 {
                confirmed(pending.pop_front().expect("pending")).await;
            }
        }
    }
    for ack in pending {
        confirmed(ack).await;
    }
}

/// Each pipeline's state in `/pipelines`, by name (or file).
pub async fn states(engine: &Engine) -> Result<BTreeMap<String, String>, String> {
    let reply = engine.try_get("/pipelines").await?;
    let body = reply.json();
    let list = body["pipelines"].as_array().ok_or("no pipelines")?;
    Ok(list
        .iter()
        .map(|p| {
            let key = p["name"].as_str().or(p["file"].as_str()).unwrap_or("?");
            (
                key.to_string(),
                p["state"].as_str().unwrap_or("?").to_string(),
            )
        })
        .collect())
}
