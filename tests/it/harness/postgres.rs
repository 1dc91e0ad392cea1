//! PostgreSQL: the server of the tests, the contract's table, databases
//! created and dropped, stored rows.

use super::*;

pub const PG_HOST: &str = "127.0.0.1";
pub const PG_PORT: u16 = 5432;

/// Postgres URL of `database` on `port` (the real server or a [`TcpProxy`]).
/// Written the way the original service's `.env` wrote it (Prisma style).
pub fn postgres_url(port: u16, database: &str) -> String {
    format!("postgresql://postgres:postgres@{PG_HOST}:{port}/{database}")
}

/// A row of the contract's `TiktokEvent` table, with the timestamp rendered
/// as text (the column has no time zone; text makes the comparison exact)
/// and `createdAt` as its age in seconds relative to the database's UTC now.
#[derive(Debug, Clone, PartialEq)]
pub struct TiktokRow {
    pub id: String,
    pub event_id: String,
    pub timestamp: String,
    pub funnel_stage: String,
    pub event_type: String,
    pub data: Value,
    pub created_at: String,
    pub created_age_secs: f64,
}

/// Read from the columns `TestEnv::try_rows_in` selects, `data` as its
/// JSON text.
impl sqlx::FromRow<'_, sqlx::postgres::PgRow> for TiktokRow {
    fn from_row(row: &sqlx::postgres::PgRow) -> Result<Self, sqlx::Error> {
        use sqlx::Row;
        let data: String = row.try_get("data")?;
        Ok(Self {
            id: row.try_get("id")?,
            event_id: row.try_get("eventId")?,
            timestamp: row.try_get("timestamp")?,
            funnel_stage: row.try_get("funnelStage")?,
            event_type: row.try_get("eventType")?,
            data: serde_json::from_str(&data).map_err(|e| sqlx::Error::ColumnDecode {
                index: "data".into(),
                source: e.into(),
            })?,
            created_at: row.try_get("createdAt")?,
            created_age_secs: row.try_get("created_age_secs")?,
        })
    }
}

/// The unquoted name of the contract's table, as SQL.
pub const TIKTOK_TABLE: &str = r#""TiktokEvent""#;

/// A connection to the `postgres` maintenance database, for CREATE/DROP.
pub(super) async fn admin_pool() -> Result<PgPool, sqlx::Error> {
    PgPoolOptions::new()
        .max_connections(1)
        .connect(&postgres_url(PG_PORT, "postgres"))
        .await
}

pub(super) async fn create_database(name: &str) {
    let admin = admin_pool().await.expect("connect to the postgres db");
    sqlx::raw_sql(&format!(r#"CREATE DATABASE "{name}""#))
        .execute(&admin)
        .await
        .unwrap_or_else(|e| panic!("create database {name}: {e}"));
    admin.close().await;
}

/// FORCE: a killed engine's connections may not be gone yet.
pub(super) async fn drop_database(name: &str) -> Result<(), sqlx::Error> {
    let admin = admin_pool().await?;
    sqlx::raw_sql(&format!(r#"DROP DATABASE IF EXISTS "{name}" WITH (FORCE)"#))
        .execute(&admin)
        .await?;
    admin.close().await;
    Ok(())
}

/// The URL of `env`'s database through `proxy` (to stop and start it).
pub fn proxied(env: &TestEnv, proxy: &TcpProxy) -> String {
    postgres_url(proxy.port(), &env.db_name)
}

/// Fails unless the table holds exactly one row per eventId of `expected`
/// (in any order) and nothing else.
pub async fn assert_stored_exactly(env: &TestEnv, expected: &[String]) {
    let sql = r#"SELECT "eventId" FROM "TiktokEvent""#;
    let mut stored: Vec<String> = sqlx::query_scalar(sql)
        .fetch_all(&env.db)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    // Sorted here: the database's collation need not order like Rust.
    stored.sort_unstable();
    let mut expected = expected.to_vec();
    expected.sort_unstable();
    if stored != expected {
        let missing = expected
            .iter()
            .filter(|id| stored.binary_search(id).is_err());
        let extra = stored
            .iter()
            .filter(|id| expected.binary_search(id).is_err());
        panic!(
            "stored {} rows, want {}; missing {:?}; unexpected {:?} (first 10 of each)",
            stored.len(),
            expected.len(),
            missing.take(10).collect::<Vec<_>>(),
            extra.take(10).collect::<Vec<_>>(),
        );
    }
}
