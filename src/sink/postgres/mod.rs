//! The Postgres sink: connection (with Prisma's `schema=` parameter),
//! migrations, and the batch writer.
//!
//! A batch has the effect of its rows' rendered statements run one by one,
//! in stream order, in one transaction (ARCHITECTURE.md, the sink's
//! invariant). Consecutive rows with the same statement text form a run,
//! written through that text's [`Plan`]: one UNNEST insert, or one call of
//! the plan's per-row function. An UNNEST statement that meets one key
//! twice in an upsert (21000) is run again row by row, as the single-row
//! statements would meet it. When a batch fails because of some rows'
//! values, a further attempt runs the rows in ranges between the failing
//! ones, a savepoint per range (at most 2b + 1 for b rows at fault), so
//! the rows at fault are known after two round trips, whatever their
//! number, and the others commit.

mod connect;
pub mod ledger;
mod migrate;
pub mod plan;
mod pool;
mod session;
pub mod sqlstate;
mod trial;
mod write;

use connect::Session;
pub use connect::{connect_options, redact_url, ConnectError, Limits};
pub use ledger::{Entry, LedgerError, LedgerKey};
pub use migrate::MigrateError;
use pool::{Conn, Pool};
pub use pool::{PoolChoice, Pools, DEFAULT_POOL_SIZE};
pub use trial::{DryRun, DryRunError, Trial};

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value as Json;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Acquire, Executor, PgConnection, Postgres};

pub use crate::statement::{ParamValue, Rendered};
use plan::{Plan, PlanError, WritePath};
use sqlstate::{Fault, SqlState};

/// Distinct statement texts remembered per sink. Templates with `{% if %}`
/// produce a few variants; more than this means something renders data into
/// the text, so the cache is reset rather than grown.
const MAX_PLANS: usize = 256;

/// A row's statement and what became of it.
#[derive(Debug, Clone, PartialEq)]
pub struct SinkRow {
    pub rendered: Rendered,
    pub outcome: Outcome,
    /// The message's stream sequence, which a sink with a ledger claims.
    pub seq: Option<u64>,
}

/// The fate of one row of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Pending,
    Stored,
    /// Its sequence was in the ledger already: an earlier delivery
    /// committed it, so its statement was not run again.
    Duplicate,
    /// The row's own fault: it fails the same way every time.
    Rejected(Rejection),
}

/// Why the database refused a row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// None when the value never reached the database (a NUL character).
    pub sqlstate: Option<SqlState>,
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
    fn from_sqlx(e: sqlx::Error) -> Self {
        write::Failed::Sql(e).into_write_error()
    }
}

/// Whether a batch's transaction is kept: `Rollback` is `ingestd test`'s
/// dry run of the production path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    Commit,
    Rollback,
}

/// One pipeline's writer: its pool (shared with the other sinks of its
/// database, or its own), its limits and session settings, its plans.
pub struct PgSink {
    pool: Arc<Pool>,
    limits: Limits,
    session: Session,
    plans: Mutex<HashMap<String, Arc<Plan>>>,
    /// Whose sequences each write claims (`exactly_once`).
    ledger: Option<LedgerKey>,
}

impl PgSink {
    /// The plan of a statement text, described against the database once.
    /// A statement that cannot be planned is the pipeline's fault unless
    /// the database could not be reached.
    pub async fn plan(&self, rendered: &Rendered) -> Result<Arc<Plan>, WriteError> {
        if let Some(p) = self.cached(&rendered.sql) {
            return Ok(p);
        }
        let mut conn = self.acquire().await?;
        self.plan_on(&mut conn, rendered).await
    }

    /// [`Self::plan`] on a connection the caller holds. The statement is
    /// described inside a transaction with the session's settings, so its
    /// names resolve through the pipeline's `search_path`.
    async fn plan_on(
        &self,
        conn: &mut PgConnection,
        rendered: &Rendered,
    ) -> Result<Arc<Plan>, WriteError> {
        if let Some(p) = self.cached(&rendered.sql) {
            return Ok(p);
        }
        let mut tx = self.begin(conn).await.map_err(WriteError::from_sqlx)?;
        let plan = Plan::build(&mut tx, &rendered.sql, rendered.params.len())
            .await
            .map_err(|e| match e {
                PlanError::Database(db) if sqlstate::fault(&db) == Fault::Transient => {
                    WriteError::Transient(sqlstate::describe(&db))
                }
                other => WriteError::Pipeline(format!("the statement cannot be prepared: {other}")),
            })?;
        tx.rollback().await.map_err(WriteError::from_sqlx)?;
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
        let mut conn = self.acquire().await?;
        let plan = self.plan_on(&mut conn, rendered).await?;
        sqlx::query(&plan.function.create)
            .execute(&mut *conn)
            .await
            .map_err(WriteError::from_sqlx)?;
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

    /// A connection, once this sink's turn at the pool comes.
    async fn acquire(&self) -> Result<Conn<'_>, WriteError> {
        self.pool
            .acquire(self.limits.connect)
            .await
            .map_err(WriteError::from_sqlx)
    }
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
