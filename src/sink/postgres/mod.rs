//! The Postgres sink: connection (with Prisma's `schema=` parameter),
//! migrations, and the batch writer.
//!
//! A batch has the effect of its rows' rendered statements run one by one,
//! in stream order, in one transaction (ARCHITECTURE.md, the sink's
//! invariant). Consecutive rows with the same statement text form a run,
//! written through that text's [`Plan`]: one UNNEST insert, or one call of
//! the plan's per-row function. When a batch fails because of some rows'
//! values, a second attempt runs every row in a savepoint of its own, so
//! the rows at fault are known after two round trips, whatever their
//! number, and the others commit.

pub mod plan;
pub mod sql;
pub mod sqlstate;

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value as Json;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Acquire, Executor, PgConnection, Postgres};

use plan::{Plan, PlanError, WritePath};
use sqlstate::Fault;

/// One rendered row: SQL with `$1..$n` placeholders and their values (what
/// a transform renders for the sink).
#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    /// Shared by every event of a plain template: cloning it per event
    /// costs a reference count, and the sink recognises the same statement
    /// by pointer.
    pub sql: Arc<str>,
    pub params: Vec<Json>,
}

/// Distinct statement texts remembered per sink. Templates with `{% if %}`
/// produce a few variants; more than this means something renders data into
/// the text, so the cache is reset rather than grown.
const MAX_PLANS: usize = 256;

/// A row's statement and what became of it.
#[derive(Debug, Clone, PartialEq)]
pub struct SinkRow {
    pub rendered: Rendered,
    pub outcome: Outcome,
}

/// The fate of one row of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Pending,
    Stored,
    /// The row's own fault: it fails the same way every time.
    Rejected(Rejection),
}

/// Why the database refused a row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// None when the value never reached the database (a NUL character).
    pub sqlstate: Option<String>,
    pub error: String,
}

/// A write that did not happen, and whose move it is.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WriteError {
    /// The database or the network; expected to pass by itself.
    #[error("{0}")]
    Transient(String),
    /// The pipeline's statement, table or privileges: an operator must act.
    #[error("{0}")]
    Pipeline(String),
}

impl WriteError {
    fn from_sqlx(e: &sqlx::Error) -> Self {
        match sqlstate::fault(e) {
            Fault::Transient => WriteError::Transient(sqlstate::describe(e)),
            _ => WriteError::Pipeline(sqlstate::describe(e)),
        }
    }
}

/// Whether a batch's transaction is kept: `Rollback` is `ingestd test`'s
/// dry run of the production path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    Commit,
    Rollback,
}

pub struct PgSink {
    pool: PgPool,
    limits: Limits,
    /// How the probe connects (the pool's options).
    options: PgConnectOptions,
    probe: tokio::sync::Mutex<Probe>,
    /// The probe's last answer.
    probe_up: std::sync::atomic::AtomicBool,
    plans: Mutex<HashMap<String, Arc<Plan>>>,
}

/// How long a probe's answer stands: probes at any rate cost the database
/// at most one query per sink per this period.
const PROBE_FRESH: Duration = Duration::from_millis(500);

/// The health probe's own connection and when it last checked.
#[derive(Default)]
struct Probe {
    conn: Option<sqlx::PgConnection>,
    checked: Option<std::time::Instant>,
}

impl Probe {
    async fn check(&mut self, options: &PgConnectOptions) -> bool {
        use sqlx::Connection as _;
        if self.conn.is_none() {
            self.conn = sqlx::PgConnection::connect_with(options).await.ok();
        }
        match &mut self.conn {
            Some(conn) => conn.execute("SELECT 1").await.is_ok(),
            None => false,
        }
    }
}

fn probe_answer(up: &std::sync::atomic::AtomicBool) -> bool {
    up.load(std::sync::atomic::Ordering::Relaxed)
}

/// Time limits of a sink's connections (see the `sink.postgres` fields of
/// the same names).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub statement: Duration,
    pub connect: Duration,
    pub lock: Duration,
}

impl Limits {
    pub fn of(pg: &crate::config::PostgresSink) -> Self {
        Self {
            statement: pg.statement_timeout,
            connect: pg.connect_timeout,
            lock: pg.lock_timeout,
        }
    }

    /// The longest one write attempt may take by the engine's own clock:
    /// a connection, then statements the server cancels after
    /// `statement`. It also ends an attempt on a server that stopped
    /// answering altogether, which no server-side timeout can.
    pub fn attempt(&self) -> Duration {
        self.connect + self.statement + Duration::from_secs(1)
    }
}

impl Default for Limits {
    /// The defaults of the pipeline file's fields.
    fn default() -> Self {
        use crate::config::{
            default_connect_timeout, default_lock_timeout, default_statement_timeout,
        };
        Self {
            statement: default_statement_timeout(),
            connect: default_connect_timeout(),
            lock: default_lock_timeout(),
        }
    }
}

impl PgSink {
    /// Connects with the default [`Limits`].
    pub async fn connect(url: &str, pool_size: u32) -> anyhow::Result<Self> {
        Self::connect_with(url, pool_size, Limits::default()).await
    }

    /// Connects lazily-checked: the first connection is opened here so a
    /// wrong URL fails at start-up, not on the first event.
    pub async fn connect_with(url: &str, pool_size: u32, limits: Limits) -> anyhow::Result<Self> {
        let statement_timeout = format!("{}", limits.statement.as_millis());
        let options = connect_options(url)?.options([("statement_timeout", statement_timeout)]);
        let connecting = PgPoolOptions::new()
            .max_connections(pool_size.max(1))
            .acquire_timeout(limits.connect)
            .connect_with(options.clone());
        let pool = match tokio::time::timeout(limits.connect, connecting).await {
            Ok(Ok(pool)) => pool,
            Ok(Err(e)) => anyhow::bail!(
                "cannot connect to Postgres at {}: {}",
                redact_url(url),
                crate::util::redact::secrets_in(&e.to_string(), url)
            ),
            Err(_) => anyhow::bail!(
                "cannot connect to Postgres at {}: no answer within {:?}",
                redact_url(url),
                limits.connect
            ),
        };
        Ok(Self {
            pool,
            limits,
            options,
            probe: tokio::sync::Mutex::new(Probe::default()),
            probe_up: std::sync::atomic::AtomicBool::new(true),
            plans: Mutex::new(HashMap::new()),
        })
    }

    /// Applies the `.sql` files of `dir` not yet applied (read at run time:
    /// adding a migration needs no recompiling). Versions are shared by all
    /// directories that target one database, hence `ignore_missing`. Runs on
    /// a connection of its own whose lock waits end after `lock_timeout`
    /// (a migration may run longer than `statement_timeout`, but must not
    /// wait forever on another session's lock); the connection is closed
    /// afterwards rather than returned with those settings.
    pub async fn migrate(&self, dir: &Path) -> anyhow::Result<()> {
        let mut migrator = sqlx::migrate::Migrator::new(dir)
            .await
            .map_err(|e| anyhow::anyhow!("migrations {}: {e}", dir.display()))?;
        migrator.set_ignore_missing(true);
        let mut conn = self.pool.acquire().await?;
        let settings = format!(
            "SET lock_timeout = {}; SET statement_timeout = 0",
            self.limits.lock.as_millis()
        );
        conn.execute(settings.as_str()).await?;
        let result = migrator.run_direct(&mut *conn).await;
        let _ = conn.close().await;
        result.map_err(|e| {
            let text = e.to_string();
            let hint = if text.contains("lock timeout") {
                format!(
                    " (waited more than lock_timeout = {:?} for a lock another session holds)",
                    self.limits.lock
                )
            } else {
                String::new()
            };
            anyhow::anyhow!("migrations {}: {text}{hint}", dir.display())
        })
    }

    /// One write attempt (see [`Self::write`]) bounded by the engine's own
    /// clock ([`Limits::attempt`]). Rows committed before the bound passes
    /// keep their outcome.
    pub async fn write_bounded(
        &self,
        rows: &mut [&mut SinkRow],
        finish: Finish,
    ) -> Result<(), WriteError> {
        let bound = self.limits.attempt();
        tokio::time::timeout(bound, self.write(rows, finish))
            .await
            .unwrap_or_else(|_| {
                Err(WriteError::Transient(format!(
                    "the database did not answer within {bound:?}"
                )))
            })
    }

    /// True when the database answers a trivial query within two seconds,
    /// on the probe's own connection: probes never take a connection from
    /// the write pool. Checked at most once per [`PROBE_FRESH`]; probes
    /// arriving meanwhile (or while a check runs) get the last answer.
    pub async fn ping(&self) -> bool {
        let Ok(mut probe) = self.probe.try_lock() else {
            return probe_answer(&self.probe_up);
        };
        if probe.checked.is_some_and(|t| t.elapsed() < PROBE_FRESH) {
            return probe_answer(&self.probe_up);
        }
        let up = tokio::time::timeout(Duration::from_secs(2), probe.check(&self.options))
            .await
            .unwrap_or(false);
        if !up {
            probe.conn = None;
        }
        probe.checked = Some(std::time::Instant::now());
        self.probe_up
            .store(up, std::sync::atomic::Ordering::Relaxed);
        up
    }

    /// The plan of a statement text, described against the database once.
    /// A statement that cannot be planned is the pipeline's fault unless
    /// the database could not be reached.
    pub async fn plan(&self, rendered: &Rendered) -> Result<Arc<Plan>, WriteError> {
        if let Some(p) = self.cached(&rendered.sql) {
            return Ok(p);
        }
        let mut conn = self.acquire().await?;
        let plan = Plan::build(&mut conn, &rendered.sql, rendered.params.len())
            .await
            .map_err(|e| match e {
                PlanError::Database(db) if sqlstate::fault(&db) == Fault::Transient => {
                    WriteError::Transient(sqlstate::describe(&db))
                }
                other => WriteError::Pipeline(format!("the statement cannot be prepared: {other}")),
            })?;
        let plan = Arc::new(plan);
        let mut plans = self.plans.lock().expect("plans lock");
        if plans.len() >= MAX_PLANS {
            plans.clear();
        }
        plans.insert(rendered.sql.to_string(), plan.clone());
        Ok(plan)
    }

    /// Plans a statement and creates its per-row function on one
    /// connection (a temporary object: nothing is written), so that a
    /// statement the database refuses, or a missing TEMPORARY privilege,
    /// shows at load and in `ingestd check --db`.
    pub async fn verify(&self, rendered: &Rendered) -> Result<Arc<Plan>, WriteError> {
        let plan = self.plan(rendered).await?;
        let mut conn = self.acquire().await?;
        sqlx::query(&plan.function.create)
            .execute(&mut *conn)
            .await
            .map_err(|e| WriteError::from_sqlx(&e))?;
        Ok(plan)
    }

    fn cached(&self, sql: &str) -> Option<Arc<Plan>> {
        self.plans.lock().expect("plans lock").get(sql).cloned()
    }

    /// Forgets every plan: after the pipeline's fault (a migration may have
    /// changed a column's type), plans are described again.
    fn forget_plans(&self) {
        self.plans.lock().expect("plans lock").clear();
    }

    async fn acquire(&self) -> Result<PoolConnection<Postgres>, WriteError> {
        self.pool
            .acquire()
            .await
            .map_err(|e| WriteError::from_sqlx(&e))
    }

    /// One attempt at writing the rows still `Pending`, in order. Rows that
    /// fail for a reason of their own become `Rejected`, the others
    /// `Stored` (once the transaction is finished as `finish` says). On an
    /// error every pending row stays `Pending`.
    pub async fn write(&self, rows: &mut [&mut SinkRow], finish: Finish) -> Result<(), WriteError> {
        let mut batch = Vec::new();
        let mut last: Option<(Arc<str>, Arc<Plan>)> = None;
        for (index, row) in rows.iter_mut().enumerate() {
            if row.outcome != Outcome::Pending {
                continue;
            }
            let plan = match &last {
                Some((sql, plan)) if Arc::ptr_eq(sql, &row.rendered.sql) => plan.clone(),
                _ => self.plan(&row.rendered).await?,
            };
            last = Some((row.rendered.sql.clone(), plan.clone()));
            match plan.encode(&row.rendered.params) {
                Ok(values) => batch.push(Encoded {
                    index,
                    plan,
                    values,
                }),
                Err(e) => {
                    row.outcome = Outcome::Rejected(Rejection {
                        sqlstate: None,
                        error: e.to_string(),
                    })
                }
            }
        }
        if batch.is_empty() {
            return Ok(());
        }
        let mut conn = self.acquire().await?;
        let result = match self.attempt(&mut conn, &batch, Mode::Batch, finish).await {
            Err(e) if e.fault() == Fault::Event => {
                self.attempt(&mut conn, &batch, Mode::Isolate, finish).await
            }
            other => other,
        };
        match result {
            Ok(rejected) => {
                for e in &batch {
                    rows[e.index].outcome = Outcome::Stored;
                }
                for (k, rejection) in rejected {
                    rows[batch[k].index].outcome = Outcome::Rejected(rejection);
                }
                Ok(())
            }
            Err(e) => {
                let err = e.into_write_error();
                if matches!(err, WriteError::Pipeline(_)) {
                    self.forget_plans();
                }
                Err(err)
            }
        }
    }

    /// Runs the batch in one transaction, creating a plan's session
    /// function first where this connection lacks it. Returns the rows
    /// (indices into `batch`) rejected in `Isolate` mode.
    async fn attempt(
        &self,
        conn: &mut PgConnection,
        batch: &[Encoded],
        mode: Mode,
        finish: Finish,
    ) -> Result<Vec<(usize, Rejection)>, Failed> {
        loop {
            match run_batch(conn, batch, mode, finish).await {
                Err(Failed::Sql(e)) if missing_function(&e, batch) => {
                    create_functions(conn, batch).await?;
                }
                other => return other,
            }
        }
    }
}

/// How a batch is run: as fast as its plans allow, or each row in a
/// savepoint of its own to find the rows at fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Batch,
    Isolate,
}

/// A row's values as text, ready to bind, and the plan they are for.
struct Encoded {
    index: usize,
    plan: Arc<Plan>,
    values: Vec<Option<String>>,
}

/// A failure of the row at this index of a run, as the per-row function
/// reports it in `Isolate` mode.
type RowFailure = (i32, String, String);

/// One transaction over the batch's runs. In `Isolate` mode a row failure
/// that is not the row's own fault (a lock time-out, an undefined column)
/// fails the whole attempt.
async fn run_batch(
    conn: &mut PgConnection,
    batch: &[Encoded],
    mode: Mode,
    finish: Finish,
) -> Result<Vec<(usize, Rejection)>, Failed> {
    let mut tx = conn.begin().await?;
    let mut rejected = Vec::new();
    let mut start = 0;
    for run in batch.chunk_by(|a, b| Arc::ptr_eq(&a.plan, &b.plan)) {
        let plan = &run[0].plan;
        match (&plan.path, mode) {
            (WritePath::Unnest(sql), Mode::Batch) => {
                let mut q = sqlx::query(sql);
                for col in 0..plan.arity() {
                    q = q.bind(column(run, col));
                }
                q.execute(&mut *tx).await?;
            }
            _ => {
                let mut q = sqlx::query_as::<_, RowFailure>(&plan.function.call)
                    .bind(mode == Mode::Isolate)
                    .bind(run.len() as i32);
                for col in 0..plan.arity() {
                    q = q.bind(column(run, col));
                }
                for (row, state, message) in q.fetch_all(&mut *tx).await? {
                    if sqlstate::fault_of(&state) != Fault::Event {
                        return Err(Failed::Caught { state, message });
                    }
                    let k = start + row as usize - 1;
                    let error = format!("SQLSTATE {state}: {message}");
                    rejected.push((
                        k,
                        Rejection {
                            sqlstate: Some(state),
                            error,
                        },
                    ));
                }
            }
        }
        start += run.len();
    }
    match finish {
        Finish::Commit => tx.commit().await?,
        Finish::Rollback => tx.rollback().await?,
    }
    Ok(rejected)
}

/// Creates the session functions of the batch's plans on this connection
/// (once per connection and plan: they live as long as the session).
async fn create_functions(conn: &mut PgConnection, batch: &[Encoded]) -> Result<(), sqlx::Error> {
    let mut done: Vec<&str> = Vec::new();
    for r in batch {
        let f = &r.plan.function;
        if !done.contains(&f.name.as_str()) {
            sqlx::query(&f.create).execute(&mut *conn).await?;
            done.push(&f.name);
        }
    }
    Ok(())
}

fn column(run: &[Encoded], col: usize) -> Vec<Option<&str>> {
    run.iter().map(|r| r.values[col].as_deref()).collect()
}

/// Why an attempt failed: a statement's error, or a row failure the
/// per-row function caught that is not the row's own fault.
#[derive(Debug)]
enum Failed {
    Sql(sqlx::Error),
    Caught { state: String, message: String },
}

impl From<sqlx::Error> for Failed {
    fn from(e: sqlx::Error) -> Self {
        Failed::Sql(e)
    }
}

impl Failed {
    fn fault(&self) -> Fault {
        match self {
            Failed::Sql(e) => sqlstate::fault(e),
            Failed::Caught { state, .. } => sqlstate::fault_of(state),
        }
    }

    fn into_write_error(self) -> WriteError {
        let (text, code) = match &self {
            Failed::Sql(e) => (sqlstate::describe(e), db_code(e)),
            Failed::Caught { state, message } => {
                (format!("SQLSTATE {state}: {message}"), Some(state.clone()))
            }
        };
        match self.fault() {
            Fault::Transient => WriteError::Transient(text),
            _ => match code.as_deref().and_then(sqlstate::meaning) {
                Some(meaning) => WriteError::Pipeline(format!("{text} ({meaning})")),
                None => WriteError::Pipeline(text),
            },
        }
    }
}

/// True when the error says a session function of this batch is missing
/// on this connection: the function itself (42883), or the session's
/// temporary schema, which exists only once something was created in it.
fn missing_function(e: &sqlx::Error, batch: &[Encoded]) -> bool {
    let sqlx::Error::Database(db) = e else {
        return false;
    };
    match db.code().as_deref() {
        Some("3F000") => db.message().contains("pg_temp"),
        Some("42883") => batch.iter().any(|r| {
            db.message()
                .contains(r.plan.function.name.trim_start_matches("pg_temp."))
        }),
        _ => false,
    }
}

/// What a trial of one statement did (see [`PgSink::trial`]).
#[derive(Debug)]
pub enum Trial {
    /// The row the statement returned (`None`: it returned none, e.g.
    /// `ON CONFLICT DO NOTHING`).
    Row(Option<Json>),
    /// The statement's kind cannot show its row (it has a WITH of its own).
    Unavailable,
    /// The row's own fault: the event would be rejected.
    Rejected(Rejection),
}

impl PgSink {
    /// Runs one row statement inside a transaction that is rolled back and
    /// returns the row it wrote (for `ingestd test`).
    pub async fn trial(&self, row: &Rendered) -> Result<Trial, WriteError> {
        let plan = self.plan(row).await?;
        let values = match plan.encode(&row.params) {
            Ok(v) => v,
            Err(e) => {
                return Ok(Trial::Rejected(Rejection {
                    sqlstate: None,
                    error: e.to_string(),
                }))
            }
        };
        if crate::sink::postgres::sql::first_word(&plan.sql).as_deref() == Some("with") {
            return Ok(Trial::Unavailable);
        }
        let returning = if plan.returns_rows {
            ""
        } else {
            " RETURNING *"
        };
        let sql = format!(
            "WITH ingestd_trial AS ({}{returning}) SELECT row_to_json(ingestd_trial)::text FROM ingestd_trial",
            plan.row_sql
        );
        let mut conn = self.acquire().await?;
        let mut tx = conn.begin().await.map_err(|e| WriteError::from_sqlx(&e))?;
        let mut q = sqlx::query_scalar::<_, String>(&sql);
        for v in &values {
            q = q.bind(v.as_deref());
        }
        let result = q.fetch_optional(&mut *tx).await;
        tx.rollback().await.map_err(|e| WriteError::from_sqlx(&e))?;
        match result {
            Ok(text) => Ok(Trial::Row(text.and_then(|t| serde_json::from_str(&t).ok()))),
            Err(e) if sqlstate::fault(&e) == Fault::Event => Ok(Trial::Rejected(Rejection {
                sqlstate: db_code(&e),
                error: sqlstate::describe(&e),
            })),
            Err(e) => Err(WriteError::from_sqlx(&e)),
        }
    }
}

fn db_code(e: &sqlx::Error) -> Option<String> {
    match e {
        sqlx::Error::Database(db) => db.code().map(|c| c.into_owned()),
        _ => None,
    }
}

/// Parses a Postgres URL, honouring Prisma's `schema=NAME` parameter as the
/// connection's `search_path` (the original service's URLs carry it).
pub fn connect_options(url: &str) -> anyhow::Result<PgConnectOptions> {
    let mut parsed = url::Url::parse(url)
        .map_err(|e| anyhow::anyhow!("invalid database URL {}: {e}", redact_url(url)))?;
    let schema = parsed
        .query_pairs()
        .find(|(k, _)| k == "schema")
        .map(|(_, v)| v.into_owned());
    let rest: Vec<(String, String)> = parsed
        .query_pairs()
        .filter(|(k, _)| k != "schema")
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    parsed.set_query(None);
    if !rest.is_empty() {
        parsed.query_pairs_mut().extend_pairs(rest);
    }
    let mut options = PgConnectOptions::from_str(parsed.as_str())
        .map_err(|e| anyhow::anyhow!("invalid database URL {}: {e}", redact_url(url)))?;
    if let Some(schema) = schema {
        options = options.options([("search_path", schema)]);
    }
    Ok(options.application_name("ingestd"))
}

/// The URL with its passwords replaced, for logs and errors.
pub fn redact_url(url: &str) -> String {
    crate::util::redact::url(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prisma_schema_parameter_becomes_search_path() {
        let o = connect_options("postgresql://u:secret@h:5432/db?schema=ingest&sslmode=disable")
            .unwrap();
        assert_eq!(o.get_options(), Some("-c search_path=ingest"));
        assert_eq!(o.get_database(), Some("db"));
    }

    #[test]
    fn passwords_are_redacted() {
        assert!(!redact_url("postgres://u:secret@h/db").contains("secret"));
    }
}
