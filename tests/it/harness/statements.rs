//! The corpus of the differential statement tests: pipelines other users
//! would write, each with its tables and an event generator, and the
//! reference the engine is compared with.
//!
//! The reference is the sink's invariant taken literally: render each
//! event's statement (the same template, values as placeholders), then run
//! it with `PREPARE`/`EXECUTE`, each value a quoted literal that Postgres
//! types by its own inference and reads with the type's input function,
//! one event after another in stream order, in one transaction, each in a
//! savepoint (a failing statement has no effect and is counted). Each
//! execution is planned with its values, as a statement run once is
//! (`force_custom_plan`): a prepared statement's generic plan, after five
//! executions, would make the reference depend on positions itself.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use ingestd::sink::postgres::{Finish, Outcome, PgSink, Rendered, SinkRow, WriteError};
use serde_json::{json, Value};
use sqlx::{PgConnection, Row};

use super::*;

/// A small deterministic generator (xorshift64*), so a failing run can be
/// replayed exactly.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// True with probability `percent` / 100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    pub fn key(&mut self, n: u64) -> String {
        format!("k{}", self.below(n))
    }

    pub fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len() as u64) as usize]
    }

    /// `n` characters from a 64-symbol alphabet: incompressible enough
    /// that Postgres cannot shrink them under an index row's limit.
    pub fn noise(&mut self, n: usize) -> String {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        (0..n)
            .map(|_| ALPHABET[self.below(64) as usize] as char)
            .collect()
    }
}

/// One pipeline of the corpus.
pub struct Case {
    pub name: &'static str,
    /// Tables, types and functions, created in the pipeline's own schema.
    pub ddl: &'static str,
    pub template: &'static str,
    /// The tables whose contents are compared.
    pub tables: &'static [&'static str],
    /// The event at position `i`.
    pub event: fn(&mut Rng, usize) -> Value,
    /// The result does not depend on the order of the events (so it holds
    /// with several batches in flight).
    pub order_independent: bool,
    /// The write path `ingestd check --db` must report.
    pub path: &'static str,
}

/// The events of the corpus repeat keys on purpose: upserts, guards and
/// `NOT EXISTS` only mean something when keys come back.
pub fn corpus() -> Vec<Case> {
    vec![
        Case {
            name: "upsert_set",
            ddl: "CREATE TABLE kv (k text PRIMARY KEY, note text NOT NULL, n int NOT NULL);",
            template: "INSERT INTO kv (k, note, n) VALUES ({{ event.k }}, {{ event.note }}, {{ event.n }})
ON CONFLICT (k) DO UPDATE SET note = kv.note || {{ event.note }}, n = kv.n + {{ event.n }}",
            tables: &["kv"],
            event: |r, _| json!({"k": r.key(15), "note": r.pick(&["a", "b", "c"]), "n": r.below(100)}),
            order_independent: false,
            path: "per-row",
        },
        Case {
            name: "excluded_version_guard",
            ddl: "CREATE TABLE latest (k text PRIMARY KEY, v int NOT NULL, seq bigint NOT NULL);",
            template: "INSERT INTO latest (k, v, seq) VALUES ({{ event.k }}, {{ event.v }}, {{ msg.seq }})
ON CONFLICT (k) DO UPDATE SET v = EXCLUDED.v, seq = EXCLUDED.seq WHERE latest.seq < EXCLUDED.seq",
            tables: &["latest"],
            event: |r, _| json!({"k": r.key(12), "v": r.below(1000)}),
            order_independent: true,
            path: "unnest",
        },
        Case {
            name: "cte_two_tables_foreign_key",
            ddl: "CREATE TABLE users (id text PRIMARY KEY, name text NOT NULL);
CREATE TABLE orders (id text PRIMARY KEY, user_id text NOT NULL REFERENCES users (id),
                     amount numeric(10,2) NOT NULL);",
            template: "WITH u AS (
  INSERT INTO users (id, name) VALUES ({{ event.user }}, {{ event.name }})
  ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name RETURNING id
)
INSERT INTO orders (id, user_id, amount) SELECT {{ event.order }}, u.id, {{ event.amount }} FROM u
ON CONFLICT (id) DO NOTHING",
            tables: &["users", "orders"],
            event: |r, i| {
                json!({"user": r.key(10), "name": r.pick(&["ann", "bob", "cy"]),
                       "order": format!("o{}", i as u64 - r.below(3).min(i as u64)),
                       "amount": format!("{}.{:02}", r.below(500), r.below(100))})
            },
            order_independent: false,
            path: "per-row",
        },
        Case {
            name: "update_by_key",
            ddl: "CREATE TABLE counters (k text PRIMARY KEY, total bigint NOT NULL, last text);
INSERT INTO counters SELECT 'k' || i, 0, NULL FROM generate_series(0, 14) i;",
            template: "UPDATE counters SET total = total + {{ event.n }}, last = {{ event.note }}
WHERE k = {{ event.k }}",
            tables: &["counters"],
            event: |r, _| json!({"k": r.key(20), "n": r.below(50), "note": r.pick(&["x", "y", "z"])}),
            order_independent: false,
            path: "per-row",
        },
        Case {
            name: "delete_by_key",
            ddl: "CREATE TABLE items (k text PRIMARY KEY, v int);
INSERT INTO items SELECT 'k' || i, i FROM generate_series(0, 59) i;",
            template: "DELETE FROM items WHERE k = {{ event.k }}",
            tables: &["items"],
            event: |r, _| json!({"k": r.key(80)}),
            order_independent: true,
            path: "per-row",
        },
        Case {
            name: "insert_select_where_not_exists",
            ddl: "CREATE TABLE firsts (k text NOT NULL, v text NOT NULL);",
            template: "INSERT INTO firsts (k, v) SELECT {{ event.k }}, {{ event.v }}
WHERE NOT EXISTS (SELECT 1 FROM firsts WHERE k = {{ event.k }})",
            tables: &["firsts"],
            event: |r, _| json!({"k": r.key(25), "v": r.pick(&["p", "q", "r", "s"])}),
            order_independent: false,
            path: "per-row",
        },
        Case {
            name: "conditional_two_tables",
            ddl: "CREATE TABLE ta (k text PRIMARY KEY, v text NOT NULL);
CREATE TABLE tb (k text PRIMARY KEY, n int NOT NULL);",
            template: "{% if event.kind == 'a' %}INSERT INTO ta (k, v) VALUES ({{ event.k }}, {{ event.v }})
ON CONFLICT (k) DO UPDATE SET v = EXCLUDED.v
{% else %}INSERT INTO tb (k, n) VALUES ({{ event.k }}, {{ event.n }})
ON CONFLICT (k) DO UPDATE SET n = tb.n + EXCLUDED.n{% endif %}",
            tables: &["ta", "tb"],
            event: |r, _| {
                json!({"kind": r.pick(&["a", "b"]), "k": r.key(10), "v": r.pick(&["v1", "v2"]),
                       "n": r.below(10)})
            },
            order_independent: false,
            path: "unnest",
        },
        Case {
            name: "every_type",
            ddl: "CREATE TYPE mood AS ENUM ('happy', 'sad');
CREATE DOMAIN positive AS integer CHECK (VALUE > 0);
CREATE TABLE typed (
  id text PRIMARY KEY, c char(2), vc varchar(5), num numeric(6,2), b bit(3), ints int[],
  texts text[], m mood, p positive, j json, jb jsonb, ts timestamp, tstz timestamptz,
  d date, u uuid, big bigint, bin bytea, flag boolean, dbl double precision, moods mood[]);",
            template: "INSERT INTO typed (id, c, vc, num, b, ints, texts, m, p, j, jb, ts, tstz, d, u, big, bin,
                   flag, dbl, moods)
VALUES ({{ event.id }}, {{ event.c }}, {{ event.vc }}, {{ event.num }}, {{ event.b }},
        {{ event.ints }}, {{ event.texts }}, {{ event.m }}, {{ event.p }}, {{ event.j }},
        {{ event.jb }}, {{ event.ts }}, {{ event.tstz }}, {{ event.d }}, {{ event.u }},
        {{ event.big }}, {{ event.bin }}, {{ event.flag }}, {{ event.dbl }}, {{ event.moods }})
ON CONFLICT (id) DO NOTHING",
            tables: &["typed"],
            event: typed_event,
            order_independent: false,
            path: "unnest, plain insert first",
        },
        Case {
            name: "trigger_raises",
            ddl: "CREATE TABLE payments (id text PRIMARY KEY, amount int NOT NULL);
CREATE FUNCTION no_negative() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.amount < 0 THEN RAISE EXCEPTION 'negative amount %', NEW.amount; END IF;
  RETURN NEW;
END $$;
CREATE TRIGGER payments_check BEFORE INSERT ON payments
  FOR EACH ROW EXECUTE FUNCTION no_negative();",
            template: "INSERT INTO payments (id, amount) VALUES ({{ event.id }}, {{ event.amount }})
ON CONFLICT (id) DO UPDATE SET amount = EXCLUDED.amount",
            tables: &["payments"],
            event: |r, _| {
                let amount = if r.chance(6) { -1 - r.below(9) as i64 } else { r.below(900) as i64 };
                json!({"id": r.key(40), "amount": amount})
            },
            order_independent: false,
            path: "unnest",
        },
        Case {
            name: "index_cannot_hold",
            ddl: "CREATE TABLE docs (id text PRIMARY KEY, body text NOT NULL);
CREATE INDEX docs_body ON docs (body);",
            template: "INSERT INTO docs (id, body) VALUES ({{ event.id }}, {{ event.body }})
ON CONFLICT (id) DO NOTHING",
            tables: &["docs"],
            event: |r, i| {
                let body = if r.chance(5) { r.noise(6000) } else { r.noise(12) };
                json!({"id": format!("d{i}"), "body": body})
            },
            order_independent: true,
            path: "unnest, plain insert first",
        },
        Case {
            name: "several_values_tuples",
            ddl: "CREATE TABLE pairs (k text, side text, v int NOT NULL, PRIMARY KEY (k, side));",
            template: "INSERT INTO pairs (k, side, v) VALUES ({{ event.k }}, 'l', {{ event.v }}),
({{ event.k }}, 'r', {{ event.v }} + 1)
ON CONFLICT (k, side) DO UPDATE SET v = EXCLUDED.v",
            tables: &["pairs"],
            event: |r, _| json!({"k": r.key(12), "v": r.below(100)}),
            order_independent: false,
            path: "per-row",
        },
        Case {
            name: "upsert_returning",
            ddl: "CREATE TABLE ret (k text PRIMARY KEY, v int NOT NULL);",
            template: "INSERT INTO ret (k, v) VALUES ({{ event.k }}, {{ event.v }})
ON CONFLICT (k) DO UPDATE SET v = ret.v * 2 + EXCLUDED.v RETURNING k, v",
            tables: &["ret"],
            event: |r, _| json!({"k": r.key(10), "v": r.below(10)}),
            order_independent: false,
            path: "unnest",
        },
        Case {
            name: "subquery_sees_earlier_rows",
            ddl: "CREATE TABLE arrivals (k text PRIMARY KEY, pos bigint NOT NULL);",
            template: "INSERT INTO arrivals (k, pos) VALUES ({{ event.k }}, (SELECT count(*) FROM arrivals) + 1)
ON CONFLICT (k) DO NOTHING",
            tables: &["arrivals"],
            event: |r, _| json!({"k": r.key(100)}),
            order_independent: false,
            path: "per-row",
        },
        Case {
            name: "exactly_once_by_sequence",
            ddl: "CREATE TABLE log (seq bigint PRIMARY KEY, k text NOT NULL, v int NOT NULL);",
            template: "INSERT INTO log (seq, k, v) VALUES ({{ msg.seq }}, {{ event.k }}, {{ event.v }})
ON CONFLICT (seq) DO NOTHING",
            tables: &["log"],
            event: |r, _| json!({"k": r.key(5), "v": r.below(3)}),
            order_independent: true,
            path: "unnest, plain insert first",
        },
        Case {
            // `subject` without `msg`: the engine builds only the subject.
            name: "subject_without_msg",
            ddl: "CREATE TABLE arrivals_by_subject (subject text NOT NULL, k text NOT NULL);",
            template: "INSERT INTO arrivals_by_subject (subject, k) VALUES ({{ subject }}, {{ event.k }})",
            tables: &["arrivals_by_subject"],
            event: |r, _| json!({"k": r.key(5)}),
            order_independent: true,
            path: "unnest",
        },
        Case {
            name: "select_of_a_function",
            ddl: "CREATE TABLE tallies (k text PRIMARY KEY, n bigint NOT NULL);
CREATE FUNCTION tally(key text, add int) RETURNS bigint LANGUAGE sql AS $$
  INSERT INTO tallies VALUES (key, add)
  ON CONFLICT (k) DO UPDATE SET n = tallies.n + EXCLUDED.n RETURNING n
$$;",
            template: "SELECT tally({{ event.k }}, {{ event.n }})",
            tables: &["tallies"],
            event: |r, _| json!({"k": r.key(8), "n": r.below(20)}),
            order_independent: true,
            path: "per-row",
        },
        Case {
            name: "statement_level_trigger",
            ddl: "CREATE TABLE seen (id text PRIMARY KEY);
CREATE TABLE statements (n int NOT NULL);
INSERT INTO statements VALUES (0);
CREATE FUNCTION count_statement() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN UPDATE statements SET n = n + 1; RETURN NULL; END $$;
CREATE TRIGGER seen_statements AFTER INSERT ON seen
  FOR EACH STATEMENT EXECUTE FUNCTION count_statement();",
            template: "INSERT INTO seen (id) VALUES ({{ event.id }}) ON CONFLICT (id) DO NOTHING",
            tables: &["seen", "statements"],
            event: |r, _| json!({"id": r.key(50)}),
            order_independent: true,
            path: "per-row",
        },
        Case {
            name: "do_nothing_with_a_second_unique_key",
            ddl: "CREATE TABLE accounts (id text PRIMARY KEY, email text NOT NULL UNIQUE, plan text NOT NULL);",
            template: "INSERT INTO accounts (id, email, plan) VALUES ({{ event.id }}, {{ event.email }}, {{ event.plan }})
ON CONFLICT (id) DO NOTHING",
            tables: &["accounts"],
            event: |r, _| {
                let id = r.key(60);
                // Mostly the account's own address; sometimes another
                // account's, which the arbiter does not cover: refused.
                let email = if r.chance(10) { r.key(60) } else { id.clone() };
                json!({"id": id, "email": format!("{email}@example.invalid"),
                       "plan": r.pick(&["free", "pro"])})
            },
            order_independent: false,
            path: "unnest, plain insert first",
        },
        Case {
            name: "do_nothing_on_an_exclusion_constraint",
            ddl: "CREATE TABLE bookings (during int4range NOT NULL, who text NOT NULL,
  EXCLUDE USING gist (during WITH &&));",
            template: "INSERT INTO bookings (during, who)
VALUES (int4range({{ event.from }}, {{ event.to }}), {{ event.who }}) ON CONFLICT DO NOTHING",
            tables: &["bookings"],
            event: |r, _| {
                let from = r.below(2000);
                json!({"from": from, "to": from + 1 + r.below(6), "who": r.pick(&["ann", "bob"])})
            },
            order_independent: false,
            path: "unnest, plain insert first",
        },
        Case {
            name: "do_nothing_returning_with_a_row_trigger",
            ddl: "CREATE TABLE tagged (k text PRIMARY KEY, v text NOT NULL, tag text NOT NULL);
CREATE FUNCTION tag_row() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN NEW.tag := upper(NEW.v) || '-' || length(NEW.k); RETURN NEW; END $$;
CREATE TRIGGER tagged_tag BEFORE INSERT ON tagged FOR EACH ROW EXECUTE FUNCTION tag_row();",
            template: "INSERT INTO tagged (k, v, tag) VALUES ({{ event.k }}, {{ event.v }}, '')
ON CONFLICT (k) DO NOTHING RETURNING k, tag",
            tables: &["tagged"],
            event: |r, _| json!({"k": r.key(40), "v": r.pick(&["x", "y", "zz"])}),
            order_independent: false,
            path: "unnest, plain insert first",
        },
        Case {
            // One multi-row INSERT fires AFTER ROW triggers once every row
            // is in: each audit row would see the batch's final balance.
            name: "after_row_trigger_reads_the_table",
            ddl: "CREATE TABLE ledger (id text PRIMARY KEY, acct text NOT NULL, amount int NOT NULL);
CREATE TABLE audit (id text PRIMARY KEY, balance bigint NOT NULL);
CREATE FUNCTION audit_balance() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO audit VALUES (NEW.id, (SELECT sum(amount) FROM ledger WHERE acct = NEW.acct));
  RETURN NULL;
END $$;
CREATE TRIGGER ledger_audit AFTER INSERT ON ledger FOR EACH ROW EXECUTE FUNCTION audit_balance();",
            template: "INSERT INTO ledger (id, acct, amount) VALUES ({{ event.id }}, {{ event.acct }}, {{ event.amount }})
ON CONFLICT (id) DO NOTHING",
            tables: &["ledger", "audit"],
            event: |r, i| {
                let id = if i > 5 && r.chance(5) { r.below(i as u64) as usize } else { i };
                json!({"id": format!("l{id}"), "acct": r.key(5), "amount": r.below(100)})
            },
            order_independent: false,
            path: "per-row",
        },
        Case {
            // A foreign key to the same table is checked after the whole
            // statement: a parent one or two events later would count.
            name: "self_referencing_foreign_key",
            ddl: "CREATE TABLE nodes (id text PRIMARY KEY, parent text REFERENCES nodes (id));",
            template: "INSERT INTO nodes (id, parent) VALUES ({{ event.id }}, {{ event.parent }})
ON CONFLICT (id) DO NOTHING",
            tables: &["nodes"],
            event: |r, i| {
                let parent = match r.below(10) {
                    0 => Value::Null,
                    1 | 2 => json!(format!("n{}", i as u64 + 1 + r.below(2))),
                    _ => json!(format!("n{}", (i as u64).saturating_sub(r.below(4)))),
                };
                json!({"id": format!("n{i}"), "parent": parent})
            },
            order_independent: false,
            path: "per-row",
        },
        Case {
            // A bound value is read before the statement runs: a value its
            // type refuses fails the event even where no row matches. In
            // the per-row function a cached generic plan (after five
            // executions on a connection) cast it only for a matched row.
            name: "bad_value_where_no_row_matches",
            ddl: "CREATE TABLE stock (k text PRIMARY KEY, n bigint NOT NULL);
INSERT INTO stock SELECT 'k' || i, 0 FROM generate_series(0, 14) i;",
            template: "UPDATE stock SET n = n + {{ event.n }} WHERE k = {{ event.k }}",
            tables: &["stock"],
            event: |r, _| {
                let n = if r.chance(15) { json!("many") } else { json!(r.below(50)) };
                json!({"k": r.key(30), "n": n})
            },
            order_independent: true,
            path: "per-row",
        },
        Case {
            // One statement for the batch casts a value inside COALESCE
            // only where COALESCE reads it.
            name: "coalesce_of_values",
            ddl: "CREATE TABLE picks (id text PRIMARY KEY, v int);",
            template: "INSERT INTO picks (id, v) VALUES ({{ event.id }}, COALESCE({{ event.a }}::int, {{ event.b }}::int))",
            tables: &["picks"],
            event: |r, i| {
                let a = if r.chance(50) { Value::Null } else { json!(r.below(9)) };
                let b = if r.chance(15) { json!("none") } else { json!(r.below(9)) };
                json!({"id": format!("p{i}"), "a": a, "b": b})
            },
            order_independent: true,
            path: "per-row",
        },
        Case {
            // DML returning several rows: PL/pgSQL's `INTO` refused them.
            name: "delete_returning_several_rows",
            ddl: "CREATE TABLE sessions (sid int PRIMARY KEY, user_id text NOT NULL);
INSERT INTO sessions SELECT i, 'u' || (i % 10) FROM generate_series(0, 999) i;",
            template: "DELETE FROM sessions WHERE user_id = {{ event.user }} AND sid < {{ event.before }}
RETURNING sid, user_id",
            tables: &["sessions"],
            event: |r, i| json!({"user": format!("u{}", r.below(10)), "before": 3 * i as u64 + r.below(40)}),
            order_independent: false,
            path: "per-row",
        },
        Case {
            // A deferrable unique constraint is checked after the whole
            // statement, even INITIALLY IMMEDIATE.
            name: "deferrable_unique_constraint",
            ddl: "CREATE TABLE slots (k text NOT NULL, v int NOT NULL,
  CONSTRAINT slots_k UNIQUE (k) DEFERRABLE INITIALLY IMMEDIATE);",
            template: "INSERT INTO slots (k, v) VALUES ({{ event.k }}, {{ event.v }})",
            tables: &["slots"],
            event: |r, _| json!({"k": r.key(200), "v": r.below(9)}),
            order_independent: false,
            path: "per-row",
        },
        Case {
            name: "default_in_values",
            ddl: "CREATE TABLE withdef (k text PRIMARY KEY, v int NOT NULL DEFAULT 42, note text);",
            template: "INSERT INTO withdef (k, v, note) VALUES ({{ event.k }}, DEFAULT, {{ event.note }})
ON CONFLICT (k) DO UPDATE SET note = EXCLUDED.note",
            tables: &["withdef"],
            event: |r, _| json!({"k": r.key(10), "note": r.pick(&["n1", "n2", "n3"])}),
            order_independent: false,
            path: "per-row",
        },
    ]
}

/// An event for the table of every type: mostly values each type takes
/// (some that its modifier pads, rounds or folds), a few it must refuse.
fn typed_event(r: &mut Rng, i: usize) -> Value {
    let id = if i > 10 && r.chance(8) {
        // A duplicate id: DO NOTHING keeps the first.
        format!("t{}", r.below(i as u64))
    } else {
        format!("t{i}")
    };
    let bad = |r: &mut Rng, good: Value, bad: Value| if r.chance(3) { bad } else { good };
    let vc = json!(r.pick(&["abc", "abcde", "é"]));
    let num = json!(r.pick(&["1.005", "12.344", "9999.99"]));
    let b = json!(r.pick(&["101", "010"]));
    let m = json!(r.pick(&["happy", "sad"]));
    let p = json!(r.below(100) + 1);
    json!({
        "id": id,
        "c": r.pick(&["US", "D", "AB"]),
        "vc": bad(r, vc, json!("abcdef")),
        "num": bad(r, num, json!(10000)),
        "b": bad(r, b, json!("1")),
        "ints": if r.chance(20) { json!([]) } else { json!([r.below(10), 2, null]) },
        "texts": json!(["a,b", "q\"uote", null, "back\\slash"]),
        "m": bad(r, m, json!("angry")),
        "p": bad(r, p, json!(-1)),
        "j": {"a": r.below(5), "nested": [1, "x"]},
        "jb": {"b": [1, 2, {"c": null}]},
        "ts": "2026-01-02 03:04:05.678",
        "tstz": r.pick(&["2026-01-02T03:04:05+02:00", "2026-06-30T23:59:59.999999Z"]),
        "d": r.pick(&["2026-02-28", "2024-02-29"]),
        "u": r.pick(&["0e7b3a34-3f5e-4c8a-9e8d-0b1f2c3d4e5f", "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11"]),
        "big": 9_007_199_254_740_993_i64 + r.below(5) as i64,
        "bin": r.pick(&["\\x0102ff", "plain"]),
        "flag": r.chance(50),
        "dbl": r.pick(&["0.1", "1e-7", "-0"]),
        "moods": ["happy", "sad"],
    })
}

/// The statement a template renders for one event: text with `$n`, and
/// the values. The same rules as the engine's templates: every `{{ }}`
/// becomes a placeholder; a missing field is null.
pub fn render(template: &str, event: &Value, msg: &Value) -> (String, Vec<Value>) {
    let values = Arc::new(Mutex::new(Vec::new()));
    let mut env = minijinja::Environment::new();
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Chainable);
    let sink = values.clone();
    env.set_formatter(move |out, _state, value| {
        let json = if value.is_undefined() || value.is_none() {
            Value::Null
        } else {
            serde_json::to_value(value).unwrap_or(Value::Null)
        };
        let mut values = sink.lock().unwrap();
        values.push(json);
        write!(out, "${}", values.len())
            .map_err(|_| minijinja::Error::new(minijinja::ErrorKind::WriteFailure, "write failed"))
    });
    let sql = env
        .render_str(
            template,
            minijinja::context! {
                event => minijinja::Value::from(minijinja::value::Serde(event)),
                msg => minijinja::Value::from(minijinja::value::Serde(msg)),
                subject => minijinja::Value::from(minijinja::value::Serde(&msg["subject"])),
            },
        )
        .unwrap_or_else(|e| panic!("render {template}: {e}"));
    let values = values.lock().unwrap().clone();
    (sql, values)
}

/// A value as a SQL literal of unknown type, as a client sends a text
/// parameter: strings as they are, arrays as array literals, everything
/// else as its JSON text.
fn literal(v: &Value) -> String {
    let text = match v {
        Value::Null => return "NULL".into(),
        Value::String(s) => s.clone(),
        Value::Array(items) => array_literal(items),
        other => other.to_string(),
    };
    format!("'{}'", text.replace('\'', "''"))
}

fn array_literal(items: &[Value]) -> String {
    let parts: Vec<String> = items
        .iter()
        .map(|v| match v {
            Value::Null => "NULL".into(),
            Value::Array(inner) => array_literal(inner),
            Value::String(s) => format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\"")),
            other => format!(
                "\"{}\"",
                other.to_string().replace('\\', "\\\\").replace('"', "\\\"")
            ),
        })
        .collect();
    format!("{{{}}}", parts.join(","))
}

/// A rendered statement with its values written in as the reference
/// binds them (quoted literals of unknown type), for psql.
pub fn inline(sql: &str, values: &[Value]) -> String {
    (1..=values.len()).rev().fold(sql.to_string(), |text, n| {
        text.replace(&format!("${n}"), &literal(&values[n - 1]))
    })
}

/// Runs the rendered statements one by one in `schema`, in order, in one
/// transaction, each in a savepoint; returns which failed.
pub async fn reference_outcomes(
    conn: &mut PgConnection,
    schema: &str,
    statements: &[(String, Vec<Value>)],
) -> Vec<bool> {
    sqlx::raw_sql(&format!(
        "SET search_path = {schema}; SET plan_cache_mode = force_custom_plan; BEGIN"
    ))
    .execute(&mut *conn)
    .await
    .expect("begin the reference");
    let mut prepared: BTreeMap<&str, usize> = BTreeMap::new();
    let mut failed = Vec::with_capacity(statements.len());
    for (sql, values) in statements {
        let next = prepared.len();
        let n = *prepared.entry(sql.as_str()).or_insert(next);
        if n == next {
            sqlx::raw_sql(&format!("PREPARE ref_{n} AS {sql}"))
                .execute(&mut *conn)
                .await
                .unwrap_or_else(|e| panic!("PREPARE {sql}: {e}"));
        }
        let args: Vec<String> = values.iter().map(literal).collect();
        let args = if args.is_empty() {
            String::new()
        } else {
            format!("({})", args.join(", "))
        };
        let run = format!("SAVEPOINT ev; EXECUTE ref_{n}{args}; RELEASE SAVEPOINT ev");
        let rejected = sqlx::raw_sql(&run).execute(&mut *conn).await.is_err();
        failed.push(rejected);
        if rejected {
            sqlx::raw_sql("ROLLBACK TO SAVEPOINT ev")
                .execute(&mut *conn)
                .await
                .expect("roll back a failed reference statement");
        }
    }
    sqlx::raw_sql("COMMIT; DEALLOCATE ALL; RESET search_path; RESET plan_cache_mode")
        .execute(&mut *conn)
        .await
        .expect("commit the reference");
    failed
}

/// How many of the rendered statements fail when run as
/// [`reference_outcomes`] runs them.
pub async fn run_reference(
    conn: &mut PgConnection,
    schema: &str,
    statements: &[(String, Vec<Value>)],
) -> usize {
    let outcomes = reference_outcomes(conn, schema, statements).await;
    outcomes.into_iter().filter(|&rejected| rejected).count()
}

/// A sink on a pool of `size` connections of its own (a registry of the
/// test's), with the default limits.
pub async fn test_sink(url: &str, size: u32) -> PgSink {
    use ingestd::sink::postgres::{Limits, PoolChoice, Pools};
    let pools = Pools::new(size).expect("pools");
    PgSink::connect(&pools, url, PoolChoice::Shared, Limits::default())
        .await
        .expect("connect the sink")
}

/// Writes the rendered statements through the engine's sink, in batches
/// of `batch` rows, each committed; returns which were rejected. The sink
/// is the one a pipeline uses: its plans, paths and isolation. A batch
/// that fails as a whole ends it with that error.
pub async fn sink_outcomes(
    sink: &PgSink,
    statements: &[(String, Vec<Value>)],
    batch: usize,
) -> Result<Vec<bool>, WriteError> {
    sink_outcomes_in_flight(sink, statements, batch, 1).await
}

/// As [`sink_outcomes`], with `in_flight` batches written at once (with
/// the sink's ledger, if it keeps one: row i claims sequence i + 1) (batch
/// `j` by writer `j % in_flight`, each writer's in order), as a pipeline's
/// `max_in_flight` does; a batch that meets a transient error (two
/// batches deadlocking) is written again, as the pipeline retries it.
pub async fn sink_outcomes_in_flight(
    sink: &PgSink,
    statements: &[(String, Vec<Value>)],
    batch: usize,
    in_flight: usize,
) -> Result<Vec<bool>, WriteError> {
    let mut texts: BTreeMap<&str, Arc<str>> = BTreeMap::new();
    let mut rows: Vec<SinkRow> = statements
        .iter()
        .enumerate()
        .map(|(i, (sql, values))| {
            let sql = texts.entry(sql).or_insert_with(|| Arc::from(sql.as_str()));
            SinkRow {
                rendered: Rendered::new(sql.clone(), values.clone()),
                outcome: Outcome::Pending,
                // A sink with a ledger claims each row's position.
                seq: sink.ledger().map(|_| i as u64 + 1),
            }
        })
        .collect();
    let mut writers: Vec<Vec<&mut [SinkRow]>> = (0..in_flight).map(|_| Vec::new()).collect();
    for (j, chunk) in rows.chunks_mut(batch.max(1)).enumerate() {
        writers[j % in_flight].push(chunk);
    }
    let written = writers.into_iter().map(|chunks| async move {
        for chunk in chunks {
            let mut refs: Vec<&mut SinkRow> = chunk.iter_mut().collect();
            let mut tries = 0;
            loop {
                match sink.write(&mut refs, Finish::Commit).await {
                    Err(WriteError::Transient(_)) if tries < 10 => tries += 1,
                    other => break other?,
                }
            }
        }
        Ok::<(), WriteError>(())
    });
    for result in futures::future::join_all(written).await {
        result?;
    }
    Ok(rows
        .iter()
        .map(|r| match &r.outcome {
            Outcome::Stored => false,
            Outcome::Rejected(_) => true,
            o @ (Outcome::Pending | Outcome::Duplicate) => {
                panic!("a row ended {o:?}: {:?}", r.rendered)
            }
        })
        .collect())
}

/// The contents of `table` in `schema`, as sorted JSON rows.
pub async fn table_contents(conn: &mut PgConnection, schema: &str, table: &str) -> Value {
    table_contents_without(conn, schema, table, &[]).await
}

/// The contents of `table` in `schema` without the columns `left_out`, as
/// sorted JSON rows.
pub async fn table_contents_without(
    conn: &mut PgConnection,
    schema: &str,
    table: &str,
    left_out: &[&str],
) -> Value {
    let minus: String = left_out.iter().map(|c| format!(" - '{c}'")).collect();
    let sql = format!(
        "SELECT coalesce(jsonb_agg(x ORDER BY x::text), '[]')::text FROM \
         (SELECT to_jsonb(t){minus} AS x FROM {schema}.{table} t) s"
    );
    let text: String = sqlx::query(&sql)
        .fetch_one(&mut *conn)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0);
    serde_json::from_str(&text).expect("rows as JSON")
}

/// Creates `schema` with the case's tables, types and functions.
pub async fn create_schema(conn: &mut PgConnection, schema: &str, ddl: &str) {
    let sql =
        format!("CREATE SCHEMA {schema}; SET search_path = {schema}; {ddl}; RESET search_path");
    sqlx::raw_sql(&sql)
        .execute(&mut *conn)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// A pipeline file named `name` that reads `<prefix><filter>`, writes
/// with `template` into the database's `schema`, with `in_flight`
/// batches; `on_error` is the YAML of its `on_error` section, if any.
pub fn pipeline_yaml(
    env: &TestEnv,
    name: &str,
    filter: &str,
    template: &str,
    in_flight: usize,
    on_error: &str,
) -> String {
    let template: String = template.lines().map(|l| format!("      {l}\n")).collect();
    let on_error: String = match on_error {
        "" => " {}\n".into(),
        text => text.lines().map(|l| format!("\n  {l}")).collect::<String>() + "\n",
    };
    format!(
        r#"name: {name}
{source}sink:
  postgres:
    url: {url}?schema={name}
    pool_size: 2
    insert: |
{template}    batch:
      max_rows: 64
      max_wait: 5ms
      max_in_flight: {in_flight}
on_error:{on_error}metrics:
  prefix: {name}
"#,
        source = nats_source(
            &env.stream,
            &env.subject_prefix,
            &format!("{name}-{}", env.id),
            filter,
            "30s"
        ),
        url = env.database_url(),
    )
}

/// Makes `sink` keep an exactly-once ledger (in `schema`, where its
/// `search_path` points), as a pipeline with `exactly_once` does.
pub async fn keep_ledger(sink: &mut PgSink, schema: &str) {
    sink.keep_ledger(ingestd::sink::postgres::LedgerKey {
        stream: "generated".into(),
        durable: schema.into(),
    });
    sink.ensure_ledger().await.expect("create the ledger");
}

/// What the ledger in `schema` holds that the outcomes do not say: the
/// stored rows (`rejected[i]` false) claimed sequence i + 1 and kept it,
/// the rejected ones gave theirs up in their transaction.
pub async fn ledger_mismatch(
    conn: &mut PgConnection,
    schema: &str,
    rejected: &[bool],
) -> Option<String> {
    let sql =
        format!("SELECT seq FROM {schema}.ingestd_ledger WHERE outcome = 'stored' ORDER BY seq");
    let claimed: Vec<i64> = sqlx::query_scalar(&sql)
        .fetch_all(&mut *conn)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    let stored: Vec<i64> = (1..)
        .zip(rejected)
        .filter(|(_, r)| !**r)
        .map(|(seq, _)| seq)
        .collect();
    (claimed != stored).then(|| format!("ledger: claimed {claimed:?}, stored {stored:?}"))
}
