//! Migrations: the `.sql` files of a directory, applied at (re)load, or
//! inside a dry run's transaction (see [`super::DryRun`]).

use std::path::PathBuf;

use super::*;

/// Why a directory's migrations were not applied.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("migrations {}: {source}", dir.display())]
    Read {
        dir: PathBuf,
        #[source]
        source: sqlx::migrate::MigrateError,
    },
    #[error("migrations {}: {}", dir.display(), sqlstate::describe(source))]
    Session {
        dir: PathBuf,
        #[source]
        source: sqlx::Error,
    },
    #[error("migrations {}: {source}{}", dir.display(), lock_hint(source, *lock))]
    Apply {
        dir: PathBuf,
        /// The `lock_timeout` the migrations ran with.
        lock: Duration,
        #[source]
        source: sqlx::migrate::MigrateError,
    },
}

impl MigrateError {
    /// True when trying again later may succeed: the database did not
    /// answer, or another session held a lock longer than `lock_timeout`.
    pub fn is_transient(&self) -> bool {
        use sqlx::migrate::MigrateError as M;
        let sql = match self {
            MigrateError::Read { .. } => return false,
            MigrateError::Session { source, .. } => source,
            MigrateError::Apply { source, .. } => match source {
                M::Execute(e) | M::ExecuteMigration(e, _) => e,
                _ => return false,
            },
        };
        SqlState::of(sql) == Some(SqlState::LOCK_NOT_AVAILABLE)
            || sqlstate::fault(sql) == Fault::Transient
    }
}

/// Names the setting when a migration gave up waiting for a lock.
fn lock_hint(e: &sqlx::migrate::MigrateError, lock: Duration) -> String {
    use sqlx::migrate::MigrateError as M;
    let (M::Execute(sql) | M::ExecuteMigration(sql, _)) = e else {
        return String::new();
    };
    match SqlState::of(sql) {
        Some(SqlState::LOCK_NOT_AVAILABLE) => {
            format!(" (waited more than lock_timeout = {lock:?} for a lock another session holds)")
        }
        _ => String::new(),
    }
}

/// How long the migration settings last: for the rest of a connection of
/// their own, or until the end of the dry run's transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Scope {
    Session,
    Transaction,
}

impl PgSink {
    /// Applies the `.sql` files of `dir` not yet applied (read at run time:
    /// adding a migration needs no recompiling). Versions are shared by all
    /// directories that target one database, hence `ignore_missing`. Runs on
    /// a connection of the pool, in the pipeline's `search_path`, whose lock
    /// waits end after `lock_timeout`
    /// (a migration may run longer than `statement_timeout`, but must not
    /// wait forever on another session's lock); the connection is closed
    /// afterwards rather than returned with those settings.
    pub async fn migrate(&self, dir: &Path) -> Result<(), MigrateError> {
        let mut conn = self
            .pool
            .acquire(self.limits.connect)
            .await
            .map_err(|source| MigrateError::Session {
                dir: dir.to_path_buf(),
                source,
            })?;
        let result = self.migrate_on(&mut conn, dir, Scope::Session).await;
        conn.close().await;
        result
    }

    /// Applies `dir`'s migrations on `conn` with the migration settings
    /// for `scope`; in `Scope::Transaction` the connection's own limits
    /// are restored afterwards, since the transaction goes on.
    pub(super) async fn migrate_on(
        &self,
        conn: &mut PgConnection,
        dir: &Path,
        scope: Scope,
    ) -> Result<(), MigrateError> {
        let mut migrator =
            sqlx::migrate::Migrator::new(dir)
                .await
                .map_err(|source| MigrateError::Read {
                    dir: dir.to_path_buf(),
                    source,
                })?;
        migrator.set_ignore_missing(true);
        let set = match scope {
            Scope::Session => "SET",
            Scope::Transaction => "SET LOCAL",
        };
        let session = |source| MigrateError::Session {
            dir: dir.to_path_buf(),
            source,
        };
        let mut settings = format!(
            "{set} lock_timeout = {}; {set} statement_timeout = 0",
            self.limits.lock.as_millis()
        );
        if let Some(path) = self.session.search_path_sql(scope == Scope::Transaction) {
            settings = format!("{settings}; {path}");
        }
        conn.execute(settings.as_str()).await.map_err(session)?;
        let result = migrator.run_direct(&mut *conn).await;
        if scope == Scope::Transaction && result.is_ok() {
            conn.execute("RESET lock_timeout; RESET statement_timeout")
                .await
                .map_err(session)?;
        }
        result.map_err(|source| MigrateError::Apply {
            dir: dir.to_path_buf(),
            lock: self.limits.lock,
            source,
        })
    }
}
