//! Trials of one statement for `ingestd test`, and dry runs: the
//! production path in a transaction that is rolled back.

use sqlx::TransactionManager;

use super::*;

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
        if crate::statement::lexer::first_word(&plan.sql).as_deref() == Some("with") {
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
        let mut tx = self.begin(&mut conn).await.map_err(WriteError::from_sqlx)?;
        let mut q = sqlx::query_scalar::<_, String>(&sql);
        for v in &values {
            q = q.bind(v.as_deref());
        }
        let result = q.fetch_optional(&mut *tx).await;
        tx.rollback().await.map_err(WriteError::from_sqlx)?;
        match result {
            Ok(text) => Ok(Trial::Row(text.and_then(|t| serde_json::from_str(&t).ok()))),
            Err(e) if sqlstate::fault(&e) == Fault::Event => Ok(Trial::Rejected(Rejection {
                sqlstate: SqlState::of(&e),
                error: sqlstate::describe(&e),
            })),
            Err(e) => Err(WriteError::from_sqlx(e)),
        }
    }
}

/// The transaction manager of Postgres connections: the dry run opens its
/// transaction through it so that sqlx counts it, and every `begin` of the
/// sink's own code on that connection becomes a savepoint.
type Transactions = <Postgres as sqlx::Database>::TransactionManager;

/// Why a dry run could not go on.
#[derive(Debug, thiserror::Error)]
pub enum DryRunError {
    #[error("{0:#}")]
    Connect(anyhow::Error),
    #[error("the dry run's transaction: {}", sqlstate::describe(.0))]
    Transaction(#[source] sqlx::Error),
    #[error("the dry run's connection was lost: nothing was kept, but what it checked after that is unknown")]
    Lost,
    #[error(transparent)]
    Migrate(#[from] MigrateError),
}

/// A sink whose every statement runs in one transaction that is rolled
/// back at the end, for `ingestd test` and `ingestd check --db`: the
/// migrations are applied inside it, so the statements are planned and
/// written against the database as the migrations leave it, and the
/// database is left exactly as it was found.
///
/// The sink takes a connection from its pool for each call; with a pool of
/// one connection whose transaction stays open, every call (plans,
/// writes, trials) runs inside that transaction, and the sink's own
/// transactions there are savepoints.
pub struct DryRun {
    sink: PgSink,
}

impl DryRun {
    pub async fn begin(url: &str, limits: Limits) -> Result<Self, DryRunError> {
        let sink = PgSink::private(url, limits)
            .await
            .map_err(DryRunError::Connect)?;
        let dry = Self { sink };
        let mut conn = dry.connection().await?;
        Transactions::begin(&mut conn, None)
            .await
            .map_err(DryRunError::Transaction)?;
        drop(conn);
        Ok(dry)
    }

    pub fn sink(&self) -> &PgSink {
        &self.sink
    }

    /// Applies `dir`'s migrations inside the transaction.
    pub async fn migrate(&self, dir: &Path) -> Result<(), DryRunError> {
        let mut conn = self.in_transaction().await?;
        self.sink
            .migrate_on(&mut conn, dir, migrate::Scope::Transaction)
            .await?;
        Ok(())
    }

    /// Runs `work` (a call of [`Self::sink`]) in a savepoint, rolled back
    /// to when it fails: a statement that fails must not abort the
    /// transaction for the ones checked after it.
    pub async fn isolated<T>(
        &self,
        work: impl std::future::Future<Output = Result<T, WriteError>>,
    ) -> Result<Result<T, WriteError>, DryRunError> {
        let mut conn = self.in_transaction().await?;
        Transactions::begin(&mut conn, None)
            .await
            .map_err(DryRunError::Transaction)?;
        drop(conn);
        let result = work.await;
        let mut conn = self.in_transaction().await?;
        let end = match result {
            Ok(_) => Transactions::commit(&mut conn).await,
            Err(_) => Transactions::rollback(&mut conn).await,
        };
        end.map_err(DryRunError::Transaction)?;
        Ok(result)
    }

    /// Rolls everything back and closes the connection.
    pub async fn rollback(self) -> Result<(), DryRunError> {
        let mut conn = self.in_transaction().await?;
        while Transactions::get_transaction_depth(&conn) > 0 {
            Transactions::rollback(&mut conn)
                .await
                .map_err(DryRunError::Transaction)?;
        }
        conn.close().await;
        self.sink.pool.close().await;
        Ok(())
    }

    /// The pool's connection, checked to be still the one inside the
    /// transaction (a lost connection is replaced by a new one outside it,
    /// which must never apply a migration for good).
    async fn in_transaction(&self) -> Result<Conn<'_>, DryRunError> {
        let conn = self.connection().await?;
        match Transactions::get_transaction_depth(&conn) {
            0 => Err(DryRunError::Lost),
            _ => Ok(conn),
        }
    }

    /// The pool's only connection.
    async fn connection(&self) -> Result<Conn<'_>, DryRunError> {
        self.sink
            .pool
            .acquire(self.sink.limits.connect)
            .await
            .map_err(DryRunError::Transaction)
    }
}
