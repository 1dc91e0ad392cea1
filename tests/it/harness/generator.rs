//! The statement generator: a table shape, a statement, events and the
//! database's settings drawn from one seed, for the differential property
//! of `statements::generated_statements_match_the_single_row_reference`.
//!
//! Shapes: columns of types with modifiers, a primary key, partial,
//! expression and unique partial indexes, a CHECK, foreign keys (to a
//! parent table, to the table itself), generated and identity columns,
//! BEFORE and AFTER row triggers that read the table, hash partitions.
//! Statements: the shapes the README lists (insert, upsert `DO NOTHING` and
//! `DO UPDATE`, `UPDATE … FROM`, `DELETE … RETURNING`, a CTE, conditional
//! templates). Events: few keys (so they repeat, in two cases), values the
//! column's type refuses, nulls, non-ASCII text.

use serde_json::{json, Value};

use super::statements::Rng;

/// One drawn case.
pub struct Draw {
    pub seed: u64,
    /// Tables, functions and triggers, created in the draw's schema.
    pub ddl: String,
    pub template: String,
    /// The tables compared, each with the columns left out of the
    /// comparison (an identity's values depend on how often a batch was
    /// tried, as any sequence's do).
    pub tables: Vec<(&'static str, Vec<&'static str>)>,
    pub events: Vec<Value>,
    /// `TimeZone` and `DateStyle` of the database.
    pub settings: (&'static str, &'static str),
    /// No event's outcome depends on the order of the others (inserts of
    /// distinct keys into a table nothing reads), so batches may commit
    /// in any order.
    pub order_independent: bool,
}

/// A column type: its SQL, values it takes and values it refuses.
struct Type {
    sql: &'static str,
    good: fn(&mut Rng) -> Value,
    bad: fn(&mut Rng) -> Value,
}

const TYPES: &[Type] = &[
    Type {
        sql: "text",
        good: |r| json!(r.pick(&["plain", "é à ü", "日本語", "🦀 crab", "a'b\"c", ""])),
        bad: |r| json!(r.pick(&["still text"])),
    },
    Type {
        sql: "varchar(4)",
        good: |r| json!(r.pick(&["abc", "日本語", "abcd", "ab  "])),
        bad: |r| json!(r.pick(&["abcdef", "日本語です"])),
    },
    Type {
        sql: "char(3)",
        good: |r| json!(r.pick(&["ab", "xyz", "é"])),
        bad: |_| json!("abcd"),
    },
    Type {
        sql: "numeric(5,2)",
        good: |r| json!(r.pick(&["1.005", "12.344", "-3", "999.99"])),
        bad: |r| json!(r.pick(&["10000", "ten"])),
    },
    Type {
        sql: "int",
        good: |r| json!(r.below(1000) as i64 - 500),
        bad: |r| json!(r.pick(&["x", "3000000000", "1.5"])),
    },
    Type {
        sql: "date",
        good: |r| json!(r.pick(&["2025-03-04", "01/02/2025", "2024-02-29"])),
        bad: |r| json!(r.pick(&["2025-13-40", "someday"])),
    },
    Type {
        sql: "timestamptz",
        good: |r| {
            json!(r.pick(&[
                "2025-07-01 18:00",
                "2025-07-01T18:00:00Z",
                "02/03/2025 04:05:06"
            ]))
        },
        bad: |_| json!("soon"),
    },
    Type {
        sql: "interval",
        good: |r| json!(r.pick(&["1 day", "-1 2:03:04", "P1DT2H"])),
        bad: |_| json!("forever"),
    },
    Type {
        sql: "jsonb",
        good: |r| {
            let n = r.below(5);
            json!({"n": n, "s": "é", "a": [1, null]})
        },
        bad: |_| Value::Null,
    },
    Type {
        sql: "int[]",
        good: |r| {
            if r.chance(20) {
                json!([])
            } else {
                json!([r.below(9), null, 3])
            }
        },
        bad: |_| json!(["x"]),
    },
    Type {
        sql: "boolean",
        good: |r| json!(r.pick(&["yes", "f", "true"])),
        bad: |_| json!("maybe"),
    },
];

/// What the table has, as drawn.
struct Shape {
    /// The type of each value column `c1`, `c2`, …
    columns: Vec<&'static Type>,
    check: bool,
    identity: bool,
    generated: bool,
    partitioned: bool,
    before_trigger: bool,
    after_trigger: bool,
    self_reference: bool,
    parent_reference: bool,
}

impl Shape {
    fn draw(r: &mut Rng) -> Self {
        let columns = (0..1 + r.below(3))
            .map(|_| &TYPES[r.below(TYPES.len() as u64) as usize])
            .collect();
        let partitioned = r.chance(20);
        Self {
            columns,
            check: r.chance(50),
            identity: !partitioned && r.chance(30),
            generated: r.chance(30),
            partitioned,
            before_trigger: r.chance(30),
            after_trigger: r.chance(30),
            self_reference: r.chance(20),
            parent_reference: r.chance(20),
        }
    }

    fn ddl(&self, r: &mut Rng) -> String {
        let mut cols = vec!["k text NOT NULL".to_string()];
        if self.identity {
            cols.push("id bigint GENERATED ALWAYS AS IDENTITY".into());
        }
        let check = if self.check { " CHECK (n >= 0)" } else { "" };
        cols.push(format!("n int NOT NULL DEFAULT 0{check}"));
        for (i, t) in self.columns.iter().enumerate() {
            cols.push(format!("c{} {}", i + 1, t.sql));
        }
        if self.generated {
            cols.push("g text GENERATED ALWAYS AS (k || ':' || n) STORED".into());
        }
        if self.before_trigger {
            cols.push("seen bigint".into());
        }
        if self.self_reference {
            cols.push("up text REFERENCES t (k)".into());
        }
        if self.parent_reference {
            cols.push("owner text REFERENCES parents (k)".into());
        }
        cols.push("PRIMARY KEY (k)".into());
        let mut ddl = String::from(
            "CREATE TABLE parents (k text PRIMARY KEY);
INSERT INTO parents SELECT 'k' || i FROM generate_series(0, 5) i;
CREATE TABLE audit (k text NOT NULL, rows bigint NOT NULL, n int NOT NULL);\n",
        );
        let partition = if self.partitioned {
            " PARTITION BY HASH (k)"
        } else {
            ""
        };
        ddl += &format!("CREATE TABLE t ({}){partition};\n", cols.join(", "));
        if self.partitioned {
            for i in 0..2 {
                ddl += &format!(
                    "CREATE TABLE t_{i} PARTITION OF t FOR VALUES WITH (MODULUS 2, REMAINDER {i});\n"
                );
            }
        }
        if r.chance(30) {
            ddl += "CREATE INDEX t_c1 ON t (c1) WHERE c1 IS NOT NULL;\n";
        }
        if r.chance(30) {
            ddl += "CREATE INDEX t_lower ON t (lower(k));\n";
        }
        if !self.partitioned && r.chance(25) {
            ddl += "CREATE UNIQUE INDEX t_folded ON t (lower(k)) WHERE n > 5;\n";
        }
        if self.before_trigger {
            ddl += "CREATE FUNCTION t_seen() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN NEW.seen := (SELECT count(*) FROM t); RETURN NEW; END $$;
CREATE TRIGGER t_seen BEFORE INSERT OR UPDATE ON t FOR EACH ROW EXECUTE FUNCTION t_seen();\n";
        }
        if self.after_trigger {
            ddl += "CREATE FUNCTION t_audit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO audit VALUES (NEW.k, (SELECT count(*) FROM t), (SELECT sum(n) FROM t));
  RETURN NULL;
END $$;
CREATE TRIGGER t_audit AFTER INSERT OR UPDATE ON t FOR EACH ROW EXECUTE FUNCTION t_audit();\n";
        }
        ddl
    }

    /// The value columns an insert writes, and their `{{ }}`.
    fn insert_columns(&self) -> (Vec<String>, Vec<String>) {
        let mut names = vec!["k".to_string(), "n".to_string()];
        names.extend((1..=self.columns.len()).map(|i| format!("c{i}")));
        if self.self_reference {
            names.push("up".into());
        }
        if self.parent_reference {
            names.push("owner".into());
        }
        let values = names
            .iter()
            .map(|n| format!("{{{{ event.{n} }}}}"))
            .collect();
        (names, values)
    }

    fn insert(&self, tail: &str) -> String {
        let (names, values) = self.insert_columns();
        format!(
            "INSERT INTO t ({}) VALUES ({}){tail}",
            names.join(", "),
            values.join(", ")
        )
    }

    fn upsert(&self, r: &mut Rng) -> String {
        let returning = if r.chance(30) { " RETURNING k, n" } else { "" };
        self.insert(&format!(
            " ON CONFLICT (k) DO UPDATE SET c1 = EXCLUDED.c1, n = t.n + EXCLUDED.n{returning}"
        ))
    }

    /// True when the table lets no row's outcome depend on the rows
    /// before it, for inserts of distinct keys: nothing reads the table
    /// or ties keys together.
    fn order_independent(&self, ddl: &str) -> bool {
        !(self.before_trigger
            || self.after_trigger
            || self.self_reference
            || ddl.contains("t_folded"))
    }

    /// The template, and whether it only inserts (a plain insert or
    /// `DO NOTHING`).
    fn statement(&self, r: &mut Rng) -> (String, bool) {
        let do_nothing = || self.insert(" ON CONFLICT (k) DO NOTHING");
        let kind = r.below(7);
        let template = match kind {
            0 => self.insert(""),
            1 => do_nothing(),
            2 => self.upsert(r),
            3 => format!(
                "{{% if event.op == 'change' %}}UPDATE t SET n = t.n + {{{{ event.n }}}}, c1 = {{{{ event.c1 }}}}
FROM parents p WHERE p.k = lower(t.k) AND t.k = {{{{ event.k }}}}{{% else %}}{}{{% endif %}}",
                do_nothing()
            ),
            4 => format!(
                "{{% if event.op == 'drop' %}}DELETE FROM t WHERE k = {{{{ event.k }}}} OR n > {{{{ event.n }}}} + 15 RETURNING *{{% else %}}{}{{% endif %}}",
                self.upsert(r)
            ),
            5 => {
                let (names, values) = self.insert_columns();
                format!(
                    "WITH old AS (DELETE FROM t WHERE k = {{{{ event.k }}}} RETURNING n)
INSERT INTO t ({}) SELECT {}, coalesce((SELECT sum(n) FROM old), 0) + {{{{ event.n }}}}{}",
                    names.join(", "),
                    values[0],
                    values[2..]
                        .iter()
                        .map(|v| format!(", {v}"))
                        .collect::<String>()
                )
            }
            _ => format!(
                "{{% if event.op == 'drop' %}}DELETE FROM t WHERE k = {{{{ event.k }}}}{{% else %}}{}{{% endif %}}",
                self.insert("")
            ),
        };
        (template, kind < 2)
    }

    /// Event `i`; its key is one of `keys` (so keys repeat), or its own
    /// where `distinct`.
    fn event(&self, r: &mut Rng, i: usize, keys: Option<u64>, bad: u64) -> Value {
        let k = match keys {
            Some(keys) => format!("{}{}", if r.chance(15) { "K" } else { "k" }, r.below(keys)),
            None => format!("k{i}"),
        };
        let keys = keys.unwrap_or(6);
        let n = if r.chance(bad) {
            json!(r.pick(&["-1", "lots"]))
        } else {
            json!(r.below(20))
        };
        let mut event = json!({
            "k": k,
            "n": n,
            "op": r.pick(&["change", "drop", "add", "add"]),
        });
        for (i, t) in self.columns.iter().enumerate() {
            let v = match r.below(100) {
                x if x < 10 => Value::Null,
                x if x < 10 + bad => (t.bad)(r),
                _ => (t.good)(r),
            };
            event[format!("c{}", i + 1)] = v;
        }
        let reference = |r: &mut Rng| {
            if r.chance(30) {
                Value::Null
            } else {
                json!(format!("k{}", r.below(keys + 2)))
            }
        };
        event["up"] = reference(r);
        event["owner"] = reference(r);
        event
    }
}

impl Draw {
    pub fn new(seed: u64) -> Self {
        let mut r = Rng::new(seed);
        let shape = Shape::draw(&mut r);
        let ddl = shape.ddl(&mut r);
        let (template, inserts_only) = shape.statement(&mut r);
        let order_independent = inserts_only && shape.order_independent(&ddl);
        let keys = (!order_independent).then(|| 3 + r.below(12));
        let bad = r.below(12);
        let events = (0..20 + r.below(40) as usize)
            .map(|i| shape.event(&mut r, i, keys, bad))
            .collect();
        let identity = if shape.identity { vec!["id"] } else { vec![] };
        let settings = (
            r.pick(&["UTC", "America/Sao_Paulo", "Asia/Kolkata"]),
            r.pick(&["ISO, MDY", "ISO, DMY", "SQL, DMY"]),
        );
        Self {
            seed,
            ddl,
            template,
            tables: vec![("t", identity), ("audit", vec![])],
            events,
            settings,
            order_independent,
        }
    }
}
