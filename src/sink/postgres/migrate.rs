//! Migrations: the `.sql` files of a directory, applied at (re)load.

use super::*;

impl PgSink {
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
}
