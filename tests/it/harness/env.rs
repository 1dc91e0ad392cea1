//! The per-test environment: a database, a stream and a directory of the
//! test's own, removed on drop.

use super::*;

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
        // NATS first: a failure to connect then leaves nothing behind.
        let nats = async_nats::connect(nats_url())
            .await
            .expect("connect to NATS");
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
        publish_confirmed(&self.js, &self.subject(suffix), payload.into()).await;
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
                      "funnelStage", "eventType", "data"::text AS "data",
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

    /// `SELECT count(*) FROM <from>`, `from` being SQL such as `big` or
    /// `"TiktokEvent" WHERE ...` (a missing table is just "not yet").
    pub async fn try_count(&self, from: &str) -> Result<i64, String> {
        let sql = format!("SELECT count(*) FROM {from}");
        sqlx::query_scalar(&sql)
            .fetch_one(&self.db)
            .await
            .map_err(state(&sql))
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
            if let Err(e) = drop_database(&db_name).await {
                eprintln!("cleanup: cannot drop database {db_name}: {e}");
            }
        });
        if std::thread::panicking() {
            eprintln!("test files kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
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
