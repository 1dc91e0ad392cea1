//! Statement plans: how one rendered row statement is written, batch after
//! batch, with the meaning of running it once per event.
//!
//! The sink's invariant (ARCHITECTURE.md) is that a batch has the effect of
//! the rendered single-row statements run in stream order in one
//! transaction. A plan keeps it in two ways:
//!
//! - **per row** (any statement): a session-local PL/pgSQL function runs the
//!   row statement once per event, in order, so a batch is one round trip
//!   and each row's statement is planned with its values. Every plan has this
//!   function; it is also how rows are isolated when a batch fails (in a
//!   second attempt, a savepoint per range of rows between failing ones).
//! - **unnest** (an optimisation): a plain `INSERT … VALUES (one tuple)`,
//!   optionally with `ON CONFLICT`, whose expressions cannot see the rows the
//!   same statement inserts (no subquery, no user function, no
//!   statement-level trigger or rule on the table), into a table whose
//!   row checks one statement would postpone to its end (AFTER ROW
//!   triggers, foreign keys to itself, deferrable constraints: see
//!   [`Catalog`]) has none, becomes one
//!   `INSERT … SELECT … FROM UNNEST(…) WITH ORDINALITY ORDER BY` statement.
//!   Rows go in stream order; an `ON CONFLICT DO UPDATE` that meets the same
//!   key twice fails (21000) and the batch falls back to per row.
//! - **plain insert first** (for `ON CONFLICT … DO NOTHING`): the unnest
//!   statement without that clause. Where no row conflicts it stores the
//!   same rows, and Postgres skips the speculative insertion that costs it
//!   about a seventh of its time per row (ARCHITECTURE.md, Decisions). A
//!   batch it refuses with a unique or exclusion violation runs again with
//!   the clause; after such a batch the plan waits before trying again
//!   ([`Optimism`]), so a replay of stored events costs little extra.
//!
//! Values are sent as text and cast to the type Postgres infers for their
//! placeholder (describe). The cast names the type without a modifier
//! (`pg_catalog.bpchar`, never `character`, which means `char(1)`), so the
//! column's own modifier applies on assignment exactly as for the
//! single-row statement: `char(2)` pads, `varchar(3)` rejects a longer
//! value, `numeric(5,2)` rounds.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU32, Ordering};

use serde_json::Value as Json;
use sqlx::postgres::PgRow;
use sqlx::{Either, Executor, PgConnection, Row};

use crate::sink::postgres::sqlstate;
use crate::statement::lexer as sql;
use crate::statement::{json_text, ParamValue};

/// How a run of consecutive rows with the same plan is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WritePath {
    /// One `INSERT … SELECT … FROM UNNEST` for the whole run.
    Unnest(Unnest),
    /// The row statement once per row, through the plan's function; the
    /// reason the unnest rewrite does not apply.
    PerRow(String),
}

impl WritePath {
    pub fn name(&self) -> &'static str {
        match self {
            WritePath::Unnest(Unnest {
                plain_insert: Some(_),
                ..
            }) => "unnest, plain insert first",
            WritePath::Unnest(_) => "unnest",
            WritePath::PerRow(_) => "per-row",
        }
    }
}

/// The unnest statement of a plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unnest {
    pub sql: String,
    /// The same without its `ON CONFLICT … DO NOTHING`, if it has one.
    pub plain_insert: Option<String>,
}

/// When a plan tries its plain insert: always, until a batch conflicts;
/// then after 2^k batches that did not try, where k counts the tries in a
/// row that conflicted (at most 2^10). Replaying stored events thus pays
/// for a refused plain insert in few batches, and one redelivered event
/// costs a single batch.
#[derive(Debug, Default)]
pub struct Optimism {
    wait: AtomicU32,
    streak: AtomicU32,
}

impl Optimism {
    /// True when this batch should try the plain insert (counts a wait
    /// down otherwise).
    pub fn tries(&self) -> bool {
        self.wait
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |w| w.checked_sub(1))
            .is_err()
    }

    /// The outcome of a try: a conflict, or rows stored without one.
    pub fn record(&self, conflicted: bool) {
        if conflicted {
            let k = self.streak.fetch_add(1, Ordering::Relaxed).min(10);
            self.wait.store(1 << k, Ordering::Relaxed);
        } else {
            self.streak.store(0, Ordering::Relaxed);
        }
    }
}

/// Why a statement cannot be planned.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("the statement's placeholders do not line up with the template's expressions ({marks} placeholders, {values} values): write values only as {{{{ expression }}}}")]
    Placeholders { marks: usize, values: usize },
    #[error("{}", sqlstate::describe(.0))]
    Database(#[from] sqlx::Error),
}

/// How a JSON value is written as the text input of its target type.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Encoding {
    /// Its plain text: strings as they are, other values as JSON text.
    Text,
    /// JSON text (a string becomes a JSON string).
    Json,
    /// An array literal whose elements are encoded as the element type's.
    Array(Box<Encoding>),
}

/// One placeholder's type.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Param {
    /// The type as a cast target without a modifier, schema-qualified.
    cast: String,
    encoding: Encoding,
}

/// The session-local function that runs the row statement per row.
#[derive(Debug)]
pub struct RowFunction {
    /// `pg_temp.ingestd_<hash>`: the hash covers the whole body, so a
    /// changed statement or type never reuses a stale function.
    pub name: String,
    pub create: String,
    /// The call: `(isolate, row count, one text[] per placeholder)`.
    pub call: String,
}

/// How one statement text is written.
#[derive(Debug)]
pub struct Plan {
    /// The rendered statement (`$n` placeholders), as the template made it.
    pub sql: String,
    params: Vec<Param>,
    pub path: WritePath,
    pub function: RowFunction,
    /// The row statement with each `$n` bound as text and cast: what
    /// `ingestd test` runs to show a stored row.
    pub row_sql: String,
    /// True when the statement returns rows (RETURNING, or a SELECT).
    pub returns_rows: bool,
    pub optimism: Optimism,
}

impl Plan {
    /// Describes the statement against the database and decides its path.
    pub async fn build(
        conn: &mut PgConnection,
        sql_text: &str,
        n_values: usize,
    ) -> Result<Self, PlanError> {
        let sql_text = sql::trim_statement(sql_text);
        let marks = sql::placeholders(sql_text);
        let numbered = marks.iter().enumerate().all(|(i, (_, n))| *n == i + 1);
        if marks.len() != n_values || !numbered {
            return Err(PlanError::Placeholders {
                marks: marks.len(),
                values: n_values,
            });
        }
        let described = (&mut *conn).describe(sql_text).await?;
        let oids: Vec<u32> = match described.parameters() {
            Some(Either::Left(types)) => types
                .iter()
                .map(|t| t.oid().map_or(TEXT_OID, |o| o.0))
                .collect(),
            Some(Either::Right(n)) => vec![TEXT_OID; n],
            None => Vec::new(),
        };
        let returns_rows = !described.columns().is_empty();
        let params = param_types(conn, &oids).await?;
        let cast = |n: usize, expr: String| format!("(({expr})::{})", params[n - 1].cast);
        let row_sql = sql::replace_placeholders(sql_text, 0..sql_text.len(), &marks, |n| {
            cast(n, format!("${n}::text"))
        });
        let body = sql::replace_placeholders(sql_text, 0..sql_text.len(), &marks, |n| {
            format!("_ingestd_v{n}")
        });
        let casts: Vec<&str> = params.iter().map(|p| p.cast.as_str()).collect();
        let function = row_function(&body, &casts, returns_rows);
        let path = match unnest_blocker(conn, sql_text, &marks).await? {
            None => WritePath::Unnest(unnest(sql_text, &marks, &cast)),
            Some(reason) => WritePath::PerRow(reason),
        };
        Ok(Self {
            sql: sql_text.to_string(),
            params,
            path,
            function,
            row_sql,
            returns_rows,
            optimism: Optimism::default(),
        })
    }

    /// Text for each value, in the form its target type reads.
    pub fn encode<'a>(
        &self,
        values: &'a [ParamValue],
    ) -> Result<Vec<Option<Cow<'a, str>>>, NulError> {
        values
            .iter()
            .zip(&self.params)
            .map(|(v, p)| encode_value(v, &p.encoding))
            .collect()
    }

    pub fn arity(&self) -> usize {
        self.params.len()
    }
}

const TEXT_OID: u32 = 25;

/// One row of `pg_type`, as much as encoding needs.
struct TypeRow {
    oid: i64,
    cast: String,
    kind: String,
    base: i64,
    elem: i64,
    category: String,
    name: String,
    schema: String,
}

impl sqlx::FromRow<'_, PgRow> for TypeRow {
    fn from_row(row: &PgRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            oid: row.try_get("oid")?,
            cast: row.try_get("cast")?,
            kind: row.try_get("kind")?,
            base: row.try_get("base")?,
            elem: row.try_get("elem")?,
            category: row.try_get("category")?,
            name: row.try_get("name")?,
            schema: row.try_get("schema")?,
        })
    }
}

/// The cast and encoding of each placeholder type, resolving domains to
/// their base type and arrays to their element type for the encoding.
async fn param_types(conn: &mut PgConnection, oids: &[u32]) -> Result<Vec<Param>, sqlx::Error> {
    let mut rows: HashMap<u32, TypeRow> = HashMap::new();
    let mut wanted: BTreeSet<u32> = oids.iter().copied().collect();
    while !wanted.is_empty() {
        let batch: Vec<i64> = wanted.iter().map(|&o| i64::from(o)).collect();
        let found: Vec<TypeRow> = sqlx::query_as(
            "SELECT t.oid::int8 AS oid, \
                    quote_ident(n.nspname) || '.' || quote_ident(t.typname) AS cast, \
                    t.typtype::text AS kind, t.typbasetype::int8 AS base, \
                    t.typelem::int8 AS elem, t.typcategory::text AS category, \
                    t.typname::text AS name, n.nspname::text AS schema \
             FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace \
             WHERE t.oid = ANY($1::int8[]::oid[])",
        )
        .bind(&batch)
        .fetch_all(&mut *conn)
        .await?;
        wanted.clear();
        for row in found {
            for next in [row.base as u32, row.elem as u32] {
                if next != 0 && !rows.contains_key(&next) {
                    wanted.insert(next);
                }
            }
            rows.insert(row.oid as u32, row);
        }
        wanted.retain(|o| !rows.contains_key(o));
    }
    Ok(oids
        .iter()
        .map(|oid| Param {
            cast: rows
                .get(oid)
                .map_or_else(|| "pg_catalog.text".into(), |r| r.cast.clone()),
            encoding: encoding(&rows, *oid),
        })
        .collect())
}

fn encoding(rows: &HashMap<u32, TypeRow>, oid: u32) -> Encoding {
    let Some(t) = rows.get(&oid) else {
        return Encoding::Text;
    };
    match (t.kind.as_str(), t.category.as_str()) {
        ("d", _) => encoding(rows, t.base as u32),
        (_, "A") if t.elem != 0 => Encoding::Array(Box::new(encoding(rows, t.elem as u32))),
        _ if t.schema == "pg_catalog" && (t.name == "json" || t.name == "jsonb") => Encoding::Json,
        _ => Encoding::Text,
    }
}

/// Why the statement cannot be written as one UNNEST insert, or None when
/// it can: a plain one-tuple INSERT whose evaluation cannot observe the rows
/// of its own batch.
async fn unnest_blocker(
    conn: &mut PgConnection,
    sql_text: &str,
    marks: &[(std::ops::Range<usize>, usize)],
) -> Result<Option<String>, sqlx::Error> {
    let Some(target) = sql::insert_target(sql_text) else {
        return Ok(Some("not a plain INSERT".into()));
    };
    if marks.is_empty() {
        return Ok(Some("no values".into()));
    }
    let Some(tuple) = sql::values_tuple(sql_text) else {
        return Ok(Some(
            "not one VALUES tuple (several, DEFAULT, or a SELECT)".into(),
        ));
    };
    let in_tuple = |r: &std::ops::Range<usize>| {
        tuple
            .items
            .iter()
            .any(|i| i.start <= r.start && r.end <= i.end)
    };
    if !marks.iter().all(|(r, _)| in_tuple(r)) {
        return Ok(Some(
            "values outside the VALUES tuple (ON CONFLICT SET/WHERE, RETURNING)".into(),
        ));
    }
    let conditional = |item: &std::ops::Range<usize>| {
        marks
            .iter()
            .any(|(r, _)| item.start <= r.start && r.end <= item.end)
            && CONDITIONAL
                .iter()
                .any(|w| sql::has_word(&sql_text[item.clone()], w))
    };
    if tuple.items.iter().any(conditional) {
        return Ok(Some(
            "a value inside CASE, COALESCE, AND or OR: the single-row statement reads every value, \
             one statement for the batch only those it reaches"
                .into(),
        ));
    }
    if sql::has_word(sql_text, "select") {
        return Ok(Some("a subquery".into()));
    }
    let names = sql::called_names(sql_text);
    let catalog: Catalog = sqlx::query_as(CATALOG_FACTS)
        .bind(&target)
        .bind(&names)
        .fetch_one(&mut *conn)
        .await?;
    Ok(catalog.blocker(&target))
}

/// What the catalog says about an INSERT's target that decides whether
/// one statement for the whole batch keeps the single-row meaning. The
/// facts are read when the plan is built, so a migration or a reload
/// (both build a new sink) judges the table as it is then.
#[derive(Debug)]
struct Catalog {
    /// `pg_class.relkind` of the target, if it exists.
    relkind: Option<String>,
    /// Statement-level triggers and rules on the target: they see or count
    /// the statement's rows together.
    statement_level: Vec<String>,
    /// User AFTER ROW triggers (INSERT or UPDATE) on the target or its
    /// partitions: in one statement they fire only once every row is in.
    after_row: Vec<String>,
    /// Foreign keys from the table (or a partition) to itself: checked at
    /// the end of the statement, so a parent later in the batch would count.
    self_referencing: Vec<String>,
    /// Deferrable constraints: checked at the end of the statement (or of
    /// the transaction), not after each row.
    deferrable: Vec<String>,
    /// User-defined functions the statement calls: they may read the table.
    user_functions: Vec<String>,
}

impl sqlx::FromRow<'_, PgRow> for Catalog {
    fn from_row(row: &PgRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            relkind: row.try_get("relkind")?,
            statement_level: row.try_get("statement_level")?,
            after_row: row.try_get("after_row")?,
            self_referencing: row.try_get("self_referencing")?,
            deferrable: row.try_get("deferrable")?,
            user_functions: row.try_get("user_functions")?,
        })
    }
}

/// The catalog facts of [`Catalog`], for the target `$1` (as written in
/// the statement) and the names the statement calls `$2`. A table and its
/// partitions are one tree (`pg_partition_tree` lists none for a plain
/// table, hence the union with the target itself).
const CATALOG_FACTS: &str = "\
WITH tree AS (SELECT to_regclass($1) AS relid \
              UNION SELECT relid FROM pg_partition_tree(to_regclass($1)))
SELECT (SELECT relkind::text FROM pg_class WHERE oid = to_regclass($1)) AS relkind,
  ARRAY(SELECT format('trigger %I', tgname) FROM pg_trigger \
        WHERE tgrelid = to_regclass($1) AND NOT tgisinternal AND (tgtype & 1) = 0 \
        UNION ALL SELECT format('rule %I', rulename) FROM pg_rewrite \
        WHERE ev_class = to_regclass($1) AND rulename <> '_RETURN') AS statement_level,
  ARRAY(SELECT format('%I on %s', tgname, tgrelid::regclass) FROM pg_trigger \
        WHERE tgrelid IN (SELECT relid FROM tree) AND NOT tgisinternal AND tgparentid = 0 \
        AND (tgtype & 1) = 1 AND (tgtype & (2 | 64)) = 0 AND (tgtype & (4 | 16)) <> 0 \
        ORDER BY 1) AS after_row,
  ARRAY(SELECT format('%I on %s', conname, conrelid::regclass) FROM pg_constraint \
        WHERE contype = 'f' AND conparentid = 0 AND conrelid IN (SELECT relid FROM tree) \
        AND confrelid IN (SELECT relid FROM tree) ORDER BY 1) AS self_referencing,
  ARRAY(SELECT format('%I on %s', conname, conrelid::regclass) FROM pg_constraint \
        WHERE condeferrable AND conparentid = 0 AND conrelid IN (SELECT relid FROM tree) \
        ORDER BY 1) AS deferrable,
  ARRAY(SELECT DISTINCT p.proname::text FROM pg_proc p \
        JOIN pg_namespace n ON n.oid = p.pronamespace \
        WHERE p.proname = ANY($2) \
        AND n.nspname NOT IN ('pg_catalog', 'information_schema')) AS user_functions";

impl Catalog {
    /// Why the target rules the unnest statement out, with the facts that
    /// do, or None.
    fn blocker(&self, target: &str) -> Option<String> {
        if !matches!(self.relkind.as_deref(), Some("r" | "p")) {
            return Some(format!("{target} is not a plain table"));
        }
        let facts = [
            (&self.statement_level, "statement-level triggers or rules"),
            (
                &self.after_row,
                "AFTER ROW triggers, which one statement fires only after its last row",
            ),
            (
                &self.self_referencing,
                "a foreign key to itself, which one statement checks only after its last row",
            ),
            (
                &self.deferrable,
                "deferrable constraints, checked after the statement, not after each row",
            ),
        ];
        let found: Vec<String> = facts
            .iter()
            .filter(|(names, _)| !names.is_empty())
            .map(|(names, why)| format!("{target} has {why}: {}", names.join(", ")))
            .collect();
        if !found.is_empty() {
            return Some(found.join("; "));
        }
        (!self.user_functions.is_empty()).then(|| {
            format!(
                "calls user-defined functions ({})",
                self.user_functions.join(", ")
            )
        })
    }
}

/// Words that evaluate some operands only when others say so. A bound
/// value is read whether or not its expression is evaluated; the unnest
/// statement casts a value where the expression reads it.
const CONDITIONAL: [&str; 4] = ["case", "coalesce", "and", "or"];

/// The unnest statements of a statement `unnest_blocker` lets through.
fn unnest(
    sql_text: &str,
    marks: &[(std::ops::Range<usize>, usize)],
    cast: &dyn Fn(usize, String) -> String,
) -> Unnest {
    let tuple = sql::values_tuple(sql_text).expect("checked by unnest_blocker");
    let plain_insert = sql::on_conflict_do_nothing(sql_text)
        .filter(|clause| clause.start >= tuple.span.end)
        .map(|clause| {
            let plain = format!("{}{}", &sql_text[..clause.start], &sql_text[clause.end..]);
            unnest_statement(&plain, &tuple, marks, cast)
        });
    Unnest {
        sql: unnest_statement(sql_text, &tuple, marks, cast),
        plain_insert,
    }
}

/// `INSERT … VALUES (e1, e2) tail` → `INSERT … SELECT e1', e2' FROM
/// UNNEST($1::text[], …) WITH ORDINALITY AS u(c1, …, ingestd_ord) ORDER BY
/// u.ingestd_ord tail`, where each `$n` of an item becomes `cast(n, u.cN)`.
fn unnest_statement(
    sql_text: &str,
    tuple: &sql::ValuesTuple,
    marks: &[(std::ops::Range<usize>, usize)],
    cast: &dyn Fn(usize, String) -> String,
) -> String {
    let n_params = marks.len();
    let items: Vec<String> = tuple
        .items
        .iter()
        .map(|r| {
            sql::replace_placeholders(sql_text, r.clone(), marks, |n| cast(n, format!("u.c{n}")))
        })
        .collect();
    let arrays: Vec<String> = (1..=n_params).map(|n| format!("${n}::text[]")).collect();
    let cols: Vec<String> = (1..=n_params).map(|n| format!("c{n}")).collect();
    format!(
        "{}SELECT {} FROM UNNEST({}) WITH ORDINALITY AS u({}, ingestd_ord) ORDER BY u.ingestd_ord{}",
        &sql_text[..tuple.span.start],
        items.join(","),
        arrays.join(", "),
        cols.join(", "),
        &sql_text[tuple.span.end..]
    )
}

/// The PL/pgSQL function that runs `body` (the row statement, with `$n`
/// written as the variable `_ingestd_vn`) for each row in order.
///
/// With `isolate`, a failure that is the row's own fault is returned
/// instead of raised (any other is raised at once), and the other rows
/// are stored as the single-row statements would store them. Rows run in
/// ranges, each range in one savepoint: from the first row not yet done
/// to the last; when row k fails, the range's savepoint is rolled back,
/// k is returned, and the rows before k run again in a range of their
/// own before the rows after it. With b rows at fault that is at most
/// 2b + 1 savepoints and each row runs at most twice: a savepoint per row
/// would overflow each backend's cache of 64 subtransactions, which slows
/// every session's snapshots. A row returned once is never run again
/// (where the rows before it fail on their second run, which only
/// something outside the batch can cause).
///
/// What keeps it equal to the statement run on its own:
/// - each value is cast into a variable of its placeholder's type before
///   the statement runs, as a bound parameter is read before execution:
///   a value the type refuses fails the row even where the statement
///   would never evaluate it (a `SET` of an `UPDATE` that matches no row);
/// - every execution is planned with its values (`force_custom_plan`): a
///   cached generic plan, which PL/pgSQL switches to after five
///   executions on a connection, would make an error that only a custom
///   plan's constant folding raises depend on the row's position;
/// - rows a statement returns are read in a `FOR` loop, whatever their
///   number (`INTO` fails on more than one for DML);
/// - the statement is static SQL run in the function, so its `FOUND` and
///   row count are read by nothing.
fn row_function(body: &str, casts: &[&str], returns_rows: bool) -> RowFunction {
    let statement = if returns_rows {
        format!("FOR _ingestd_r IN {body}\n        LOOP END LOOP")
    } else {
        body.to_string()
    };
    let declare: String = casts
        .iter()
        .enumerate()
        .map(|(k, cast)| format!("\n    _ingestd_v{} {cast};", k + 1))
        .collect();
    let bind: String = casts
        .iter()
        .enumerate()
        .map(|(k, cast)| {
            let n = k + 1;
            format!("\n        _ingestd_v{n} := (_ingestd_a{n}[_ingestd_i])::{cast};")
        })
        .collect();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (statement.as_str(), casts).hash(&mut h);
    let name = format!("pg_temp.ingestd_{:016x}", h.finish());
    let mut tag = String::from("$ingestd$");
    while statement.contains(&tag) {
        tag.insert(1, 'x');
    }
    let args: String = (1..=casts.len())
        .map(|n| format!(", _ingestd_a{n} text[]"))
        .collect();
    let body = loops(&statement, &bind);
    let create = format!(
        "CREATE OR REPLACE FUNCTION {name}(_ingestd_isolate boolean, _ingestd_n integer{args})
RETURNS TABLE(_ingestd_row integer, _ingestd_state text, _ingestd_message text)
LANGUAGE plpgsql SET plan_cache_mode = force_custom_plan AS {tag}
DECLARE
    _ingestd_r record;
    _ingestd_k integer;
    _ingestd_from integer := 1;
    _ingestd_to integer := _ingestd_n;
    _ingestd_next integer := _ingestd_n + 1;
    _ingestd_skip boolean[] := '{{}}';{declare}
BEGIN{body}
END
{tag}"
    );
    let binds: String = (3..casts.len() + 3)
        .map(|n| format!(", ${n}::text[]"))
        .collect();
    let call = format!(
        "SELECT _ingestd_row, _ingestd_state, _ingestd_message FROM {name}($1::boolean, $2::integer{binds})"
    );
    RowFunction { name, create, call }
}

/// The row function's statements: every row in order, or (with
/// `_ingestd_isolate`) the rows in ranges between failing ones, as
/// [`row_function`] describes. `bind` casts the row's values into their
/// variables before `statement` runs.
fn loops(statement: &str, bind: &str) -> String {
    let event_fault = sqlstate::event_fault_sql("SQLSTATE");
    format!(
        "
    IF NOT _ingestd_isolate THEN
        FOR _ingestd_i IN 1.._ingestd_n LOOP{bind}
        {statement};
        END LOOP;
        RETURN;
    END IF;
    WHILE _ingestd_from <= _ingestd_n LOOP
        IF _ingestd_from <= _ingestd_to THEN
            BEGIN
                FOR _ingestd_i IN _ingestd_from.._ingestd_to LOOP
                    CONTINUE WHEN _ingestd_skip[_ingestd_i];
                    _ingestd_k := _ingestd_i;{bind}
        {statement};
                END LOOP;
            EXCEPTION WHEN OTHERS THEN
                IF NOT ({event_fault}) THEN
                    RAISE;
                END IF;
                _ingestd_skip[_ingestd_k] := true;
                _ingestd_row := _ingestd_k;
                _ingestd_state := SQLSTATE;
                _ingestd_message := SQLERRM;
                RETURN NEXT;
                _ingestd_to := _ingestd_k - 1;
                _ingestd_next := _ingestd_k + 1;
                CONTINUE;
            END;
        END IF;
        _ingestd_from := _ingestd_next;
        _ingestd_to := _ingestd_n;
        _ingestd_next := _ingestd_n + 1;
    END LOOP;"
    )
}

/// A value Postgres cannot store in any text type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a value contains a NUL character (\\u0000), which Postgres cannot store")]
pub struct NulError;

/// A JSON value as the text input of a type with this encoding. Null is
/// SQL NULL; see [`Encoding`] for the rest.
fn encode_value<'a>(
    v: &'a ParamValue,
    encoding: &Encoding,
) -> Result<Option<Cow<'a, str>>, NulError> {
    let v = match v {
        ParamValue::Object(text) if has_nul_escape(text) => return Err(NulError),
        ParamValue::Object(text) => return Ok(Some(Cow::Borrowed(text))),
        ParamValue::Value(v) => v,
    };
    match (v, encoding) {
        (Json::Null, _) => Ok(None),
        (Json::String(s), Encoding::Text | Encoding::Array(_)) if s.contains('\0') => Err(NulError),
        (Json::String(s), Encoding::Text | Encoding::Array(_)) => Ok(Some(Cow::Borrowed(s))),
        (Json::Array(items), Encoding::Array(elem)) if !has_nul(v) => {
            Ok(Some(Cow::Owned(array_literal(items, elem))))
        }
        (Json::Array(_), Encoding::Array(_)) => Err(NulError),
        (other, _) => json_text_without_nul(other).map(|t| Some(Cow::Owned(t))),
    }
}

/// JSON text; a NUL anywhere (serde_json writes it as `\u0000`) is
/// refused, since Postgres stores no NUL in text or JSON.
fn json_text_without_nul(v: &Json) -> Result<String, NulError> {
    let text = json_text(v);
    if has_nul_escape(&text) {
        Err(NulError)
    } else {
        Ok(text)
    }
}

/// True when JSON text escapes a NUL. `\\u0000` is an escaped backslash
/// before the text `u0000`: a NUL escape has an odd number of backslashes.
/// Most texts hold no backslash, which one byte scan tells before the
/// (much slower) substring search.
fn has_nul_escape(text: &str) -> bool {
    text.as_bytes().contains(&b'\\')
        && text
            .match_indices("u0000")
            .any(|(i, _)| text[..i].bytes().rev().take_while(|&b| b == b'\\').count() % 2 == 1)
}

fn has_nul(v: &Json) -> bool {
    match v {
        Json::String(s) => s.contains('\0'),
        Json::Array(a) => a.iter().any(has_nul),
        Json::Object(m) => m.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
        _ => false,
    }
}

/// `{"a","b"}`: every element quoted, nested arrays as sub-arrays (a
/// multidimensional array), JSON elements as JSON text.
fn array_literal(items: &[Json], elem: &Encoding) -> String {
    let parts: Vec<String> = items
        .iter()
        .map(|v| match (v, elem) {
            (Json::Null, _) => "NULL".to_string(),
            (_, Encoding::Json) => quote_element(&v.to_string()),
            (Json::Array(inner), _) => array_literal(inner, elem),
            (Json::String(s), _) => quote_element(s),
            (other, _) => quote_element(&other.to_string()),
        })
        .collect();
    format!("{{{}}}", parts.join(","))
}

fn quote_element(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A value as the sink holds it (an object as its text), encoded.
    fn enc(v: Json, encoding: &Encoding) -> Result<Option<String>, NulError> {
        encode_value(&ParamValue::from(v), encoding).map(|t| t.map(Cow::into_owned))
    }

    #[test]
    fn values_are_encoded_for_their_target_type() {
        let text = Encoding::Text;
        let json_enc = Encoding::Json;
        assert_eq!(enc(json!("a"), &json_enc), Ok(Some("\"a\"".into())));
        assert_eq!(
            enc(json!({"k": 1}), &json_enc),
            Ok(Some("{\"k\":1}".into()))
        );
        assert_eq!(enc(json!("a'b"), &text), Ok(Some("a'b".into())));
        assert_eq!(enc(json!(1.5), &text), Ok(Some("1.5".into())));
        assert_eq!(
            enc(json!(9007199254740993_i64), &text),
            Ok(Some("9007199254740993".into()))
        );
        assert_eq!(enc(json!(null), &text), Ok(None));
        let texts = Encoding::Array(Box::new(Encoding::Text));
        assert_eq!(
            enc(json!(["a\"", null, 2]), &texts),
            Ok(Some("{\"a\\\"\",NULL,\"2\"}".into()))
        );
        assert_eq!(
            enc(json!([[1, 2], [3, 4]]), &texts),
            Ok(Some("{{\"1\",\"2\"},{\"3\",\"4\"}}".into()))
        );
        let jsons = Encoding::Array(Box::new(Encoding::Json));
        assert_eq!(
            enc(json!(["a", {"k": [1]}]), &jsons),
            Ok(Some("{\"\\\"a\\\"\",\"{\\\"k\\\":[1]}\"}".into()))
        );
        assert_eq!(enc(json!({"k": ["x\u{0}"]}), &json_enc), Err(NulError));
        assert_eq!(enc(json!({"k\u{0}": 1}), &text), Err(NulError));
        assert_eq!(enc(json!("a\u{0}"), &texts), Err(NulError));
        // The text `\u0000` (a backslash, then u0000) is no NUL.
        let literal = json!({"k": "\\u0000 is text, \\\\\\u0000 too"});
        assert_eq!(
            enc(literal.clone(), &json_enc),
            Ok(Some(literal.to_string()))
        );
    }

    #[test]
    fn unnest_rewrite_keeps_expressions_order_and_tail() {
        let text = "INSERT INTO t (a, b) VALUES ($1, $2::timestamptz AT TIME ZONE 'UTC') ON CONFLICT (a) DO NOTHING RETURNING a";
        let marks = sql::placeholders(text);
        let out = unnest(text, &marks, &|n, e| format!("(({e})::t{n})"));
        let select = "INSERT INTO t (a, b) SELECT ((u.c1)::t1), ((u.c2)::t2)::timestamptz AT TIME ZONE 'UTC' \
             FROM UNNEST($1::text[], $2::text[]) WITH ORDINALITY AS u(c1, c2, ingestd_ord) \
             ORDER BY u.ingestd_ord";
        assert_eq!(
            out.sql,
            format!("{select} ON CONFLICT (a) DO NOTHING RETURNING a")
        );
        assert_eq!(out.plain_insert, Some(format!("{select}  RETURNING a")));
        let upsert = "INSERT INTO t (a) VALUES ($1) ON CONFLICT (a) DO UPDATE SET a = EXCLUDED.a";
        let out = unnest(upsert, &sql::placeholders(upsert), &|_, e| e);
        assert_eq!(out.plain_insert, None);
    }

    #[test]
    fn optimism_waits_longer_after_each_conflict_and_resets_on_success() {
        let o = Optimism::default();
        let pattern = |o: &Optimism, n: usize| -> String {
            (0..n).map(|_| if o.tries() { 'T' } else { '.' }).collect()
        };
        assert_eq!(pattern(&o, 3), "TTT");
        o.record(true);
        assert_eq!(pattern(&o, 2), ".T");
        o.record(true);
        assert_eq!(pattern(&o, 3), "..T");
        o.record(true);
        assert_eq!(pattern(&o, 5), "....T");
        o.record(false);
        o.record(true);
        assert_eq!(pattern(&o, 2), ".T");
        for _ in 0..20 {
            o.record(true);
        }
        assert_eq!(pattern(&o, 1025).find('T'), Some(1024));
    }

    #[test]
    fn the_row_function_runs_the_statement_per_row() {
        let f = row_function(
            "INSERT INTO t VALUES (_ingestd_v1)",
            &["pg_catalog.int4"],
            false,
        );
        assert!(f.name.starts_with("pg_temp.ingestd_"));
        assert!(f.create.contains("FOR _ingestd_i IN 1.._ingestd_n LOOP"));
        assert!(f.create.contains("_ingestd_v1 pg_catalog.int4;"));
        assert!(f
            .create
            .contains("_ingestd_v1 := (_ingestd_a1[_ingestd_i])::pg_catalog.int4;"));
        assert!(f.create.contains("SET plan_cache_mode = force_custom_plan"));
        assert!(f.call.ends_with("($1::boolean, $2::integer, $3::text[])"));
        let returning = row_function("DELETE FROM t RETURNING a", &[], true);
        assert!(returning
            .create
            .contains("FOR _ingestd_r IN DELETE FROM t RETURNING a\n        LOOP END LOOP;"));
        assert_ne!(f.name, returning.name);
    }
}
