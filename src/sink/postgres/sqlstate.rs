//! Whose fault a database error is, decided by its SQLSTATE.
//!
//! The decision drives everything that follows a failed write: the event's
//! fault isolates the row and applies the invalid policy; the pipeline's
//! fault holds everything and reports the pipeline as failing until an
//! operator fixes the statement, table or grants; a transient error holds
//! the batch and retries it with backoff. Guessing wrong in the first
//! direction acknowledges events away, in the other it stalls the pipeline,
//! so the whole SQLSTATE table is covered here, in one place.
//!
//! A code is parsed once, where it leaves the driver or the per-row
//! function, into a [`SqlState`]; everything after matches on that, never
//! on an error's message.

use std::fmt;
use std::str::FromStr;

/// A SQLSTATE: five characters, digits or upper-case letters, whose first
/// two are its class.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SqlState([u8; 5]);

/// A text that is not a SQLSTATE.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a SQLSTATE (five digits or upper-case letters)")]
pub struct NotSqlState(pub String);

impl SqlState {
    /// `cardinality_violation`: an `ON CONFLICT DO UPDATE` met one key
    /// twice in a statement.
    pub const CARDINALITY_VIOLATION: SqlState = SqlState::known(b"21000");
    pub const UNIQUE_VIOLATION: SqlState = SqlState::known(b"23505");
    pub const EXCLUSION_VIOLATION: SqlState = SqlState::known(b"23P01");
    /// `invalid_schema_name`: also a session's `pg_temp` before anything
    /// was created in it.
    pub const INVALID_SCHEMA_NAME: SqlState = SqlState::known(b"3F000");
    pub const UNDEFINED_FUNCTION: SqlState = SqlState::known(b"42883");
    /// `duplicate_table`: a `CREATE TABLE` that lost a race to another.
    pub const DUPLICATE_TABLE: SqlState = SqlState::known(b"42P07");
    /// `lock_not_available`: `lock_timeout` passed.
    pub const LOCK_NOT_AVAILABLE: SqlState = SqlState::known(b"55P03");

    /// A code written in the source; not one fails the build.
    const fn known(code: &[u8; 5]) -> Self {
        let mut i = 0;
        while i < 5 {
            assert!(code[i].is_ascii_digit() || code[i].is_ascii_uppercase());
            i += 1;
        }
        SqlState(*code)
    }

    pub fn parse(text: &str) -> Result<Self, NotSqlState> {
        let refused = || NotSqlState(text.to_string());
        let bytes: [u8; 5] = text.as_bytes().try_into().map_err(|_| refused())?;
        if bytes
            .iter()
            .all(|b| b.is_ascii_digit() || b.is_ascii_uppercase())
        {
            Ok(SqlState(bytes))
        } else {
            Err(refused())
        }
    }

    /// The SQLSTATE of a database error (none for I/O, TLS, pool errors,
    /// or a server that sent none or a malformed one).
    pub fn of(e: &sqlx::Error) -> Option<SqlState> {
        match e {
            sqlx::Error::Database(db) => db.code().and_then(|c| SqlState::parse(&c).ok()),
            _ => None,
        }
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("a SQLSTATE is ASCII")
    }

    /// Its first two characters (`23` for every integrity violation).
    pub fn class(&self) -> &str {
        &self.as_str()[..2]
    }

    /// The row of the table that decides it.
    fn rule(self) -> Option<&'static Rule> {
        RULES.iter().find(|r| self.as_str().starts_with(r.prefix))
    }

    /// Whose fault an error with this code is. A code in no class of the
    /// table (a newer server's, or an extension's) holds the pipeline: an
    /// unknown error must never get events acknowledged away.
    pub fn fault(self) -> Fault {
        self.rule().map_or(Pipeline, |r| r.fault)
    }

    /// What the table says an error with this code means.
    pub fn meaning(self) -> Option<&'static str> {
        self.rule().map(|r| r.meaning)
    }
}

impl fmt::Display for SqlState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for SqlState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SqlState({})", self.as_str())
    }
}

impl FromStr for SqlState {
    type Err = NotSqlState;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        SqlState::parse(text)
    }
}

/// Read from the per-row function's result (its `SQLSTATE` as text):
/// parsed where it arrives.
impl sqlx::Type<sqlx::Postgres> for SqlState {
    fn type_info() -> sqlx::postgres::PgTypeInfo {
        <&str as sqlx::Type<sqlx::Postgres>>::type_info()
    }

    fn compatible(ty: &sqlx::postgres::PgTypeInfo) -> bool {
        <&str as sqlx::Type<sqlx::Postgres>>::compatible(ty)
    }
}

impl<'r> sqlx::Decode<'r, sqlx::Postgres> for SqlState {
    fn decode(value: sqlx::postgres::PgValueRef<'r>) -> Result<Self, sqlx::error::BoxDynError> {
        let text = <&str as sqlx::Decode<sqlx::Postgres>>::decode(value)?;
        Ok(SqlState::parse(text)?)
    }
}

/// Who has to act for a failed statement to succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// This event's values: it will fail the same way every time.
    Event,
    /// The pipeline's statement, table or privileges: every event fails
    /// until an operator changes something.
    Pipeline,
    /// The database or the network: expected to pass by itself.
    Transient,
}

/// One row of the table: a SQLSTATE prefix (a two-character class or a
/// full code), its fault, and an example of what it means.
pub struct Rule {
    pub prefix: &'static str,
    pub fault: Fault,
    pub meaning: &'static str,
}

const fn rule(prefix: &'static str, fault: Fault, meaning: &'static str) -> Rule {
    Rule {
        prefix,
        fault,
        meaning,
    }
}

use Fault::{Event, Pipeline, Transient};

/// Every SQLSTATE class Postgres defines, with the few full codes whose
/// fault differs from their class's. Full codes come before their class:
/// the first matching prefix wins.
pub const RULES: &[Rule] = &[
    rule("03", Pipeline, "SQL statement not yet complete"),
    rule("08", Transient, "connection exception"),
    rule("09", Event, "triggered action exception"),
    rule("0A", Pipeline, "feature not supported"),
    rule("0B", Pipeline, "invalid transaction initiation"),
    rule("0F", Pipeline, "locator exception"),
    rule("0L", Pipeline, "invalid grantor"),
    rule("0P", Pipeline, "invalid role specification"),
    rule("0Z", Pipeline, "diagnostics exception"),
    rule("20", Event, "case not found (in a trigger's CASE)"),
    rule("21", Event, "cardinality violation (a subquery returned several rows for this event)"),
    rule("22", Event, "data exception (a value the type cannot hold)"),
    rule("23", Event, "integrity constraint violation"),
    rule("24", Pipeline, "invalid cursor state"),
    rule("25P03", Transient, "idle in transaction session timeout"),
    rule("25", Pipeline, "invalid transaction state"),
    rule("26", Transient, "invalid SQL statement name (a prepared statement a pooler lost)"),
    rule("27", Event, "triggered data change violation"),
    rule("28", Pipeline, "invalid authorization specification"),
    rule("2B", Pipeline, "dependent privilege descriptors still exist"),
    rule("2D", Pipeline, "invalid transaction termination"),
    rule("2F", Pipeline, "SQL routine exception (a function without RETURN)"),
    rule("34", Pipeline, "invalid cursor name"),
    rule("38", Pipeline, "external routine exception"),
    rule("39", Pipeline, "external routine invocation exception"),
    rule("3B", Pipeline, "savepoint exception"),
    rule("3D", Pipeline, "invalid catalog name (no such database)"),
    rule("3F", Pipeline, "invalid schema name"),
    rule("40", Transient, "transaction rollback (serialization failure, deadlock)"),
    rule("42", Pipeline, "syntax error or access rule violation (undefined table or column, type mismatch, privilege)"),
    rule("44", Event, "WITH CHECK OPTION violation"),
    rule("53", Transient, "insufficient resources (disk full, out of memory, too many connections)"),
    rule("54", Event, "program limit exceeded (a value too large for an index row)"),
    rule("55", Transient, "object not in prerequisite state (lock not available, object in use)"),
    rule("57", Transient, "operator intervention (statement timeout, cancel, shutdown)"),
    rule("58", Transient, "system error (I/O)"),
    rule("72", Transient, "snapshot too old"),
    rule("F0", Pipeline, "configuration file error"),
    rule("HV", Transient, "foreign data wrapper error"),
    rule("P0", Event, "PL/pgSQL error (RAISE from a trigger, no data, too many rows, ASSERT)"),
    rule("XX", Pipeline, "internal error (data or index corrupted)"),
];

/// [`SqlState::fault`] as a SQL boolean expression over the SQLSTATE text
/// `code`: true when the error is the event's fault. The per-row function
/// catches only those; anything else (a deadlock, a lock time-out) must
/// end the attempt at once, not be collected while the rows after it keep
/// waiting on locks.
pub fn event_fault_sql(code: &str) -> String {
    let arms: String = RULES
        .iter()
        .map(|r| {
            format!(
                " WHEN {code} LIKE '{}%' THEN {}",
                r.prefix,
                r.fault == Event
            )
        })
        .collect();
    format!("CASE{arms} ELSE false END")
}

/// The fault of any error from the driver: database errors by SQLSTATE;
/// I/O, TLS, pool time-outs and protocol errors are transient.
pub fn fault(e: &sqlx::Error) -> Fault {
    match e {
        sqlx::Error::Database(_) => SqlState::of(e).map_or(Pipeline, SqlState::fault),
        sqlx::Error::Configuration(_) => Pipeline,
        _ => Transient,
    }
}

/// A database error's one-line form, whether the driver raised it or the
/// per-row function caught it.
pub fn line(code: SqlState, message: &str) -> String {
    format!("SQLSTATE {code}: {message}")
}

/// An error as one line, with its SQLSTATE where it has one.
pub fn describe(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Database(db) => match SqlState::of(e) {
            Some(code) => line(code, db.message()),
            None => db.message().to_string(),
        },
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One example per row of the table, and what it must mean.
    const EXAMPLES: &[(&str, Fault)] = &[
        ("03000", Pipeline),
        ("08006", Transient),
        ("09000", Event),
        ("0A000", Pipeline),
        ("0B000", Pipeline),
        ("0F001", Pipeline),
        ("0L000", Pipeline),
        ("0P000", Pipeline),
        ("0Z002", Pipeline),
        ("20000", Event),
        ("21000", Event),
        ("22001", Event),
        ("23505", Event),
        ("24000", Pipeline),
        ("25P03", Transient),
        ("25006", Pipeline),
        ("26000", Transient),
        ("27000", Event),
        ("28P01", Pipeline),
        ("2BP01", Pipeline),
        ("2D000", Pipeline),
        ("2F005", Pipeline),
        ("34000", Pipeline),
        ("38001", Pipeline),
        ("39P01", Pipeline),
        ("3B001", Pipeline),
        ("3D000", Pipeline),
        ("3F000", Pipeline),
        ("40001", Transient),
        ("42703", Pipeline),
        ("44000", Event),
        ("53100", Transient),
        ("54000", Event),
        ("55P03", Transient),
        ("57014", Transient),
        ("58030", Transient),
        ("72000", Transient),
        ("F0000", Pipeline),
        ("HV00N", Transient),
        ("P0001", Event),
        ("XX001", Pipeline),
    ];

    #[test]
    fn every_row_of_the_table_has_its_example() {
        assert_eq!(EXAMPLES.len(), RULES.len());
        for (rule, (code, fault)) in RULES.iter().zip(EXAMPLES) {
            assert!(
                code.starts_with(rule.prefix),
                "{code} is not {}",
                rule.prefix
            );
            let state = SqlState::parse(code).unwrap();
            assert_eq!(state.fault(), *fault, "{code}: {}", rule.meaning);
            assert_eq!(state.meaning(), Some(rule.meaning));
        }
    }

    #[test]
    fn unknown_codes_hold_the_pipeline() {
        let unknown = SqlState::parse("ZZ999").unwrap();
        assert_eq!(unknown.fault(), Pipeline);
        assert_eq!(unknown.meaning(), None);
    }

    #[test]
    fn codes_parse_once_and_show_as_themselves() {
        let state: SqlState = "23P01".parse().unwrap();
        assert_eq!(state, SqlState::EXCLUSION_VIOLATION);
        assert_eq!(state.to_string(), "23P01");
        assert_eq!(state.class(), "23");
        assert_eq!(state.fault(), Event);
        assert_eq!(format!("{state:?}"), "SqlState(23P01)");
        assert_eq!(SqlState::LOCK_NOT_AVAILABLE.class(), "55");
        assert_eq!(SqlState::LOCK_NOT_AVAILABLE.fault(), Transient);
    }

    #[test]
    fn texts_that_are_not_codes_are_refused() {
        for text in ["", "2350", "235050", "23p01", "23 01", "2350\u{e9}"] {
            assert_eq!(
                SqlState::parse(text),
                Err(NotSqlState(text.to_string())),
                "{text:?}"
            );
        }
    }
}
