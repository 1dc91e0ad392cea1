//! Connecting: a sink's pool, its limits and session settings, Postgres
//! URLs (Prisma's `schema=`) and their redaction.

use super::pool::{Pool, PoolChoice, Pools, Probe, Target};
use super::*;

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

/// What a pipeline's transactions set for themselves, so that any
/// connection of a shared pool serves it as a connection of its own would:
/// each transaction begins with them (`SET LOCAL`, sent with `BEGIN` in one
/// round trip), and they end with it. Safe behind PgBouncer in transaction
/// mode, where consecutive transactions may run on different servers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Session {
    statement: Duration,
    search_path: Option<String>,
}

impl Session {
    /// The settings as one statement: `set_config(…, true)` is `SET LOCAL`
    /// with the value as a string, read as the setting's own syntax (a
    /// `search_path` list, as the connection option `-c` reads it).
    fn set_local(&self) -> String {
        let mut set = format!(
            "SELECT pg_catalog.set_config('statement_timeout', '{}', true)",
            self.statement.as_millis()
        );
        if let Some(path) = &self.search_path {
            set.push_str(&format!(
                ", pg_catalog.set_config('search_path', {}, true)",
                literal(path)
            ));
        }
        set
    }

    /// Begins a transaction with the session's settings; inside a
    /// transaction already (a dry run), a savepoint with them.
    pub(super) async fn begin<'c>(
        &self,
        conn: &'c mut PgConnection,
    ) -> Result<sqlx::Transaction<'c, Postgres>, sqlx::Error> {
        use sqlx::Connection as _;
        if conn.is_in_transaction() {
            let mut tx = Acquire::begin(conn).await?;
            (&mut *tx).execute(self.set_local().as_str()).await?;
            Ok(tx)
        } else {
            conn.begin_with(format!("BEGIN; {}", self.set_local()))
                .await
        }
    }

    /// `SET` statements for the session of a connection of its own (the
    /// migrations'), or for the rest of a transaction.
    pub(super) fn search_path_sql(&self, local: bool) -> Option<String> {
        self.search_path.as_ref().map(|path| {
            format!(
                "SELECT pg_catalog.set_config('search_path', {}, {local})",
                literal(path)
            )
        })
    }
}

/// A string literal whatever `standard_conforming_strings` says.
fn literal(text: &str) -> String {
    format!("E'{}'", text.replace('\\', "\\\\").replace('\'', "''"))
}

/// Why a sink could not connect.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{0:#}")]
    Url(anyhow::Error),
    /// Text, not the driver's error: the driver may echo the URL, so its
    /// text has the URL's secrets cut out (`util::redact`).
    #[error("cannot connect to Postgres at {url}: {error}")]
    Connect {
        url: String,
        error: String,
        transient: bool,
    },
}

impl ConnectError {
    /// True when the database may be reachable later (an outage, a full
    /// server), false when the URL or the credentials are wrong.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            ConnectError::Connect {
                transient: true,
                ..
            }
        )
    }
}

impl PgSink {
    fn with_pool(pool: Arc<Pool>, target: &Target, limits: Limits) -> Self {
        Self {
            pool,
            limits,
            session: Session {
                statement: limits.statement,
                search_path: target.search_path.clone(),
            },
            plans: Mutex::new(HashMap::new()),
            ledger: None,
        }
    }

    /// A sink on the pool `choice` names, with a first connection opened
    /// here so a wrong URL fails at load, not on the first event.
    pub async fn connect(
        pools: &Pools,
        url: &str,
        choice: PoolChoice,
        limits: Limits,
    ) -> Result<Self, ConnectError> {
        let target = Target::parse(url).map_err(ConnectError::Url)?;
        let sink = Self::with_pool(pools.pool(&target, choice), &target, limits);
        sink.check(url).await?;
        Ok(sink)
    }

    /// Opens (or takes) one connection of the pool.
    async fn check(&self, url: &str) -> Result<(), ConnectError> {
        let limit = self.limits.connect;
        let Err(e) = self.pool.acquire(limit).await else {
            return Ok(());
        };
        let error = match &e {
            sqlx::Error::PoolTimedOut => format!("no answer within {limit:?}"),
            e => crate::util::redact::secrets_in(&e.to_string(), url),
        };
        Err(ConnectError::Connect {
            url: redact_url(url),
            error,
            transient: sqlstate::fault(&e) == Fault::Transient,
        })
    }

    /// A sink with a one-connection pool of its own, in no registry, whose
    /// connection carries the session settings itself (`ingestd test`,
    /// `check --db`: see [`super::DryRun`]).
    pub async fn private(url: &str, limits: Limits) -> anyhow::Result<Self> {
        let target = Target::parse(url)?;
        let options = target.session_options(Some(limits.statement));
        let probe = Arc::new(Probe::new(options.clone()));
        let pool = Arc::new(Pool::new(redact_url(url), options, 1, probe));
        let sink = Self::with_pool(pool, &target, limits);
        sink.check(url).await?;
        Ok(sink)
    }

    /// True when the database answers its probe (shared by the sinks of
    /// one database; see [`Probe::ping`]).
    pub async fn ping(&self) -> bool {
        self.pool.probe.ping().await
    }

    /// The session settings' statement for a transaction of this sink.
    pub(super) async fn begin<'c>(
        &self,
        conn: &'c mut PgConnection,
    ) -> Result<sqlx::Transaction<'c, Postgres>, sqlx::Error> {
        self.session.begin(conn).await
    }
}

/// Parses a Postgres URL, honouring Prisma's `schema=NAME` parameter as the
/// connection's `search_path` (the original service's URLs carry it).
pub fn connect_options(url: &str) -> anyhow::Result<PgConnectOptions> {
    Ok(Target::parse(url)?.session_options(None))
}

/// The URL with its passwords replaced, for logs and errors.
pub fn redact_url(url: &str) -> String {
    crate::util::redact::url(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The settings go to the server as literals whatever they contain.
    #[test]
    fn session_settings_are_literals() {
        let session = Session {
            statement: Duration::from_millis(1500),
            search_path: Some(r"a'b\c, public".into()),
        };
        assert_eq!(
            session.set_local(),
            "SELECT pg_catalog.set_config('statement_timeout', '1500', true), \
             pg_catalog.set_config('search_path', E'a''b\\\\c, public', true)"
        );
        let plain = Session {
            search_path: None,
            ..session
        };
        assert!(!plain.set_local().contains("search_path"));
    }
}
