//! Connecting: the pool and its limits, the health probe's own connection,
//! Postgres URLs (Prisma's `schema=`) and their redaction.

use super::*;

/// How long a probe's answer stands: probes at any rate cost the database
/// at most one query per sink per this period.
const PROBE_FRESH: Duration = Duration::from_millis(500);

/// The health probe's own connection and when it last checked.
#[derive(Default)]
pub(super) struct Probe {
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
        let options = super::session::options(options);
        let connecting = super::session::restoring(PgPoolOptions::new(), &options)
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
