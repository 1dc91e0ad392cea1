//! Whose fault a database error is, decided by its SQLSTATE.
//!
//! The decision drives everything that follows a failed write: the event's
//! fault isolates the row and applies the invalid policy; the pipeline's
//! fault holds everything and reports the pipeline as failing until an
//! operator fixes the statement, table or grants; a transient error holds
//! the batch and retries it with backoff. Guessing wrong in the first
//! direction acknowledges events away, in the other it stalls the pipeline,
//! so the whole SQLSTATE table is covered here, in one place.

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

/// The fault of an error with this SQLSTATE. A code in no class of the
/// table (a newer server's, or an extension's) holds the pipeline: an
/// unknown error must never get events acknowledged away.
pub fn fault_of(code: &str) -> Fault {
    RULES
        .iter()
        .find(|r| code.starts_with(r.prefix))
        .map_or(Pipeline, |r| r.fault)
}

/// [`fault_of`] as a SQL boolean expression over the SQLSTATE text
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

/// What the table says an error with this SQLSTATE means.
pub fn meaning(code: &str) -> Option<&'static str> {
    RULES
        .iter()
        .find(|r| code.starts_with(r.prefix))
        .map(|r| r.meaning)
}

/// The fault of any error from the driver: database errors by SQLSTATE;
/// I/O, TLS, pool time-outs and protocol errors are transient.
pub fn fault(e: &sqlx::Error) -> Fault {
    match e {
        sqlx::Error::Database(db) => db.code().map_or(Pipeline, |c| fault_of(&c)),
        sqlx::Error::Configuration(_) => Pipeline,
        _ => Transient,
    }
}

/// A database error's one-line form, whether the driver raised it or the
/// per-row function caught it.
pub fn line(code: &str, message: &str) -> String {
    format!("SQLSTATE {code}: {message}")
}

/// An error as one line, with its SQLSTATE where it has one.
pub fn describe(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Database(db) => match db.code() {
            Some(code) => line(&code, db.message()),
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
            assert_eq!(fault_of(code), *fault, "{code}: {}", rule.meaning);
        }
    }

    #[test]
    fn unknown_codes_hold_the_pipeline() {
        assert_eq!(fault_of("ZZ999"), Pipeline);
        assert_eq!(fault_of(""), Pipeline);
    }
}
