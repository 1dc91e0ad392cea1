//! Any statement a user writes is stored right: differential tests of the
//! sink against its reference (see `harness/statements.rs`), and the
//! pipeline's reaction to errors that are not the events' fault.

use std::time::Duration;

use crate::harness::statements::*;
use crate::harness::*;
use ingestd::sink::postgres::sqlstate::{self, Fault, SqlState};
use serde_json::{json, Value};

/// Events per pipeline of the corpus.
const EVENTS: usize = 300;

/// Deadline for the whole corpus to drain: 17+ pipelines on two cores.
const DRAIN: Duration = Duration::from_secs(120);

/// Publishes every case's events (case `i` on `diff.<i>.e`), before any
/// engine runs, and returns each case's statements as the reference
/// renders them, in stream order.
async fn publish_corpus(env: &TestEnv, cases: &[Case]) -> Vec<Vec<(String, Vec<Value>)>> {
    env.create_stream().await;
    let mut statements = Vec::new();
    for (index, case) in cases.iter().enumerate() {
        let mut rng = Rng::new(0x5eed + index as u64);
        let subject = env.subject(&format!("diff.{index}.e"));
        let mut rendered = Vec::with_capacity(EVENTS);
        for i in 0..EVENTS {
            let event = (case.event)(&mut rng, i);
            let ack = env
                .js
                .publish(subject.clone(), event.to_string().into())
                .await
                .expect("publish")
                .await
                .expect("publish ack");
            let msg = json!({"subject": subject, "stream": env.stream, "seq": ack.sequence, "delivered": 1});
            rendered.push(render(case.template, &event, &msg));
        }
        statements.push(rendered);
    }
    statements
}

/// Waits until the consumer of `schema` has acknowledged everything; fails
/// at once if the pipeline reports it is failing. A retrying pipeline may
/// still drain (two batches in flight can deadlock each other, and the
/// loser retries), so only the deadline judges it.
async fn wait_drained(env: &TestEnv, engine: &Engine, schema: &str) {
    let durable = format!("{schema}-{}", env.id);
    wait_for(&format!("{schema} to drain"), DRAIN, || async {
        let s = status(engine, schema).await;
        assert_ne!(s["state"], "failing", "{schema} fails: {s}");
        let info = consumer_info(&env.js, &env.stream, &durable).await?;
        expect_eq((info.num_pending, info.num_ack_pending), (0, 0))
            .map_err(|e| format!("(pending, ack pending) {e}"))
    })
    .await;
}

/// The `/pipelines` entry of a pipeline.
async fn status(engine: &Engine, name: &str) -> Value {
    let all = engine.get("/pipelines").await.json();
    all["pipelines"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == name).cloned())
        .unwrap_or_else(|| panic!("no pipeline {name} in {all}"))
}

/// For every template of the corpus, the tables the engine fills from a
/// backlog of generated events (several batches, repeated keys, some rows
/// the database refuses) equal what the single-row statements give when
/// run one by one in stream order, with one batch in flight; templates
/// whose result does not depend on order are also run with two batches in
/// flight. The events the reference cannot store are exactly the ones the
/// engine counts as failed, and nothing is left unacknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_equal_the_single_row_statements_in_stream_order() {
    let env = TestEnv::new().await;
    std::fs::remove_file(env.pipelines_dir().join("tiktok.yaml")).expect("remove tiktok.yaml");
    let cases = corpus();
    let statements = publish_corpus(&env, &cases).await;
    let mut conn = env.db.acquire().await.expect("a connection");
    let mut runs = Vec::new();
    for (index, case) in cases.iter().enumerate() {
        let mut variants = vec![(format!("eng_{index}"), 1)];
        if case.order_independent {
            variants.push((format!("par_{index}"), 2));
        }
        for (schema, in_flight) in variants {
            create_schema(&mut conn, &schema, case.ddl).await;
            let filter = format!("diff.{index}.>");
            let yaml = pipeline_yaml(&env, &schema, &filter, case.template, in_flight, "");
            env.write_pipeline(&format!("{schema}.yaml"), &yaml);
            runs.push((index, schema));
        }
        let reference = format!("ref_{index}");
        create_schema(&mut conn, &reference, case.ddl).await;
    }
    let engine = env.engine().spawn();
    engine.wait_ready().await;
    let mut failures = Vec::new();
    for (index, schema) in &runs {
        let case = &cases[*index];
        wait_drained(&env, &engine, schema).await;
        let reference = format!("ref_{index}");
        // Each case's reference runs once, with its eng_ variant, before
        // its par_ variant is compared.
        let mut rejected_by_reference = None;
        if schema.starts_with("eng_") {
            rejected_by_reference =
                Some(run_reference(&mut conn, &reference, &statements[*index]).await);
        }
        for table in case.tables {
            let ours = table_contents(&mut conn, schema, table).await;
            let theirs = table_contents(&mut conn, &reference, table).await;
            if ours != theirs {
                failures.push(format!(
                    "{} ({schema}): table {table} differs\n  engine:    {ours}\n  reference: {theirs}",
                    case.name
                ));
            }
        }
        // Transient failures (two batches in flight may deadlock) are
        // retried and counted as processing errors; only rejections count.
        let metrics = engine.metrics().await;
        let rejected = metrics.sum(
            &format!("{schema}_events_failed_total"),
            &[("reason", "validation_error")],
        ) as usize;
        let processed = metrics.sum(&format!("{schema}_events_processed_total"), &[]) as usize;
        if rejected_by_reference.is_some_and(|r| r != rejected) {
            failures.push(format!(
                "{} ({schema}): the engine rejected {rejected} events, the reference {rejected_by_reference:?}",
                case.name
            ));
        }
        if processed + rejected != EVENTS {
            failures.push(format!(
                "{} ({schema}): {processed} processed + {rejected} rejected",
                case.name
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The catalog is read as the pipeline's migrations leave the table: a
/// table created plain by one migration and given an AFTER ROW trigger by
/// the next is planned per row, and `check --db` names the trigger; the
/// same pipeline without the second migration keeps the unnest path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_write_path_follows_the_migrations() {
    let env = TestEnv::new().await;
    let dir = env.fresh_dir("migrated");
    let migrations = dir.join("migrations");
    std::fs::create_dir_all(&migrations).expect("create the migrations directory");
    std::fs::write(
        migrations.join("1_table.sql"),
        "CREATE TABLE public.kv (k text PRIMARY KEY, v int NOT NULL);
CREATE TABLE public.kv_log (k text NOT NULL);
CREATE FUNCTION public.kv_log() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN INSERT INTO public.kv_log VALUES (NEW.k); RETURN NULL; END $$;",
    )
    .expect("write a migration");
    let template = "INSERT INTO kv (k, v) VALUES ({{ event.k }}, {{ event.v }})";
    let yaml = pipeline_yaml(&env, "public", "x.>", template, 1, "").replace(
        "    pool_size: 2\n",
        &format!(
            "    pool_size: 2\n    migrations: {}\n",
            migrations.display()
        ),
    );
    let file = dir.join("migrated.yaml");
    std::fs::write(&file, yaml).expect("write the pipeline");
    let file_arg = file.display().to_string();
    let path_line = |out: std::process::Output| {
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    };
    let before = path_line(env.engine().output(&["check", "--db", &file_arg]).await);
    assert!(before.contains("statement 1: unnest ("), "{before}");
    std::fs::write(
        migrations.join("2_trigger.sql"),
        "CREATE TRIGGER kv_logged AFTER INSERT ON public.kv FOR EACH ROW EXECUTE FUNCTION public.kv_log();",
    )
    .expect("write a migration");
    let after = path_line(env.engine().output(&["check", "--db", &file_arg]).await);
    assert!(
        after.contains("statement 1: per-row (") && after.contains("kv_logged on kv"),
        "{after}"
    );
}

/// Rows at fault are isolated with a few savepoints, not one per row: a
/// batch of 200 rows, 4 of them bad (the first two, one in the middle, the
/// last), written through the sink. Each (sub)transaction that stored rows
/// left its own `xmin`: at most 2b + 1 = 9 here, where a savepoint per row
/// (the writer before) left 196. The outcomes and the table are the
/// reference's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolating_bad_rows_takes_a_few_savepoints_not_one_per_row() {
    let env = TestEnv::new().await;
    let mut conn = env.db.acquire().await.expect("a connection");
    let ddl = "CREATE TABLE t (id int PRIMARY KEY, v int NOT NULL CHECK (v >= 0));";
    create_schema(&mut conn, "iso_eng", ddl).await;
    create_schema(&mut conn, "iso_ref", ddl).await;
    let template = "INSERT INTO t (id, v) VALUES ({{ event.id }}, {{ event.v }})";
    let bad = [0, 1, 100, 199];
    let statements: Vec<_> = (0..200)
        .map(|i| {
            let v = if bad.contains(&i) { -1 } else { i };
            render(template, &json!({"id": i, "v": v}), &json!({}))
        })
        .collect();
    let url = format!("{}?schema=iso_eng", env.database_url());
    let sink = test_sink(&url, 1).await;
    let ours = sink_outcomes(&sink, &statements, statements.len())
        .await
        .expect("write the batch");
    let theirs = reference_outcomes(&mut conn, "iso_ref", &statements).await;
    assert_eq!(ours, theirs);
    assert_eq!(
        table_contents(&mut conn, "iso_eng", "t").await,
        table_contents(&mut conn, "iso_ref", "t").await
    );
    let writers: i64 = sqlx::query_scalar("SELECT count(DISTINCT xmin::text) FROM iso_eng.t")
        .fetch_one(&mut *conn)
        .await
        .expect("count the writing transactions");
    assert!(
        writers <= 2 * bad.len() as i64 + 1,
        "{writers} (sub)transactions"
    );
}

/// Sessions read values as the database is configured, as psql's do: the
/// database sets TimeZone, DateStyle, IntervalStyle and
/// extra_float_digits; the role a TimeZone and a DateStyle (which win over
/// the database's), the role in that database another DateStyle (which
/// wins over both); the URL's `options` an IntervalStyle (which wins over
/// the database's). The same statement through the sink and through psql
/// stores the same row. (sqlx's startup packet made the sink store
/// 15:00-03 for "18:00", 2 January for "01/02/2025" and 17 significant
/// digits where psql keeps 15.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_read_values_as_the_database_is_configured() {
    let env = TestEnv::new().await;
    let db = &env.db_name;
    let role = format!("r_{}", env.id);
    env.exec(&format!(
        "CREATE ROLE {role} LOGIN SUPERUSER PASSWORD 'postgres';
         ALTER DATABASE {db} SET timezone = 'Asia/Tokyo';
         ALTER ROLE {role} SET timezone = 'America/Sao_Paulo';
         ALTER DATABASE {db} SET datestyle = 'ISO, MDY';
         ALTER ROLE {role} SET datestyle = 'SQL, MDY';
         ALTER ROLE {role} IN DATABASE {db} SET datestyle = 'ISO, DMY';
         ALTER DATABASE {db} SET intervalstyle = 'iso_8601';
         ALTER DATABASE {db} SET extra_float_digits = 0"
    ))
    .await;
    let database_url =
        env.database_url()
            .replacen("postgres:postgres@", &format!("{role}:postgres@"), 1);
    let ddl = "CREATE TABLE vals (id int PRIMARY KEY, at timestamptz, day date, span interval, ratio text);";
    let mut conn = env.db.acquire().await.expect("a connection");
    create_schema(&mut conn, "set_eng", ddl).await;
    create_schema(&mut conn, "set_ref", ddl).await;
    let template = "INSERT INTO vals (id, at, day, span, ratio)
VALUES ({{ event.id }}, {{ event.at }}, {{ event.day }}, {{ event.span }}, ({{ event.x }}::float8 + 0.2::float8)::text)";
    let event = json!({"id": 1, "at": "2025-07-01 18:00", "day": "01/02/2025", "span": "-1 2:03:04", "x": 0.1});
    let statement = render(template, &event, &json!({}));
    let options = "options=-c%20IntervalStyle%3Dsql_standard";
    let url = format!("{database_url}?schema=set_eng&{options}");
    let sink = test_sink(&url, 1).await;
    let stored = sink_outcomes(&sink, std::slice::from_ref(&statement), 1).await;
    drop(sink);
    let psql = std::process::Command::new("psql")
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-c"])
        .arg(format!(
            "SET search_path = set_ref; {}",
            inline(&statement.0, &statement.1)
        ))
        .arg(format!("{database_url}?{options}"))
        .output()
        .expect("run psql");
    env.exec(&format!("DROP ROLE {role}")).await;
    assert_eq!(stored.expect("write the row"), [false], "the row is stored");
    assert!(
        psql.status.success(),
        "{}",
        String::from_utf8_lossy(&psql.stderr)
    );
    let theirs = table_contents(&mut conn, "set_ref", "vals").await;
    assert_eq!(table_contents(&mut conn, "set_eng", "vals").await, theirs);
    assert_eq!(theirs[0]["ratio"], "0.3", "psql kept 15 digits: {theirs}");
}

/// Draws of the statement generator (`harness/generator.rs`: table shapes,
/// statements, events, the database's TimeZone and DateStyle), each
/// written through the sink as one batch and in batches of 1–7 rows on one
/// connection, and, where no outcome depends on order, two batches at once
/// on two connections (as `max_in_flight: 2`, the default), each compared
/// with the single-row reference: every event's outcome and every table.
/// So no outcome depends on the event's position in its batch, on the
/// batch's size, on batches in flight or on how many batches the
/// connection ran before. The seed and the number of draws
/// are printed; `INGESTD_STATEMENT_SEED` and `INGESTD_STATEMENT_DRAWS` set
/// them (a longer run: `INGESTD_STATEMENT_DRAWS=2000 cargo test --test it
/// -- statements::generated`), and a failing draw names its own seed,
/// which replays it alone with `INGESTD_STATEMENT_DRAWS=1`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_statements_match_the_single_row_reference() {
    let number = |name: &str, default: u64| {
        std::env::var(name).map_or(default, |v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name}={v} is not a number"))
        })
    };
    let seed = number("INGESTD_STATEMENT_SEED", 0x22_5eed);
    let draws = number("INGESTD_STATEMENT_DRAWS", 200);
    eprintln!("statement generator: seed {seed}, {draws} draws");
    let env = TestEnv::new().await;
    let mut conn = env.db.acquire().await.expect("a connection");
    let mut failures = Vec::new();
    let mut in_flight = 0;
    for i in 0..draws {
        let draw = generator::Draw::new(seed + i);
        in_flight += usize::from(draw.order_independent);
        eprintln!("draw {i}: seed {}", draw.seed);
        let found = compare_draw(&env, &mut conn, &format!("g{i}"), &draw).await;
        if !found.is_empty() {
            failures.push(format!(
                "seed {} (INGESTD_STATEMENT_SEED={} INGESTD_STATEMENT_DRAWS=1), settings {:?}:\n{}\n{}\n  {}",
                draw.seed,
                draw.seed,
                draw.settings,
                draw.ddl,
                draw.template,
                found.join("\n  ")
            ));
        }
    }
    eprintln!("{draws} draws, {in_flight} of them also with two batches in flight");
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// The differences between the sink and the reference on one draw, in
/// schemas named after `prefix`.
async fn compare_draw(
    env: &TestEnv,
    conn: &mut sqlx::PgConnection,
    prefix: &str,
    draw: &generator::Draw,
) -> Vec<String> {
    let (zone, style) = draw.settings;
    env.exec(&format!(
        "ALTER DATABASE {db} SET timezone = '{zone}'; ALTER DATABASE {db} SET datestyle = '{style}'",
        db = env.db_name
    ))
    .await;
    // The reference deallocates its statements: the simple protocol here.
    sqlx::raw_sql(&format!(
        "SET TimeZone = '{zone}'; SET DateStyle = '{style}'"
    ))
    .execute(&mut *conn)
    .await
    .expect("the reference's settings");
    let statements: Vec<_> = draw
        .events
        .iter()
        .map(|e| render(&draw.template, e, &json!({})))
        .collect();
    let reference = format!("{prefix}_ref");
    create_schema(conn, &reference, &draw.ddl).await;
    let theirs = reference_outcomes(conn, &reference, &statements).await;
    let mut found = Vec::new();
    let small = 1 + (draw.seed % 7) as usize;
    let mut variants = vec![("one", statements.len(), 1), ("small", small, 1)];
    variants.push(("eo", small, 1 + usize::from(draw.order_independent)));
    if draw.order_independent {
        variants.push(("par", small, 2));
    }
    for (variant, batch, in_flight) in variants {
        let schema = format!("{prefix}_{variant}");
        create_schema(conn, &schema, &draw.ddl).await;
        let url = format!("{}?schema={schema}", env.database_url());
        let mut sink = test_sink(&url, in_flight as u32).await;
        if variant == "eo" {
            keep_ledger(&mut sink, &schema).await;
        }
        let ours = match sink_outcomes_in_flight(&sink, &statements, batch, in_flight).await {
            Ok(ours) => ours,
            Err(e) => {
                found.push(format!(
                    "{variant}, batches of {batch}: a batch failed as a whole: {e}"
                ));
                continue;
            }
        };
        for (i, (o, t)) in ours.iter().zip(&theirs).enumerate() {
            if o != t {
                found.push(format!(
                    "{variant}, batches of {batch}: event {i} {}: engine rejected {o}, reference {t}",
                    draw.events[i]
                ));
            }
        }
        if variant == "eo" {
            found.extend(ledger_mismatch(conn, &schema, &ours).await);
        }
        for (table, left_out) in &draw.tables {
            let a = table_contents_without(conn, &schema, table, left_out).await;
            let b = table_contents_without(conn, &reference, table, left_out).await;
            if a != b {
                found.push(format!(
                    "{variant}, batches of {batch}: table {table} differs\n    engine:    {a}\n    reference: {b}"
                ));
            }
        }
    }
    found
}

/// `ingestd check --db` plans every statement of every pipeline against
/// the database without writing, names the path each takes (as the corpus
/// expects), and reports a statement that cannot work at the file's
/// `insert` line with exit status 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_db_shows_each_statements_path_and_what_cannot_work() {
    let env = TestEnv::new().await;
    let dir = env.fresh_dir("check");
    let cases = corpus();
    let mut conn = env.db.acquire().await.expect("a connection");
    for (index, case) in cases.iter().enumerate() {
        let schema = format!("chk_{index}");
        create_schema(&mut conn, &schema, case.ddl).await;
        let yaml = pipeline_yaml(&env, &schema, "x.>", case.template, 1, "");
        std::fs::write(dir.join(format!("{schema}.yaml")), yaml).expect("write pipeline");
    }
    let dir_arg = dir.display().to_string();
    let out = env.engine().output(&["check", "--db", &dir_arg]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut rows_before = 0;
    for (index, case) in cases.iter().enumerate() {
        let section = stdout
            .split(&format!("chk_{index}.yaml:\n"))
            .nth(1)
            .unwrap_or_else(|| panic!("no section for {}: {stdout}", case.name));
        let first = section.lines().next().unwrap_or_default();
        // `  statement 1: <path>[ (why)]: <first line>`
        let shown = first.split(": ").nth(1).unwrap_or_default();
        assert_eq!(
            shown.split(" (").next(),
            Some(case.path),
            "{}: expected the {} path, got `{first}`",
            case.name,
            case.path
        );
        rows_before += table_contents(&mut conn, &format!("chk_{index}"), case.tables[0])
            .await
            .as_array()
            .map_or(0, Vec::len);
    }
    // The catalog facts that ruled unnest out are named.
    for fact in [
        "AFTER ROW triggers, which one statement fires only after its last row: ledger_audit on ledger",
        "a foreign key to itself, which one statement checks only after its last row: nodes_parent_fkey on nodes",
        "deferrable constraints, checked after the statement, not after each row: slots_k on slots",
    ] {
        assert!(stdout.contains(fact), "{fact}: {stdout}");
    }
    // Only the fixtures' own rows: checking wrote nothing.
    assert_eq!(rows_before, 15 + 60 + 15 + 1000, "{stdout}");

    let broken = "INSERT INTO kv (k, nope) VALUES ({{ event.k }}, {{ event.v }})";
    let yaml = pipeline_yaml(&env, "chk_0", "x.>", broken, 1, "");
    let file = dir.join("broken.yaml");
    std::fs::write(&file, &yaml).expect("write pipeline");
    let file_arg = file.display().to_string();
    let out = env.engine().output(&["check", "--db", &file_arg]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let line = line_of(&yaml, "insert:");
    assert!(names_location(&stderr, "broken.yaml", line), "{stderr}");
    assert!(
        stderr.contains("42703") && stderr.contains("nope"),
        "{stderr}"
    );
}

/// An engine running one pipeline `name`, reading `<name>.>` and writing
/// with `template` into a schema `name` made by `ddl`.
async fn one_pipeline(
    env: &TestEnv,
    name: &str,
    ddl: &str,
    template: &str,
    on_error: &str,
) -> Engine {
    std::fs::remove_file(env.pipelines_dir().join("tiktok.yaml")).expect("remove tiktok.yaml");
    let mut conn = env.db.acquire().await.expect("a connection");
    create_schema(&mut conn, name, ddl).await;
    let filter = format!("{name}.>");
    let yaml = pipeline_yaml(env, name, &filter, template, 1, on_error);
    env.write_pipeline(&format!("{name}.yaml"), &yaml);
    let engine = env.engine().spawn();
    engine.wait_ready().await;
    engine
}

/// Waits until `/pipelines` shows pipeline `name` in `state`.
async fn wait_state(engine: &Engine, name: &str, want: &str) -> Value {
    wait_for(&format!("{name} to be {want}"), DEADLINE, || async {
        let s = status(engine, name).await;
        expect_eq(s["state"].as_str(), Some(want)).map_err(|e| format!("{e}: {s}"))?;
        Ok(s)
    })
    .await
}

/// Waits until `sql` (a count) returns `want`.
async fn wait_count(env: &TestEnv, sql: &str, want: i64) {
    wait_for(sql, DEADLINE, || async {
        let n: i64 = sqlx::query_scalar(sql)
            .fetch_one(&env.db)
            .await
            .map_err(state("count"))?;
        expect_eq(n, want)
    })
    .await;
}

/// Every row of the SQLSTATE table, raised for real by a trigger: the
/// event's fault is counted as failed and acknowledged at once; the
/// pipeline's fault turns the pipeline `failing` (and `/ready` 503), a
/// transient error `retrying`; in both cases the event is held, and
/// stored once the cause is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_sqlstate_class_gets_its_policy() {
    let env = TestEnv::new().await;
    let ddl = "CREATE TABLE fail_with (code text PRIMARY KEY);
CREATE TABLE stored (id text PRIMARY KEY, code text);
CREATE FUNCTION raise_code() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF EXISTS (SELECT 1 FROM fail_with WHERE code = NEW.code) THEN
    RAISE EXCEPTION 'forced %', NEW.code USING ERRCODE = NEW.code;
  END IF;
  RETURN NEW;
END $$;
CREATE TRIGGER stored_raise BEFORE INSERT ON stored FOR EACH ROW EXECUTE FUNCTION raise_code();";
    let template = "INSERT INTO stored (id, code) VALUES ({{ event.id }}, {{ event.code }})";
    let on_error = "transient:\n  backoff_initial: 20ms\n  backoff_max: 200ms";
    let engine = one_pipeline(&env, "codes", ddl, template, on_error).await;
    let mut failed = 0.0;
    for rule in sqlstate::RULES {
        let code = format!("{:0<5}", rule.prefix);
        env.exec(&format!("INSERT INTO codes.fail_with VALUES ('{code}')"))
            .await;
        let event = json!({"id": format!("e-{code}"), "code": code});
        env.publish("codes.e", event.to_string()).await;
        if rule.fault == Fault::Event {
            failed += 1.0;
            let rejected = [("reason", "validation_error")];
            engine
                .wait_metric("codes_events_failed_total", &rejected, failed)
                .await;
            let s = status(&engine, "codes").await;
            assert!(s["problem"].is_null(), "{code}: {s}");
            continue;
        }
        let severity = if rule.fault == Fault::Pipeline {
            "failing"
        } else {
            "retrying"
        };
        wait_state(&engine, "codes", severity).await;
        let ready = engine.get("/ready").await;
        assert_eq!(
            (ready.status, &ready.json()["status"]),
            (503, &json!("degraded")),
            "{code}"
        );
        let problem = [("pipeline", "codes"), ("severity", severity)];
        assert_eq!(
            engine
                .metrics()
                .await
                .sum("ingestd_pipeline_problem", &problem),
            1.0,
            "{code}"
        );
        env.exec(&format!(
            "DELETE FROM codes.fail_with WHERE code = '{code}'"
        ))
        .await;
        let sql = format!("SELECT count(*) FROM codes.stored WHERE code = '{code}'");
        wait_count(&env, &sql, 1).await;
        wait_state(&engine, "codes", "running").await;
    }
}

/// The per-row function decides whose fault a caught error is with the
/// SQL form of the SQLSTATE table; on every class of the table, on a full
/// code of each and on codes the table does not know, it agrees with
/// `SqlState::fault`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_row_functions_fault_test_agrees_with_the_table() {
    let env = TestEnv::new().await;
    let expression = sqlstate::event_fault_sql("$1");
    let mut codes: Vec<String> = sqlstate::RULES
        .iter()
        .flat_map(|r| [format!("{:0<5}", r.prefix), format!("{:X<5}", r.prefix)])
        .collect();
    codes.extend(["ZZ999", "40P01", "22P02", "P0001", "25P03", "23505"].map(String::from));
    for code in codes {
        let event: bool = sqlx::query_scalar(&format!("SELECT {expression}"))
            .bind(&code)
            .fetch_one(&env.db)
            .await
            .expect("evaluate the expression");
        let state = SqlState::parse(&code).expect("a SQLSTATE");
        assert_eq!(event, state.fault() == Fault::Event, "{code}");
    }
}

/// An error that is not the event's fault, met while rows are isolated
/// (after another row's rejection), ends the attempt at once: the next row
/// of the batch, which would wait for ten minutes, is never run, and the
/// pipeline reports the error itself, not a time-out. Once the cause is
/// gone the batch is stored, bar the rejected row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transient_error_among_isolated_rows_ends_the_attempt_at_once() {
    let env = TestEnv::new().await;
    std::fs::remove_file(env.pipelines_dir().join("tiktok.yaml")).expect("remove tiktok.yaml");
    env.create_stream().await;
    let events = [
        json!({"id": 1, "v": -1}),
        json!({"id": 2, "v": 2}),
        json!({"id": 3, "v": 3}),
    ];
    for event in &events {
        env.publish("iso.e", event.to_string()).await;
    }
    let ddl = "CREATE TABLE unsettled (since timestamptz NOT NULL DEFAULT now());
INSERT INTO unsettled DEFAULT VALUES;
CREATE TABLE t (id int PRIMARY KEY, v int NOT NULL CHECK (v >= 0));
CREATE FUNCTION guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF EXISTS (SELECT 1 FROM unsettled) THEN
    IF NEW.id = 2 THEN
      RAISE EXCEPTION 'could not serialize' USING ERRCODE = '40001';
    ELSIF NEW.id = 3 THEN
      PERFORM pg_sleep(600);
    END IF;
  END IF;
  RETURN NEW;
END $$;
CREATE TRIGGER t_guard BEFORE INSERT ON t FOR EACH ROW EXECUTE FUNCTION guard();";
    let template = "INSERT INTO t (id, v) VALUES ({{ event.id }}, {{ event.v }})";
    let mut conn = env.db.acquire().await.expect("a connection");
    create_schema(&mut conn, "iso", ddl).await;
    let on_error = "transient:\n  backoff_initial: 20ms\n  backoff_max: 200ms";
    let yaml = pipeline_yaml(&env, "iso", "iso.>", template, 1, on_error);
    env.write_pipeline("iso.yaml", &yaml);
    let engine = env.engine().spawn();
    engine.wait_ready().await;
    let s = wait_state(&engine, "iso", "retrying").await;
    let error = s["problem"]["error"].as_str().unwrap_or_default();
    assert!(error.contains("40001"), "{s}");
    env.exec("DELETE FROM iso.unsettled").await;
    wait_count(&env, "SELECT count(*) FROM iso.t WHERE id IN (2, 3)", 2).await;
    engine
        .wait_metric(
            "iso_events_failed_total",
            &[("reason", "validation_error")],
            1.0,
        )
        .await;
    wait_state(&engine, "iso", "running").await;
}

/// A table change that refuses every event (a new CHECK … NOT VALID) is
/// not taken for a flood of bad events: after `failing_after` rejections
/// in a row with the same SQLSTATE the pipeline turns `failing` and holds
/// the rest; once the constraint is dropped they are stored. The first
/// ones, before the threshold, followed the invalid policy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_of_identical_rejections_fails_the_pipeline_instead_of_acking() {
    let env = TestEnv::new().await;
    let ddl = "CREATE TABLE t (id int PRIMARY KEY, v text);";
    let template = "INSERT INTO t (id, v) VALUES ({{ event.id }}, {{ event.v }})";
    let on_error = "invalid:\n  failing_after: 5\ntransient:\n  backoff_max: 200ms";
    let engine = one_pipeline(&env, "guarded", ddl, template, on_error).await;
    env.publish("guarded.e", json!({"id": 0, "v": "ok"}).to_string())
        .await;
    engine
        .wait_metric("guarded_events_processed_total", &[], 1.0)
        .await;
    env.exec("ALTER TABLE guarded.t ADD CONSTRAINT v_short CHECK (length(v) < 3) NOT VALID")
        .await;
    for id in 1..=12 {
        env.publish("guarded.e", json!({"id": id, "v": "long"}).to_string())
            .await;
    }
    let s = wait_state(&engine, "guarded", "failing").await;
    let error = s["problem"]["error"].as_str().unwrap_or_default();
    assert!(error.contains("23514") && error.contains("v_short"), "{s}");
    assert_eq!(engine.get("/ready").await.status, 503);
    let rejected = [("reason", "validation_error")];
    let acked_away = engine
        .metrics()
        .await
        .sum("guarded_events_failed_total", &rejected);
    assert!(
        acked_away < 5.0,
        "{acked_away} events were acknowledged away before the pipeline failed"
    );
    env.exec("ALTER TABLE guarded.t DROP CONSTRAINT v_short")
        .await;
    wait_count(
        &env,
        "SELECT count(*) FROM guarded.t",
        13 - acked_away as i64,
    )
    .await;
    wait_state(&engine, "guarded", "running").await;
}

/// A column the statement needs is dropped while the engine runs: the
/// pipeline turns `failing` with the database's error, `/ready` answers
/// 503, nothing is acknowledged; the column comes back and every held
/// event is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_statement_fails_the_pipeline_until_fixed() {
    let env = TestEnv::new().await;
    let ddl = "CREATE TABLE t (id int PRIMARY KEY, note text);";
    let template = "INSERT INTO t (id, note) VALUES ({{ event.id }}, {{ event.note }})";
    let engine = one_pipeline(
        &env,
        "cols",
        ddl,
        template,
        "transient:\n  backoff_max: 200ms",
    )
    .await;
    env.exec("ALTER TABLE cols.t DROP COLUMN note").await;
    for id in 0..3 {
        env.publish("cols.e", json!({"id": id, "note": "n"}).to_string())
            .await;
    }
    // Every receipt fails as a processing error; a batch received while
    // the first one failed is counted once its own attempt has failed.
    let s = wait_for(
        "cols to be failing, every receipt failed",
        DEADLINE,
        || async {
            let s = status(&engine, "cols").await;
            expect_eq(s["state"].as_str(), Some("failing")).map_err(|e| format!("{e}: {s}"))?;
            expect_eq(s["failed"].as_u64(), s["received"].as_u64())
                .map_err(|e| format!("only processing errors: {e}: {s}"))?;
            Ok(s)
        },
    )
    .await;
    assert!(
        s["problem"]["error"]
            .as_str()
            .unwrap_or_default()
            .contains("42703"),
        "{s}"
    );
    assert_eq!(engine.get("/ready").await.status, 503);
    let durable = format!("cols-{}", env.id);
    let info = consumer_info(&env.js, &env.stream, &durable)
        .await
        .expect("consumer");
    assert_eq!(info.num_ack_pending, 3, "nothing acknowledged");
    env.exec("ALTER TABLE cols.t ADD COLUMN note text").await;
    wait_count(&env, "SELECT count(*) FROM cols.t WHERE note = 'n'", 3).await;
    let ok = json!({"status": "ok", "checks": {"database": "up", "nats": "up"}});
    engine.wait_reply("/ready", 200, &ok).await;
}

/// `ingestd test` writes a file's cases as one batch through the engine's
/// writer, rolled back: a case sees the cases before it (a child row whose
/// parent an earlier case inserts is stored; one whose parent no case
/// inserts is `unstorable`), and nothing remains in the database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeline_test_cases_share_one_rolled_back_batch() {
    let env = TestEnv::new().await;
    let mut conn = env.db.acquire().await.expect("a connection");
    let ddl = "CREATE TABLE parent (id text PRIMARY KEY);
CREATE TABLE child (id text PRIMARY KEY, parent_id text NOT NULL REFERENCES parent (id));";
    create_schema(&mut conn, "family", ddl).await;
    let template = "{% if event.parent %}INSERT INTO child (id, parent_id) VALUES ({{ event.id }}, {{ event.parent }})
{% else %}INSERT INTO parent (id) VALUES ({{ event.id }}){% endif %}";
    let dir = env.fresh_dir("family");
    let yaml = pipeline_yaml(&env, "family", "f.>", template, 1, "");
    std::fs::write(dir.join("family.yaml"), yaml).expect("write pipeline");
    let cases = r#"cases:
  - name: a parent
    subject: f.e
    event: { id: p1 }
    expect: { row: { id: p1 } }
  - name: its child, in the same batch
    subject: f.e
    event: { id: c1, parent: p1 }
    expect: {}
  - name: an orphan
    subject: f.e
    event: { id: c2, parent: p9 }
    expect: { invalid: unstorable }
"#;
    let test_file = dir.join("family.test.yaml");
    std::fs::write(&test_file, cases).expect("write test file");
    let arg = test_file.display().to_string();
    let out = env.engine().output(&["test", &arg]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("3 passed, 0 failed"), "{stdout}");
    for table in ["parent", "child"] {
        assert_eq!(
            table_contents(&mut conn, "family", table).await,
            json!([]),
            "{table}"
        );
    }
}

/// An `ON CONFLICT … DO NOTHING` insert stores new rows with a plain
/// insert; a batch that meets a stored key runs again with the clause, and
/// so does the next batch, before the plain insert is tried again. A
/// trigger records which statement stored each row; one event per batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_do_nothing_insert_is_tried_plain_and_falls_back_on_a_conflict() {
    let env = TestEnv::new().await;
    let ddl = "CREATE TABLE visits (k text PRIMARY KEY, via text NOT NULL);
CREATE FUNCTION record_via() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  NEW.via := CASE WHEN current_query() ILIKE '%on conflict%' THEN 'on conflict' ELSE 'plain' END;
  RETURN NEW;
END $$;
CREATE TRIGGER visits_via BEFORE INSERT ON visits FOR EACH ROW EXECUTE FUNCTION record_via();";
    let template =
        "INSERT INTO visits (k, via) VALUES ({{ event.k }}, '') ON CONFLICT (k) DO NOTHING";
    let engine = one_pipeline(&env, "plain", ddl, template, "").await;
    let mut processed = 0.0;
    let mut via = Vec::new();
    for k in ["a", "b", "a", "c", "d"] {
        env.publish("plain.e", json!({ "k": k }).to_string()).await;
        processed += 1.0;
        engine
            .wait_metric("plain_events_processed_total", &[], processed)
            .await;
        let stored: Option<String> =
            sqlx::query_scalar("SELECT via FROM plain.visits WHERE k = $1")
                .bind(k)
                .fetch_optional(&env.db)
                .await
                .expect("read the row");
        via.push(format!("{k}: {}", stored.unwrap_or_default()));
    }
    assert_eq!(
        via,
        [
            "a: plain",
            "b: plain",
            "a: plain",
            "c: on conflict",
            "d: plain"
        ]
    );
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM plain.visits")
        .fetch_one(&env.db)
        .await
        .expect("count");
    assert_eq!(rows, 4);
}
