//! Many pipelines on one database: one connection budget per database
//! (shared pools, one probe), waiting for a connection as backpressure,
//! fair turns, session settings per transaction, and loads that failed for
//! a transient reason tried again by themselves.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use crate::harness::scale::*;
use crate::harness::*;

/// The engine's shared pool in these tests (`DATABASE_POOL_SIZE`).
const POOL: i64 = 8;

/// Samples the engine's connections on `server` into `peak` until `stop`.
async fn sample_peak(
    server: &PgServer,
    admin: sqlx::PgPool,
    peak: &AtomicI64,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    while !*stop.borrow() {
        if let Ok(n) = server.engine_connections(&admin).await {
            peak.fetch_max(n, Ordering::Relaxed);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_all_running(engine: &Engine, count: usize) {
    wait_for(&format!("{count} pipelines running"), DEADLINE, || async {
        let states = states(engine).await?;
        let running = states.values().filter(|s| *s == "running").count();
        if running == count {
            Ok(())
        } else {
            Err(format!("{running} running: {states:?}"))
        }
    })
    .await
}

async fn wait_rows(admin: &sqlx::PgPool, want: i64) {
    wait_for(&format!("{want} rows"), DEADLINE, || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
            .fetch_one(admin)
            .await
            .map_err(state("count"))?;
        expect_eq(n, want)
    })
    .await
}

/// A hundred pipeline files on a Postgres with `max_connections = 100`:
/// all run, every event is stored exactly once, the engine never holds
/// more than its pool and one probe, `/ready` answers 200. A file added at
/// run time with a pool of its own runs, and its pool is gone with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_pipelines_share_one_connection_budget() {
    let per_pipeline = 20;
    let ManyPipelines {
        env,
        server,
        admin,
        names,
    } = ManyPipelines::set_up(100, per_pipeline).await;
    let peak = AtomicI64::new(0);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let sampler = {
        let admin = server.admin().await.expect("sampler connection");
        sample_peak(&server, admin, &peak, stopped)
    };
    let own = 2;
    let scenario = async {
        let engine = env
            .engine()
            .var("DATABASE_POOL_SIZE", POOL.to_string())
            .spawn();
        wait_all_running(&engine, names.len()).await;
        wait_rows(&admin, (names.len() * per_pipeline) as i64).await;
        engine
            .wait_ok("/ready", DEADLINE, Duration::from_millis(100))
            .await;
        let shared_peak = peak.load(Ordering::Relaxed);
        let extra = "p100".to_string();
        let isolated = format!("    pool: own\n    pool_size: {own}\n");
        let yaml = many_yaml(&env, &extra, &server.url("postgres"), &isolated);
        env.write_pipeline("p100.yaml", &yaml);
        wait_all_running(&engine, names.len() + 1).await;
        publish_many(&env, std::slice::from_ref(&extra), per_pipeline).await;
        wait_rows(&admin, ((names.len() + 1) * per_pipeline) as i64).await;
        let metrics = engine.metrics().await;
        assert_eq!(
            metrics.sum("ingestd_db_pool_size", &[]),
            (POOL + own) as f64
        );
        assert_eq!(
            metrics.sum("ingestd_pipeline_failures_total", &[]),
            0.0,
            "waiting for a connection is not a failure"
        );
        std::fs::remove_file(env.pipelines_dir().join("p100.yaml")).expect("remove p100");
        wait_for("p100's pool gone", DEADLINE, || async {
            let metrics = engine.try_metrics().await?;
            let size = metrics.sum("ingestd_db_pool_size", &[]);
            let held = server.engine_connections(&admin).await?;
            match (size == POOL as f64, held <= POOL + 1) {
                (true, true) => Ok(()),
                _ => Err(format!("pool sizes {size}, {held} connections held")),
            }
        })
        .await;
        let _ = stop.send(true);
        (engine, shared_peak)
    };
    let ((), (engine, shared_peak)) = tokio::join!(sampler, scenario);
    let distinct: i64 = sqlx::query_scalar("SELECT count(DISTINCT (pipeline, n)) FROM events")
        .fetch_one(&admin)
        .await
        .expect("distinct rows");
    assert_eq!(distinct, (101 * per_pipeline) as i64);
    assert!(shared_peak > 0, "the sampler saw the engine's connections");
    assert!(
        shared_peak <= POOL + 1,
        "a hundred pipelines held {shared_peak} connections; the budget is {POOL} + 1 probe"
    );
    let peak = peak.load(Ordering::Relaxed);
    assert!(
        peak <= POOL + 1 + own,
        "the engine held {peak} connections; with p100's own pool the budget is {}",
        POOL + 1 + own
    );
    drop(engine);
}

/// A file whose database does not answer is `waiting`, with the reason,
/// and loads by itself once the database is back; a file whose content is
/// wrong is `failed` and waits for its next change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_whose_database_was_unreachable_loads_once_it_is_back() {
    let env = TestEnv::new().await;
    env.exec(EVENTS_TABLE).await;
    let engine = env.engine().start().await;
    let mut proxy = TcpProxy::to_postgres().await;
    proxy.stop().await;
    let url = proxied(&env, &proxy);
    env.write_pipeline("later.yaml", &many_yaml(&env, "later", &url, ""));
    let broken = many_yaml(&env, "broken", &env.database_url(), "").replace("events", "nowhere");
    env.write_pipeline("broken.yaml", &broken);
    wait_for("later waiting, broken failed", DEADLINE, || async {
        let states = states(&engine).await?;
        let later = states.get("later.yaml").map(String::as_str);
        let broken = states.get("broken.yaml").map(String::as_str);
        expect_eq((later, broken), (Some("waiting"), Some("failed")))
    })
    .await;
    proxy.start().await;
    later_runs_and_stores(&env, &engine).await;
    let states = states(&engine).await.expect("states");
    assert_eq!(
        states.get("broken.yaml").map(String::as_str),
        Some("failed")
    );
}

/// With one connection for everyone, a pipeline whose batches take long
/// does not starve another: the other's events are stored while the busy
/// one still has a backlog, and neither counts its waits as failures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_pipeline_does_not_starve_the_others() {
    let env = TestEnv::new().await;
    env.exec(EVENTS_TABLE).await;
    std::fs::remove_file(env.pipelines_dir().join("tiktok.yaml")).expect("remove tiktok.yaml");
    let url = env.database_url();
    // Batches of 20 rows of 20 ms each: many turns, each long.
    let busy = many_yaml(&env, "busy", &url, "")
        .replace(
            "VALUES ('busy', {{ event.n }})",
            "SELECT 'busy', {{ event.n }} FROM pg_sleep(0.02)",
        )
        .replace("max_rows: 100", "max_rows: 20");
    env.write_pipeline("busy.yaml", &busy);
    env.write_pipeline("quiet.yaml", &many_yaml(&env, "quiet", &url, ""));
    env.create_stream().await;
    let busy_events = 300;
    publish_many(&env, &["busy".to_string()], busy_events).await;
    let engine = env.engine().var("DATABASE_POOL_SIZE", "1").spawn();
    wait_for("busy writing", DEADLINE, || async {
        match env.try_count("events WHERE pipeline = 'busy'").await? {
            0 => Err("nothing stored yet".to_string()),
            _ => Ok(()),
        }
    })
    .await;
    publish_many(&env, &["quiet".to_string()], 5).await;
    let busy_then = wait_for("quiet's rows", DEADLINE, || async {
        let quiet = env.try_count("events WHERE pipeline = 'quiet'").await?;
        let busy = env.try_count("events WHERE pipeline = 'busy'").await?;
        expect_eq(quiet, 5).map(|()| busy)
    })
    .await;
    assert!(
        busy_then < busy_events as i64,
        "quiet waited until busy had stored its whole backlog ({busy_then})"
    );
    wait_for("busy's rows", DEADLINE * 2, || async {
        expect_eq(
            env.try_count("events WHERE pipeline = 'busy'").await?,
            busy_events as i64,
        )
    })
    .await;
    let metrics = engine.metrics().await;
    assert_eq!(metrics.sum("ingestd_pipeline_failures_total", &[]), 0.0);
    assert_eq!(metrics.sum("ingestd_sink_retries_total", &[]), 0.0);
}

/// Two pipelines on one connection (a pool of one) with different
/// `statement_timeout` and `search_path` (Prisma's `schema=`), the same
/// per-row statement: each statement sees what a connection of its own
/// with those settings sees, and its unqualified table is its schema's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_settings_apply_per_transaction_on_a_shared_connection() {
    let env = TestEnv::new().await;
    std::fs::remove_file(env.pipelines_dir().join("tiktok.yaml")).expect("remove tiktok.yaml");
    let insert = "INSERT INTO seen (n, timeout, path) SELECT {{ event.n }}, \
                  current_setting('statement_timeout'), current_setting('search_path')";
    let settings = [("alpha", "1500ms"), ("beta", "7s")];
    for (schema, timeout) in settings {
        env.exec(&format!(
            "CREATE SCHEMA {schema}; CREATE TABLE {schema}.seen (n int PRIMARY KEY, timeout text, path text)"
        ))
        .await;
        let url = format!("{}?schema={schema}", env.database_url());
        let yaml = many_yaml(
            &env,
            schema,
            &url,
            &format!("    statement_timeout: {timeout}\n"),
        )
        .replace(
            &format!("INSERT INTO events (pipeline, n) VALUES ('{schema}', {{{{ event.n }}}})"),
            insert,
        );
        env.write_pipeline(&format!("{schema}.yaml"), &yaml);
    }
    env.create_stream().await;
    let _engine = env.engine().var("DATABASE_POOL_SIZE", "1").spawn();
    let names: Vec<String> = settings.iter().map(|(s, _)| s.to_string()).collect();
    publish_many(&env, &names, 30).await;
    for (schema, timeout) in settings {
        wait_for(&format!("{schema}'s rows"), DEADLINE, || async {
            expect_eq(env.try_count(&format!("{schema}.seen")).await?, 30)
        })
        .await;
        let url = format!("{}?schema={schema}", env.database_url());
        let options = ingestd::sink::postgres::connect_options(&url)
            .expect("options")
            .options([("statement_timeout", timeout)]);
        let dedicated = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect_with(options)
            .await
            .expect("a dedicated connection");
        let reference: (String, String) = sqlx::query_as(
            "SELECT current_setting('statement_timeout'), current_setting('search_path')",
        )
        .fetch_one(&dedicated)
        .await
        .expect("reference settings");
        let seen: Vec<(String, String)> =
            sqlx::query_as(&format!("SELECT DISTINCT timeout, path FROM {schema}.seen"))
                .fetch_all(&env.db)
                .await
                .expect("seen settings");
        assert_eq!(seen, vec![reference], "{schema}");
    }
}

/// A file added while NATS is unreachable is `waiting` (not `failed`) and
/// loads by itself once NATS is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_added_while_nats_was_unreachable_loads_once_it_is_back() {
    let env = TestEnv::new().await;
    env.exec(EVENTS_TABLE).await;
    let mut proxy = TcpProxy::to_nats().await;
    let engine = env.engine().var("NATS_URL", proxy.nats_url()).start().await;
    proxy.stop().await;
    let yaml = many_yaml(&env, "later", &env.database_url(), "");
    env.write_pipeline("later.yaml", &yaml);
    let error = wait_for("later waiting", DEADLINE, || async {
        let reply = engine.try_get("/pipelines").await?.json();
        let later = reply["pipelines"]
            .as_array()
            .and_then(|list| list.iter().find(|p| p["file"] == "later.yaml").cloned())
            .ok_or("no later.yaml yet")?;
        match later["state"].as_str() {
            Some("waiting") => Ok(later["last_error"].clone()),
            other => Err(format!("{other:?}: {later}")),
        }
    })
    .await;
    assert!(
        error.as_str().is_some_and(|e| e.contains("source.nats")),
        "{error}"
    );
    proxy.start().await;
    later_runs_and_stores(&env, &engine).await;
}

/// Once what it waited for is back, the file `later` runs by itself and
/// stores its events.
async fn later_runs_and_stores(env: &TestEnv, engine: &Engine) {
    wait_for("later running", DEADLINE, || async {
        let states = states(engine).await?;
        expect_eq(states.get("later").map(String::as_str), Some("running"))
    })
    .await;
    publish_many(env, &["later".to_string()], 3).await;
    wait_for("later's rows", DEADLINE, || async {
        expect_eq(env.try_count("events WHERE pipeline = 'later'").await?, 3)
    })
    .await;
}
