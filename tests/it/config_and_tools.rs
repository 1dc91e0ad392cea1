//! Configuration values checked for what they become, errors located by
//! their full key path, and the tools run on the engine's own code: the
//! real binary against the machine's NATS and PostgreSQL.

use std::path::{Path, PathBuf};
use std::process::Output;

use crate::harness::reload;
use crate::harness::*;

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Writes `yaml` as `name` in a fresh directory of the test's and runs
/// `ingestd ARGS FILE` on it.
async fn run_on(env: &TestEnv, args: &[&str], name: &str, yaml: &str) -> (PathBuf, Output) {
    let path = env.fresh_dir("config").join(name);
    std::fs::write(&path, yaml).expect("write the pipeline");
    let mut all = args.to_vec();
    all.push(path.to_str().expect("utf-8 path"));
    let out = env.engine().output(&all).await;
    (path, out)
}

/// The shipped pipeline with `from` replaced by `to`.
fn tiktok_with(env: &TestEnv, from: &str, to: &str) -> String {
    adapt_pipeline(&env.tiktok_pipeline(), &[(from.into(), to.into())])
}

/// Values the engine cannot use are refused by `check`, each on its own
/// line and by its full key path: an interval of zero (the lag poller
/// would panic), timeouts under a millisecond (sent as 0 ms: no limit), a
/// wait past what an `Instant` holds (the pipeline task would panic).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_refuses_durations_the_engine_cannot_use() {
    let env = TestEnv::new().await;
    let cases = [
        (
            "source.nats.lag_interval",
            "    consumer:\n",
            "    lag_interval: 0s\n    consumer:\n",
            "lag_interval: 0s",
        ),
        (
            "sink.postgres.statement_timeout",
            "    batch:\n",
            "    statement_timeout: 500us\n    batch:\n",
            "statement_timeout: 500us",
        ),
        (
            "sink.postgres.lock_timeout",
            "    batch:\n",
            "    lock_timeout: 500us\n    batch:\n",
            "lock_timeout: 500us",
        ),
        (
            "sink.postgres.batch.max_wait",
            "max_wait: 3ms",
            "max_wait: 400000000000y",
            "max_wait: 400000000000y",
        ),
    ];
    for (n, (path, from, to, marker)) in cases.into_iter().enumerate() {
        let yaml = tiktok_with(&env, from, to);
        let name = format!("bounded-{n}.yaml");
        let (_, out) = run_on(&env, &["check"], &name, &yaml).await;
        let output = text(&out);
        assert!(!out.status.success(), "{path}: check passed:\n{output}");
        assert!(
            names_location(&output, &name, line_of(&yaml, marker)),
            "{path}: expected {name}:{} in:\n{output}",
            line_of(&yaml, marker)
        );
        assert!(output.contains(&format!("{path}: ")), "{path}:\n{output}");
    }
}

/// The engine refuses them at load too: with `lag_interval: 0s` it does
/// not start, and says where the value is, instead of running with a lag
/// poller that panicked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_refuses_a_zero_lag_interval_at_load() {
    let env = TestEnv::new().await;
    let yaml = tiktok_with(
        &env,
        "    consumer:\n",
        "    lag_interval: 0s\n    consumer:\n",
    );
    env.write_pipeline("tiktok.yaml", &yaml);
    let engine = env.engine().spawn();
    let status = engine.wait_exit().await;
    assert!(!status.success(), "the engine ran:\n{}", engine.log());
    let line = line_of(&yaml, "lag_interval: 0s");
    let log = engine.log();
    assert!(
        log.contains(&format!(
            "tiktok.yaml:{line}:19: source.nats.lag_interval: "
        )),
        "{log}"
    );
}

/// `batch.max_bytes` below `max_payload` is reported on the line of
/// `batch.max_bytes`, not on the first line holding a `max_bytes` key
/// (`stream.max_bytes`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_error_is_located_at_the_batch_key() {
    let env = TestEnv::new().await;
    let yaml = tiktok_with(
        &env,
        "      max_in_flight: 2\n",
        "      max_in_flight: 2\n      max_bytes: 512KiB\n",
    );
    let (_, out) = run_on(&env, &["check"], "batch.yaml", &yaml).await;
    let output = text(&out);
    assert!(!out.status.success(), "{output}");
    let line = line_of(&yaml, "max_bytes: 512KiB");
    assert!(line != line_of(&yaml, "max_bytes: 1GiB"));
    assert!(
        names_location(&output, "batch.yaml", line),
        "expected batch.yaml:{line} in:\n{output}"
    );
    assert!(output.contains("sink.postgres.batch.max_bytes"), "{output}");
}

/// The README's commented example, `# url: ${OTHER_DATABASE_URL}`, needs
/// no such variable; a reference outside the comment still does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn variables_in_comments_are_not_expanded() {
    let env = TestEnv::new().await;
    let commented = "    # url: ${INGESTD_TEST_SURELY_UNSET}\n    migrations:";
    let yaml = tiktok_with(&env, "    migrations:", commented);
    let (_, out) = run_on(&env, &["check"], "commented.yaml", &yaml).await;
    assert!(out.status.success(), "{}", text(&out));

    let yaml = tiktok_with(
        &env,
        "    migrations:",
        "    url: ${INGESTD_TEST_SURELY_UNSET} # ${ALSO_UNSET}\n    migrations:",
    );
    let (_, out) = run_on(&env, &["check"], "used.yaml", &yaml).await;
    let output = text(&out);
    assert!(!out.status.success(), "{output}");
    assert!(
        output.contains("INGESTD_TEST_SURELY_UNSET") && !output.contains("ALSO_UNSET"),
        "{output}"
    );
}

/// The tables of the test's database's `public` schema.
async fn public_tables(env: &TestEnv) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT tablename::text FROM pg_tables WHERE schemaname = 'public' ORDER BY 1",
    )
    .fetch_all(&env.db)
    .await
    .expect("list the tables")
}

/// `ingestd test` leaves the database exactly as it found it: its
/// migrations run inside the rolled-back transaction, so neither
/// `_sqlx_migrations` nor the migration's table remain; with
/// `--apply-migrations` they are applied for good, and the rows are still
/// rolled back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeline_tests_leave_the_database_as_they_found_it() {
    let env = TestEnv::new().await;
    let pipelines = repo_root().join("pipelines");
    let pipelines = pipelines.to_str().expect("utf-8 path");
    let out = env.engine().output(&["test", pipelines]).await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("8 passed, 0 failed"), "{}", text(&out));
    assert_eq!(public_tables(&env).await, Vec::<String>::new());

    let out = env
        .engine()
        .output(&["test", "--apply-migrations", pipelines])
        .await;
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        public_tables(&env).await,
        ["TiktokEvent", "_sqlx_migrations"]
    );
    let rows: i64 = sqlx::query_scalar(r#"SELECT count(*) FROM "TiktokEvent""#)
        .fetch_one(&env.db)
        .await
        .expect("count");
    assert_eq!(rows, 0, "test rows are rolled back");
}

/// The harness's `clicks` pipeline, storing `msg.time` too (a migration
/// of its own adds the column), in the pipelines dir in place of tiktok,
/// with a test file expecting a time no render gives.
fn clicks_with_msg_time(env: &TestEnv) -> (reload::Clicks, PathBuf) {
    let clicks = reload::Clicks::new(env);
    std::fs::write(
        clicks.migrations.join("20260101000001_msg_time.sql"),
        "ALTER TABLE clicks ADD COLUMN msg_time text;",
    )
    .expect("write the migration");
    let yaml = reload::edit(
        &clicks.yaml(true),
        "INSERT INTO clicks (click_id, url) VALUES ({{ event.clickId }}, {{ event.url }})",
        "INSERT INTO clicks (click_id, url, msg_time) VALUES ({{ event.clickId }}, {{ event.url }}, {{ msg.time }})",
    );
    std::fs::remove_file(env.pipelines_dir().join("tiktok.yaml")).expect("remove tiktok.yaml");
    env.write_pipeline(reload::Clicks::FILE, &yaml);
    let tests = env.fresh_dir("msg-time").join("clicks.test.yaml");
    let case = "cases:\n  - name: time\n    subject: web\n    event: {clickId: a, url: u}\n    expect:\n      row: {msg_time: not-a-time}\n";
    let pipeline = env.pipelines_dir().join(reload::Clicks::FILE);
    std::fs::write(&tests, format!("pipeline: {}\n{case}", pipeline.display()))
        .expect("write the test file");
    (clicks, tests)
}

/// The digits after the seconds' decimal point of an RFC 3339 time.
fn fraction_digits(time: &str) -> usize {
    let fraction = time.split('.').nth(1).unwrap_or_default();
    fraction.chars().take_while(char::is_ascii_digit).count()
}

/// `ingestd test` renders `msg.time` as the engine does (to the
/// nanosecond): the test's diff shows the time it rendered, the engine
/// stores the one it renders.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeline_tests_render_msg_time_as_the_engine_does() {
    let env = TestEnv::new().await;
    let (clicks, tests) = clicks_with_msg_time(&env);
    let out = env
        .engine()
        .output(&["test", tests.to_str().expect("utf-8 path")])
        .await;
    let output = text(&out);
    let tested = output
        .lines()
        .find_map(|l| l.trim().strip_prefix("actual   "))
        .unwrap_or_else(|| panic!("no actual value in:\n{output}"))
        .trim_matches('"')
        .to_string();

    let _engine = env.engine().spawn();
    clicks.wait_consumer("created", |_| true).await;
    clicks.publish("e1").await;
    clicks.wait_stored(&["e1"]).await;
    let stored: String = sqlx::query_scalar("SELECT msg_time FROM clicks WHERE click_id = 'e1'")
        .fetch_one(&env.db)
        .await
        .expect("the stored time");
    assert_eq!(fraction_digits(&stored), 9, "the engine: {stored}");
    assert_eq!(
        fraction_digits(&tested),
        fraction_digits(&stored),
        "test rendered {tested}, the engine {stored}"
    );
}

/// `check --db` on a database the engine has not started on: the shipped
/// statement is planned against the table its migrations create (inside
/// the rolled-back transaction), and nothing is left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_db_plans_against_the_database_as_the_migrations_leave_it() {
    let env = TestEnv::new().await;
    let (_, out) = run_on(
        &env,
        &["check", "--db"],
        "tiktok.yaml",
        &env.tiktok_pipeline(),
    )
    .await;
    let output = text(&out);
    assert!(out.status.success(), "{output}");
    assert!(output.contains("statement 1: unnest"), "{output}");
    assert_eq!(public_tables(&env).await, Vec::<String>::new());
}

/// `check --db` still finds a statement that cannot work once the
/// migrations are applied (a column no migration creates).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_db_reports_a_statement_the_migrated_schema_refuses() {
    let env = TestEnv::new().await;
    let yaml = tiktok_with(&env, r#""eventType", "data")"#, r#""eventType", "nosuch")"#);
    let (_, out) = run_on(&env, &["check", "--db"], "broken.yaml", &yaml).await;
    let output = text(&out);
    assert!(!out.status.success(), "{output}");
    assert!(
        output.contains("cannot work") && output.contains("nosuch"),
        "{output}"
    );
    assert_eq!(public_tables(&env).await, Vec::<String>::new());
}

/// `ingestd healthcheck` dials the address the engine listens on
/// (`LISTEN_ADDR`), not 127.0.0.1 whatever it says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthcheck_follows_listen_addr() {
    let env = TestEnv::new().await;
    let builder = env.engine().var("LISTEN_ADDR", "127.0.0.2");
    let port = builder.vars()["PORT"].clone();
    let _engine = builder.spawn();
    let live = format!("http://127.0.0.2:{port}/live");
    wait_for("the engine on 127.0.0.2", DEADLINE, || async {
        let reply = http_client()
            .get(&live)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        expect_eq(reply.status().as_u16(), 200)
    })
    .await;
    let check = |addr: &'static str| {
        env.engine()
            .var("LISTEN_ADDR", addr)
            .var("PORT", port.clone())
            .output(&["healthcheck"])
    };
    let out = check("127.0.0.2").await;
    assert!(out.status.success(), "{}", text(&out));
    let out = check("127.0.0.3").await;
    assert!(!out.status.success(), "nothing listens on 127.0.0.3");
}

/// A copy of the shipped migrations in a directory of the test's.
fn copy_migrations(to: &Path) {
    std::fs::create_dir_all(to).expect("migrations dir");
    for entry in std::fs::read_dir(repo_root().join("migrations")).expect("read migrations") {
        let path = entry.expect("entry").path();
        std::fs::copy(&path, to.join(path.file_name().unwrap())).expect("copy migration");
    }
}

/// Whether the shipped table has the column `note`.
async fn has_note_column(env: &TestEnv) -> Result<(), String> {
    let n: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.columns WHERE table_name = 'TiktokEvent' AND column_name = 'note'",
    )
    .fetch_one(&env.db)
    .await
    .map_err(|e| e.to_string())?;
    expect_eq(n, 1)
}

/// A migrations directory removed under the running engine (the pipeline
/// turns `degraded`) and created again with a new migration is watched
/// again: the migration is applied and the pipeline is healthy again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migrations_directory_removed_and_created_again_is_watched_again() {
    let env = TestEnv::new().await;
    let migrations = env.dir.join("migrations");
    copy_migrations(&migrations);
    let shipped = format!("{}/migrations", repo_root().display());
    let yaml = tiktok_with(&env, &shipped, &migrations.display().to_string());
    env.write_pipeline("tiktok.yaml", &yaml);
    let engine = env.engine().start().await;
    reload::wait_running(&engine, "tiktok.yaml").await;

    std::fs::remove_dir_all(&migrations).expect("remove the migrations");
    reload::wait_status(&engine, "tiktok.yaml", "degraded", |s| {
        s.state == reload::PipelineState::Degraded
    })
    .await;

    copy_migrations(&migrations);
    std::fs::write(
        migrations.join("20990101000000_note.sql"),
        r#"ALTER TABLE "TiktokEvent" ADD COLUMN "note" text;"#,
    )
    .expect("write the new migration");
    wait_for("the new migration to be applied", DEADLINE, || {
        has_note_column(&env)
    })
    .await;
    reload::wait_running(&engine, "tiktok.yaml").await;
    reload::assert_stores(&env, "after-the-return").await;
}
