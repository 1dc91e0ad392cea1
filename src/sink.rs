//! The Postgres sink: connection (with Prisma's `schema=` parameter),
//! migrations, and the batching writer.
//!
//! A rendered row statement is turned once into a [`Plan`]: Postgres is asked
//! (describe) which type each placeholder has, every value is sent as text and
//! cast to that type, and a single `VALUES (...)` insert is rewritten to
//! `SELECT ... FROM UNNEST($1::text[], ...)`, so a whole batch is one
//! statement with one parameter per column, whatever its row count, and the
//! statement text never changes (it stays in the prepared-statement cache).

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value as Json;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Either, Executor, Postgres, Transaction};

use crate::sql;
use crate::template::Rendered;

/// Distinct statement texts remembered per sink. Templates with `{% if %}`
/// produce a few variants; more than this means something renders data into
/// the text, so the cache is reset rather than grown.
const MAX_PLANS: usize = 256;

/// The fate of one row of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Pending,
    Stored,
    /// A permanent, row-level failure (bad value, constraint): never retried.
    Rejected(String),
}

/// A failure that is not the rows' fault (connection, timeout, lock, a
/// missing table): the batch is held and retried.
#[derive(Debug, Clone)]
pub struct Transient(pub String);

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

/// How one statement text is executed.
#[derive(Debug)]
pub struct Plan {
    /// Postgres type of each placeholder, as SQL (`text`, `jsonb`, ...).
    types: Vec<String>,
    /// The row statement with each `$n` cast from text to its type.
    row_sql: String,
    /// The batch statement, when the insert has one plain VALUES tuple.
    unnest_sql: Option<String>,
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
                crate::redact::secrets_in(&e.to_string(), url)
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
        rows: &[Rendered],
        outcomes: &mut [Outcome],
    ) -> Result<(), Transient> {
        let bound = self.limits.attempt();
        tokio::time::timeout(bound, self.write(rows, outcomes))
            .await
            .unwrap_or_else(|_| {
                Err(Transient(format!(
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
    pub async fn plan(&self, rendered: &Rendered) -> Result<Arc<Plan>, sqlx::Error> {
        if let Some(p) = self.plans.lock().expect("plans lock").get(&rendered.sql) {
            return Ok(p.clone());
        }
        let plan = Arc::new(Plan::build(&self.pool, &rendered.sql, rendered.params.len()).await?);
        let mut plans = self.plans.lock().expect("plans lock");
        if plans.len() >= MAX_PLANS {
            plans.clear();
        }
        plans.insert(rendered.sql.clone(), plan.clone());
        Ok(plan)
    }

    /// One attempt at writing the rows still `Pending`. Rows that fail for a
    /// reason of their own are isolated by bisection and marked `Rejected`;
    /// the others are committed and marked `Stored`. A transient error
    /// leaves the rows not yet committed `Pending`.
    pub async fn write(
        &self,
        rows: &[Rendered],
        outcomes: &mut [Outcome],
    ) -> Result<(), Transient> {
        let mut encoded = Vec::new();
        for (i, row) in rows.iter().enumerate() {
            if outcomes[i] != Outcome::Pending {
                continue;
            }
            let plan = self.plan(row).await.map_err(|e| match classify(&e) {
                Class::Row => Transient(format!("cannot prepare the insert: {}", describe(&e))),
                Class::Transient => Transient(describe(&e)),
            })?;
            match plan.encode(&row.params) {
                Ok(values) => encoded.push(Encoded {
                    index: i,
                    plan,
                    values,
                }),
                Err(e) => outcomes[i] = Outcome::Rejected(e),
            }
        }
        self.write_bisect(&encoded, outcomes).await
    }

    /// Tries the rows as one transaction; on a row-level error splits them
    /// in halves until the failing rows stand alone.
    fn write_bisect<'a>(
        &'a self,
        rows: &'a [Encoded],
        outcomes: &'a mut [Outcome],
    ) -> futures::future::BoxFuture<'a, Result<(), Transient>> {
        Box::pin(async move {
            if rows.is_empty() {
                return Ok(());
            }
            match self.write_once(rows).await {
                Ok(()) => {
                    rows.iter()
                        .for_each(|r| outcomes[r.index] = Outcome::Stored);
                    Ok(())
                }
                Err(e) if classify(&e) == Class::Row => {
                    if let [only] = rows {
                        outcomes[only.index] = Outcome::Rejected(describe(&e));
                        return Ok(());
                    }
                    let (left, right) = rows.split_at(rows.len() / 2);
                    self.write_bisect(left, outcomes).await?;
                    self.write_bisect(right, outcomes).await
                }
                Err(e) => Err(Transient(describe(&e))),
            }
        })
    }

    async fn write_once(&self, rows: &[Encoded]) -> Result<(), sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let mut groups: Vec<(&Arc<Plan>, Vec<&Encoded>)> = Vec::new();
        for row in rows {
            match groups.iter_mut().find(|(p, _)| Arc::ptr_eq(p, &row.plan)) {
                Some((_, g)) => g.push(row),
                None => groups.push((&row.plan, vec![row])),
            }
        }
        for (plan, group) in groups {
            plan.execute(&mut tx, &group).await?;
        }
        tx.commit().await
    }
}

/// What a trial insert did (see [`PgSink::trial`]).
#[derive(Debug)]
pub enum Trial {
    /// The row as inserted (`None`: the statement inserted nothing, e.g.
    /// `ON CONFLICT DO NOTHING`).
    Row(Option<Json>),
    /// A row-level failure: the event would be invalid.
    Rejected(String),
}

impl PgSink {
    /// Inserts one row inside a transaction that is rolled back, returning
    /// the row as Postgres stored it (for `ingestd test`).
    pub async fn trial(&self, row: &Rendered) -> Result<Trial, sqlx::Error> {
        let plan = self.plan(row).await?;
        let values = match plan.encode(&row.params) {
            Ok(v) => v,
            Err(e) => return Ok(Trial::Rejected(e)),
        };
        let sql = format!(
            "WITH ingestd_trial AS ({} RETURNING *) SELECT row_to_json(ingestd_trial)::text FROM ingestd_trial",
            plan.row_sql
        );
        let mut tx = self.pool.begin().await?;
        let mut q = sqlx::query_scalar::<_, String>(&sql);
        for v in &values {
            q = q.bind(v.as_deref());
        }
        let result = q.fetch_optional(&mut *tx).await;
        tx.rollback().await?;
        match result {
            Ok(text) => Ok(Trial::Row(text.and_then(|t| serde_json::from_str(&t).ok()))),
            Err(e) if classify(&e) == Class::Row => Ok(Trial::Rejected(describe(&e))),
            Err(e) => Err(e),
        }
    }
}

/// A row's values as text, ready to bind.
struct Encoded {
    index: usize,
    plan: Arc<Plan>,
    values: Vec<Option<String>>,
}

impl Plan {
    async fn build(pool: &PgPool, sql_text: &str, n_params: usize) -> Result<Self, sqlx::Error> {
        let marks = sql::placeholders(sql_text);
        let numbered = marks.iter().enumerate().all(|(i, (_, n))| *n == i + 1);
        if marks.len() != n_params || !numbered {
            return Err(sqlx::Error::Protocol(
                "the statement's placeholders do not line up with the template's expressions"
                    .into(),
            ));
        }
        let types = param_types(pool, sql_text).await?;
        let whole = 0..sql_text.len();
        let row_sql = sql::replace_placeholders(sql_text, whole, &marks, |n| {
            format!("((${n}::text)::{})", types[n - 1])
        });
        let unnest_sql = (n_params > 0)
            .then(|| sql::values_tuple(sql_text))
            .flatten()
            .map(|t| unnest_statement(sql_text, &t, &marks, &types));
        Ok(Self {
            types,
            row_sql,
            unnest_sql,
        })
    }

    /// Text for each parameter, in the form its target type reads.
    fn encode(&self, params: &[Json]) -> Result<Vec<Option<String>>, String> {
        params
            .iter()
            .zip(&self.types)
            .map(|(v, ty)| encode_value(v, ty))
            .collect()
    }

    async fn execute(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        rows: &[&Encoded],
    ) -> Result<(), sqlx::Error> {
        match &self.unnest_sql {
            Some(batch_sql) => {
                let mut q = sqlx::query(batch_sql);
                for col in 0..self.types.len() {
                    let column: Vec<Option<&str>> =
                        rows.iter().map(|r| r.values[col].as_deref()).collect();
                    q = q.bind(column);
                }
                q.execute(&mut **tx).await?;
            }
            None => {
                for row in rows {
                    let mut q = sqlx::query(&self.row_sql);
                    for v in &row.values {
                        q = q.bind(v.as_deref());
                    }
                    q.execute(&mut **tx).await?;
                }
            }
        }
        Ok(())
    }
}

/// `INSERT ... VALUES (e1, e2) tail` → `INSERT ... SELECT e1', e2' FROM
/// UNNEST($1::text[], ...) AS u(c1, ...) tail`, where each `$n` of an item
/// becomes `((u.cN)::type)`.
fn unnest_statement(
    sql_text: &str,
    tuple: &sql::ValuesTuple,
    marks: &[(std::ops::Range<usize>, usize)],
    types: &[String],
) -> String {
    let items: Vec<String> = tuple
        .items
        .iter()
        .map(|r| {
            sql::replace_placeholders(sql_text, r.clone(), marks, |n| {
                format!("((u.c{n})::{})", types[n - 1])
            })
        })
        .collect();
    let arrays: Vec<String> = (1..=types.len()).map(|n| format!("${n}::text[]")).collect();
    let cols: Vec<String> = (1..=types.len()).map(|n| format!("c{n}")).collect();
    format!(
        "{}SELECT {} FROM UNNEST({}) AS u({}){}",
        &sql_text[..tuple.span.start],
        items.join(","),
        arrays.join(", "),
        cols.join(", "),
        &sql_text[tuple.span.end..]
    )
}

/// Asks Postgres which type each placeholder of `sql_text` has.
async fn param_types(pool: &PgPool, sql_text: &str) -> Result<Vec<String>, sqlx::Error> {
    let described = pool.describe(sql_text).await?;
    let oids: Vec<i64> = match described.parameters() {
        Some(Either::Left(types)) => types
            .iter()
            .map(|t| t.oid().map_or(25, |o| i64::from(o.0)))
            .collect(),
        Some(Either::Right(n)) => vec![25; n],
        None => Vec::new(),
    };
    sqlx::query_scalar(
        "SELECT format_type(t::oid, NULL) FROM unnest($1::int8[]) WITH ORDINALITY AS x(t, i) ORDER BY i",
    )
    .bind(oids)
    .fetch_all(pool)
    .await
}

/// A JSON value as the text input of Postgres type `ty`. JSON columns get
/// JSON (a string becomes a JSON string); arrays going to array columns get
/// array literals; everything else its plain text.
fn encode_value(v: &Json, ty: &str) -> Result<Option<String>, String> {
    if has_nul(v) {
        return Err(
            "a value contains a NUL character (\\u0000), which Postgres cannot store".into(),
        );
    }
    Ok(match v {
        Json::Null => None,
        _ if ty == "json" || ty == "jsonb" => Some(v.to_string()),
        Json::String(s) => Some(s.clone()),
        Json::Array(items) if ty.ends_with("[]") => Some(array_literal(items)),
        other => Some(other.to_string()),
    })
}

fn has_nul(v: &Json) -> bool {
    match v {
        Json::String(s) => s.contains('\0'),
        Json::Array(a) => a.iter().any(has_nul),
        Json::Object(m) => m.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
        _ => false,
    }
}

fn array_literal(items: &[Json]) -> String {
    let parts: Vec<String> = items
        .iter()
        .map(|v| match v {
            Json::Null => "NULL".to_string(),
            Json::Array(inner) => array_literal(inner),
            Json::String(s) => quote_element(s),
            other => quote_element(&other.to_string()),
        })
        .collect();
    format!("{{{}}}", parts.join(","))
}

fn quote_element(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// The row's own fault: bad value (22), constraint (23), cardinality (21).
    Row,
    Transient,
}

/// Row-level SQLSTATE classes are permanent for that row; everything else
/// (connection, timeout, serialization, resources, and configuration errors
/// such as a missing table, which an operator can fix) holds the batch.
pub fn classify(e: &sqlx::Error) -> Class {
    match e {
        sqlx::Error::Database(db) => match db.code().as_deref().map(|c| &c[..2.min(c.len())]) {
            Some("21" | "22" | "23") => Class::Row,
            _ => Class::Transient,
        },
        _ => Class::Transient,
    }
}

/// An error as one line, with its SQLSTATE where it has one.
pub fn describe(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Database(db) => match db.code() {
            Some(code) => format!("SQLSTATE {code}: {}", db.message()),
            None => db.message().to_string(),
        },
        other => other.to_string(),
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
    crate::redact::url(url)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn values_are_encoded_for_their_target_type() {
        assert_eq!(
            encode_value(&json!("a"), "jsonb").unwrap(),
            Some("\"a\"".into())
        );
        assert_eq!(
            encode_value(&json!({"k": 1}), "jsonb").unwrap(),
            Some("{\"k\":1}".into())
        );
        assert_eq!(
            encode_value(&json!("a'b"), "text").unwrap(),
            Some("a'b".into())
        );
        assert_eq!(
            encode_value(&json!(1.5), "numeric").unwrap(),
            Some("1.5".into())
        );
        assert_eq!(encode_value(&json!(null), "text").unwrap(), None);
        assert_eq!(
            encode_value(&json!(["a\"", null, 2]), "text[]").unwrap(),
            Some("{\"a\\\"\",NULL,\"2\"}".into())
        );
        assert!(encode_value(&json!({"k": ["x\u{0}"]}), "jsonb").is_err());
    }

    #[test]
    fn unnest_rewrite_keeps_expressions_and_tail() {
        let text = "INSERT INTO t (a, b) VALUES ($1, $2::timestamptz AT TIME ZONE 'UTC') ON CONFLICT (a) DO NOTHING";
        let tuple = sql::values_tuple(text).unwrap();
        let marks = sql::placeholders(text);
        let out = unnest_statement(
            text,
            &tuple,
            &marks,
            &["text".into(), "timestamp with time zone".into()],
        );
        assert_eq!(
            out,
            "INSERT INTO t (a, b) SELECT ((u.c1)::text), ((u.c2)::timestamp with time zone)::timestamptz AT TIME ZONE 'UTC' \
             FROM UNNEST($1::text[], $2::text[]) AS u(c1, c2) ON CONFLICT (a) DO NOTHING"
        );
    }

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
