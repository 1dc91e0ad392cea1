//! Sessions as the database is configured for them, as psql would have
//! them.
//!
//! sqlx sends `TimeZone=UTC` and `DateStyle=ISO, MDY` in its startup
//! packet (and `extra_float_digits=2` unless told not to). Startup values
//! outrank `ALTER DATABASE … SET`, `ALTER ROLE … SET` and even the URL's
//! `options` (which the server applies before the packet's own
//! parameters), and `RESET` goes back to them, not to the database's
//! values. Those settings decide how a value is read and written as text:
//! `"01/02/2025"` is 1 February under `DMY`, a `timestamptz` without an
//! offset is read in the session's time zone. So the sink does not send
//! `extra_float_digits` at all, and sets the other two, once per
//! connection, to the value psql would get: the URL's `options`, else the
//! database and role settings (role in database, role, database, every
//! role), else the server's configuration file where the session may read
//! it. The driver needs none of them for itself: it exchanges values in
//! binary.

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgConnection;

/// The settings sqlx's startup packet overrides, which the sink restores.
const RESTORED: [&str; 2] = ["TimeZone", "DateStyle"];

/// The connect options without the settings the sink leaves to the
/// database.
pub(super) fn options(options: PgConnectOptions) -> PgConnectOptions {
    options.extra_float_digits(None)
}

/// Pool options whose every new connection is restored to the database's
/// settings (see the module's documentation).
pub(super) fn restoring(pool: PgPoolOptions, options: &PgConnectOptions) -> PgPoolOptions {
    let url_options = options.get_options().map(str::to_owned);
    pool.after_connect(move |conn, _| {
        let url_options = url_options.clone();
        Box::pin(async move { restore(conn, url_options.as_deref()).await })
    })
}

/// Sets each of [`RESTORED`] to the value psql would have on this
/// connection; a setting nothing configures keeps the server's default.
async fn restore(conn: &mut PgConnection, url_options: Option<&str>) -> Result<(), sqlx::Error> {
    let given = url_options.map(command_line_settings).unwrap_or_default();
    for name in RESTORED {
        let from_url = given
            .iter()
            .rev()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone());
        let value = match from_url {
            Some(v) => Some(v),
            None => configured(conn, name).await?,
        };
        if let Some(value) = value {
            sqlx::query("SELECT set_config($1, $2, false)")
                .bind(name)
                .bind(&value)
                .execute(&mut *conn)
                .await?;
        }
    }
    Ok(())
}

/// The value psql would have for `$1` without command-line options: the
/// database and role settings of this session, most specific first; else
/// the configuration file's (`$2`, read where this role may); else, where
/// the file was read (`$3`), the compiled default.
const CONFIGURED: &str = "\
SELECT coalesce(
  (SELECT substr(c, strpos(c, '=') + 1) FROM pg_db_role_setting s, unnest(s.setconfig) c
   WHERE s.setdatabase IN (0, (SELECT oid FROM pg_database WHERE datname = current_database()))
     AND s.setrole IN (0, (SELECT oid FROM pg_roles WHERE rolname = session_user))
     AND lower(split_part(c, '=', 1)) = lower($1)
   ORDER BY (s.setrole = 0), (s.setdatabase = 0) LIMIT 1),
  $2,
  CASE WHEN $3 THEN (SELECT boot_val FROM pg_settings WHERE lower(name) = lower($1)) END)";

/// What the configuration file sets `$1` to.
const FILE: &str = "\
SELECT setting FROM pg_file_settings WHERE lower(name) = lower($1) AND error IS NULL \
ORDER BY seqno DESC LIMIT 1";

/// May this role read the configuration file's settings?
const FILE_READABLE: &str = "\
SELECT has_table_privilege('pg_catalog.pg_file_settings', 'SELECT') \
AND has_function_privilege('pg_catalog.pg_show_all_file_settings()', 'EXECUTE')";

/// See [`CONFIGURED`]; None where the configuration file is unreadable
/// to this role and nothing else sets `name` (the startup value stays).
async fn configured(conn: &mut PgConnection, name: &str) -> Result<Option<String>, sqlx::Error> {
    let readable: bool = sqlx::query_scalar(FILE_READABLE)
        .fetch_one(&mut *conn)
        .await?;
    let in_file: Option<String> = if readable {
        sqlx::query_scalar(FILE)
            .bind(name)
            .fetch_optional(&mut *conn)
            .await?
    } else {
        None
    };
    sqlx::query_scalar(CONFIGURED)
        .bind(name)
        .bind(in_file)
        .bind(readable)
        .fetch_one(&mut *conn)
        .await
}

/// The `name=value` settings of a command line as the server reads the
/// `options` startup parameter: `-c name=value`, `-cname=value` or
/// `--name=value`, arguments split at spaces a backslash does not escape.
fn command_line_settings(options: &str) -> Vec<(String, String)> {
    let mut args = Vec::new();
    let mut arg = String::new();
    let mut chars = options.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => arg.extend(chars.next()),
            c if c.is_whitespace() => {
                if !arg.is_empty() {
                    args.push(std::mem::take(&mut arg));
                }
            }
            c => arg.push(c),
        }
    }
    if !arg.is_empty() {
        args.push(arg);
    }
    let mut settings = Vec::new();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let setting = match arg.as_str() {
            "-c" => args.next(),
            a => a
                .strip_prefix("--")
                .or_else(|| a.strip_prefix("-c"))
                .map(str::to_owned),
        };
        if let Some((name, value)) = setting.as_deref().and_then(|s| s.split_once('=')) {
            settings.push((name.replace('-', "_"), value.to_owned()));
        }
    }
    settings
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_settings_are_read_as_the_server_reads_them() {
        let given = command_line_settings(
            "-c search_path=ingest -cTimeZone=Asia/Tokyo --DateStyle=ISO,\\ DMY  -c statement-timeout=5 -x",
        );
        let pairs: Vec<(&str, &str)> = given
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            pairs,
            [
                ("search_path", "ingest"),
                ("TimeZone", "Asia/Tokyo"),
                ("DateStyle", "ISO, DMY"),
                ("statement_timeout", "5"),
            ]
        );
    }
}
