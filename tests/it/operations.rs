//! Operating ingestd: the Grafana dashboard's queries and the alert rules
//! against a real Prometheus scraping a real engine, `ingestd replay`,
//! `ingestd backfill`, and the Kubernetes manifests against the binary.
//! See README "Operating ingestd".
//!
//! Each alert test loads `examples/prometheus/alerts.yaml` with its windows
//! and `for:` durations shortened to seconds (see
//! `operations::shortened_rules`) and waits for the alert to fire.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use crate::harness::faults::*;
use crate::harness::operations::*;
use crate::harness::*;
use async_nats::HeaderMap;
use serde_json::Value;

const LAG_INTERVAL: Duration = Duration::from_millis(500);
const RELOADS: &str = "ingestd_reloads_total";

/// The test's pipeline reading lag every [`LAG_INTERVAL`].
fn pipeline(env: &TestEnv) -> Variant {
    Variant::of(env).lag_interval(LAG_INTERVAL)
}

/// The engine on a database behind a proxy (for outages), scraped by a
/// Prometheus evaluating the shortened alert rules.
async fn watched(env: &TestEnv) -> (TcpProxy, Engine, Prometheus) {
    let (proxy, engine) = env.engine_behind_proxy().await;
    let prometheus = Prometheus::start(env, engine.port, &shortened_rules()).await;
    (proxy, engine, prometheus)
}

fn stdout_of(output: &std::process::Output) -> String {
    let out = String::from_utf8_lossy(&output.stdout).into_owned();
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "failed ({}): {out}\n{err}",
        output.status
    );
    out
}

// ---------------------------------------------------------------------------
// Dashboard, metrics and rules
// ---------------------------------------------------------------------------

/// Every panel query of the shipped dashboard, expanded by Grafana's rules,
/// parses in Prometheus and returns data once the engine has produced each
/// metric (events stored and failed, a dead letter, a sink retry, lag);
/// the dead letter fires its alert; promtool accepts /metrics and the rules.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_queries_return_data_and_dead_letters_fire_their_alert() {
    let env = TestEnv::new().await;
    let bus = Bus::shared(&env);
    let dlq = DeadLetterQueue::create(&env, &bus).await;
    pipeline(&env).dead_letter_to(&dlq).write(&env);
    let (mut proxy, engine, prometheus) = watched(&env).await;

    bus.publish_events(&event_ids("dash", 2)).await;
    env.publish(TOP_VIEW, "not json").await;
    dlq.wait_letters(1).await;
    proxy.stop().await;
    bus.publish_events(&["dash-retried".to_owned()]).await;
    engine
        .wait_metric_at_least("ingestd_sink_retries_total", &[], 1.0)
        .await;
    proxy.start().await;
    wait_settled(&engine, 3.0).await;

    let fired = prometheus.wait_firing("IngestdDeadLetters").await;
    assert_eq!(fired[0]["pipeline"], "tiktok", "{fired:?}");
    assert_eq!(fired[0]["reason"], "not_json", "{fired:?}");

    let dashboard: Value =
        serde_json::from_str(&repo_file("examples/grafana/ingestd-dashboard.json")).unwrap();
    let vars: BTreeMap<&str, &str> = GRAFANA_BUILTINS
        .into_iter()
        .chain([
            ("prefix", "collector"),
            ("app", "ttk-collector"),
            ("environment", "test"),
            ("pipeline", ".*"),
        ])
        .collect();
    assert!(
        expand_grafana("rate($prefix_events_total[1m])", &vars).is_err(),
        "`$prefix_events_total` names the variable `prefix_events_total`"
    );
    let queries: Vec<(String, String)> = dashboard_queries(&dashboard)
        .into_iter()
        .map(|(title, expr)| {
            let expanded = expand_grafana(&expr, &vars).unwrap_or_else(|e| panic!("{title}: {e}"));
            (title, expanded)
        })
        .collect();
    assert!(queries.len() >= 25, "{} queries", queries.len());
    wait_for("every dashboard query to return data", DEADLINE, || async {
        let mut empty = Vec::new();
        for (title, promql) in &queries {
            let result = prometheus.query(promql).await;
            match result {
                Ok(series) if series.is_empty() => empty.push(format!("{title}: {promql}")),
                Ok(_) => {}
                Err(e) => panic!("{title}: Prometheus refuses {promql}: {e}"),
            }
        }
        if empty.is_empty() {
            Ok(())
        } else {
            Err(format!("no data for {} queries: {empty:#?}", empty.len()))
        }
    })
    .await;

    let metrics = engine.get("/metrics").await.body;
    for family in [
        "ingestd_consumer_pending_messages",
        "ingestd_publish_to_commit_seconds_bucket",
        "ingestd_last_commit_timestamp_seconds",
        "ingestd_held_bytes",
    ] {
        assert!(metrics.contains(family), "no {family} in /metrics");
    }
    let checked = promtool(&["check", "metrics"], metrics.as_bytes());
    assert!(
        checked.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    let rules = repo_root().join("examples/prometheus/alerts.yaml");
    let checked = promtool(&["check", "rules", rules.to_str().unwrap()], b"");
    assert!(
        checked.status.success(),
        "promtool check rules: {}",
        String::from_utf8_lossy(&checked.stdout)
    );
}

/// The database goes away while events keep coming: the pipeline commits
/// nothing while messages wait (stalled), its backlog grows (lag growing),
/// and its sink is retrying (degraded).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_pipeline_fires_stalled_lag_growing_and_degraded_alerts() {
    let env = TestEnv::new().await;
    let bus = Bus::shared(&env);
    pipeline(&env).write(&env);
    let (mut proxy, engine, prometheus) = watched(&env).await;
    bus.publish_events(&event_ids("before", 1)).await;
    wait_settled(&engine, 1.0).await;
    proxy.stop().await;

    let publisher = {
        let bus = bus.clone();
        tokio::spawn(async move {
            for id in event_ids("stalled", 200) {
                bus.publish_events(&[id]).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    for alert in [
        "IngestdPipelineStalled",
        "IngestdLagGrowing",
        "IngestdPipelineDegraded",
    ] {
        let fired = prometheus.wait_firing(alert).await;
        assert_eq!(fired[0]["pipeline"], "tiktok", "{alert}: {fired:?}");
    }
    publisher.abort();
    let failing = prometheus.query("ALERTS{alertname=\"IngestdPipelineFailing\"}");
    assert_eq!(failing.await.unwrap(), Vec::<Value>::new());
}

/// The table disappears (the pipeline's fault: failing), then a broken
/// pipeline file is saved (reload failed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_pipeline_and_failed_reload_fire_their_alerts() {
    let env = TestEnv::new().await;
    let bus = Bus::shared(&env);
    pipeline(&env).write(&env);
    let engine = env.engine().start().await;
    let prometheus = Prometheus::start(&env, engine.port, &shortened_rules()).await;
    bus.publish_events(&event_ids("kept", 1)).await;
    wait_settled(&engine, 1.0).await;
    env.exec(r#"ALTER TABLE "TiktokEvent" RENAME TO "Elsewhere""#)
        .await;
    bus.publish_events(&event_ids("held", 1)).await;
    let fired = prometheus.wait_firing("IngestdPipelineFailing").await;
    assert_eq!(fired[0]["side"], "sink", "{fired:?}");

    env.write_pipeline("broken.yaml", "name: [unterminated\n");
    engine
        .wait_metric(RELOADS, &[("result", "failure")], 1.0)
        .await;
    let fired = prometheus.wait_firing("IngestdReloadFailed").await;
    let file = fired[0]["file"].as_str().unwrap_or_default();
    assert!(file.ends_with("broken.yaml"), "{fired:?}");
}

/// The lag gauges follow the consumer and what the engine holds while the
/// database is away, the freshness series follow the commits once it is
/// back, and every series leaves with its pipeline file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_series_follow_the_consumer_and_leave_with_their_pipeline() {
    let env = TestEnv::new().await;
    let bus = Bus::shared(&env);
    pipeline(&env).write(&env);
    let (mut proxy, engine) = env.engine_behind_proxy().await;
    proxy.stop().await;
    let ids = event_ids("lag", 4);
    bus.publish_events(&ids).await;
    let bytes: usize = ids.iter().map(|id| to_bytes(&event(id)).len()).sum();
    let tiktok = [("pipeline", "tiktok")];
    engine
        .wait_metric("ingestd_held_messages", &tiktok, 4.0)
        .await;
    engine
        .wait_metric("ingestd_held_bytes", &tiktok, bytes as f64)
        .await;
    engine
        .wait_metric("ingestd_consumer_ack_pending_messages", &tiktok, 4.0)
        .await;
    let m = engine.metrics().await;
    assert_eq!(
        m.series("ingestd_last_commit_timestamp_seconds", &[])
            .count(),
        0
    );

    proxy.start().await;
    wait_settled(&engine, 4.0).await;
    engine
        .wait_metric("ingestd_held_messages", &tiktok, 0.0)
        .await;
    engine.wait_metric("ingestd_held_bytes", &tiktok, 0.0).await;
    engine
        .wait_metric("ingestd_consumer_ack_pending_messages", &tiktok, 0.0)
        .await;
    let m = engine
        .wait_metric("ingestd_publish_to_commit_seconds_count", &tiktok, 4.0)
        .await;
    let last = m
        .one("ingestd_last_commit_timestamp_seconds", &tiktok)
        .value;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        (now - 60.0..=now + 1.0).contains(&last),
        "last commit {last}, now {now}"
    );

    env.write_pipeline("other.yaml", &other_pipeline(&env));
    std::fs::remove_file(env.pipelines_dir().join("tiktok.yaml")).unwrap();
    wait_for(
        "the removed pipeline's lag series to go",
        DEADLINE,
        || async {
            let m = engine.try_metrics().await?;
            let left: Vec<&Sample> = m
                .samples
                .iter()
                .filter(|s| s.name.starts_with("ingestd_") && s.has_labels(&tiktok))
                .filter(|s| !s.name.contains("total") && !s.name.contains("problem"))
                .collect();
            if left.is_empty() {
                Ok(())
            } else {
                Err(format!("{left:?}"))
            }
        },
    )
    .await;
}

/// A second pipeline on the test's stream (so the engine keeps running
/// when tiktok.yaml goes).
fn other_pipeline(env: &TestEnv) -> String {
    let tiktok = env.tiktok_pipeline();
    let durable = format!("other-{}", env.id);
    adapt_pipeline(
        &tiktok,
        &[
            ("name: tiktok".into(), "name: other".into()),
            (env.durable.clone(), durable),
            ("prefix: collector".into(), "prefix: other".into()),
        ],
    )
}

// ---------------------------------------------------------------------------
// Replay
// ---------------------------------------------------------------------------

/// Events a too strict schema dead-lettered are replayed once the schema is
/// relaxed: the filters and --dry-run change nothing, the replay stores each
/// row once and empties the dead-letter stream, an interrupted replay's
/// re-publish is deduplicated by JetStream, and replaying the same letters
/// again stores nothing twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_republishes_dead_letters_once_after_the_cause_is_fixed() {
    let env = TestEnv::new().await;
    let bus = Bus::shared(&env);
    let dlq = DeadLetterQueue::create(&env, &bus).await;
    let shipped = repo_file("schemas/tiktok-event.schema.json");
    let schema = env.dir.join("schemas/tiktok-event.schema.json");
    let strict = adapt_pipeline(
        &shipped,
        &[(
            r#""eventId": { "type": "string" }"#.into(),
            r#""eventId": { "type": "string", "maxLength": 3 }"#.into(),
        )],
    );
    write_file(&schema, &strict);
    pipeline(&env).dead_letter_to(&dlq).write(&env);
    let shipped_path = repo_root().join("schemas/tiktok-event.schema.json");
    let file = env.pipelines_dir().join("tiktok.yaml");
    let text = std::fs::read_to_string(&file).unwrap();
    let from = shipped_path.display().to_string();
    let to = schema.display().to_string();
    env.write_pipeline("tiktok.yaml", &adapt_pipeline(&text, &[(from, to)]));
    let engine = env.engine().start().await;

    let ids = event_ids("replay", 3);
    bus.publish_events(&ids).await;
    let letters = dlq.wait_letters(3).await;
    assert_eq!(letters[0].header("Ingestd-Reason"), "schema");
    let replay = |extra: &[&str]| {
        let mut args = vec!["replay", "--dead-letters", &dlq.subject];
        args.extend_from_slice(extra);
        let args: Vec<String> = args.into_iter().map(str::to_owned).collect();
        let builder = env.engine();
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            stdout_of(&builder.output(&args).await)
        }
    };

    let out = replay(&["--dry-run"]).await;
    assert!(out.contains("3 would be replayed"), "{out}");
    let out = replay(&["--reason", "not_json"]).await;
    assert!(out.contains("0 replayed, 3 skipped"), "{out}");
    let out = replay(&["--since", "2999-01-01T00:00:00Z"]).await;
    assert!(out.contains("0 replayed, 3 skipped"), "{out}");
    let out = replay(&["--subject", "elsewhere.>"]).await;
    assert!(out.contains("0 replayed, 3 skipped"), "{out}");
    assert_eq!(dlq.try_count().await.unwrap(), 3);

    std::fs::write(&schema, &shipped).unwrap();
    engine
        .wait_metric(RELOADS, &[("result", "success")], 2.0)
        .await;
    // As if an earlier replay had re-published the first letter (sequence
    // 1 of the dead-letter stream) and been stopped before deleting it.
    let mut headers = HeaderMap::new();
    let dlq_stream = format!("DLQ_{}", env.id);
    headers.insert(
        "Nats-Msg-Id",
        format!("ingestd-replay:{dlq_stream}:1").as_str(),
    );
    bus.publish(TOP_VIEW, headers, letters[0].payload.to_vec())
        .await;
    let before = env.stream_info().await.state.messages;

    let subject = format!("{}tiktok.>", env.subject_prefix);
    let out = replay(&["--pipeline", "tiktok", "--subject", &subject]).await;
    assert!(out.contains("3 replayed, 0 skipped"), "{out}");
    assert_eq!(dlq.try_count().await.unwrap(), 0);
    assert_eq!(
        env.stream_info().await.state.messages,
        before + 2,
        "the interrupted replay's re-publish was stored again"
    );
    wait_settled(&engine, 3.0).await;
    env.wait_all_acked().await;
    assert_eq!(stored_ids(&env).await, ids);

    // The same letters once more (dead-lettered again by hand): the
    // idempotent insert stores nothing twice.
    for letter in &letters {
        let mut headers = letter.headers.clone();
        headers.insert(
            "Nats-Msg-Id",
            format!("again-{}", letter.header("Nats-Msg-Id")).as_str(),
        );
        bus.js
            .publish_with_headers(dlq.subject.clone(), headers, letter.payload.clone())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let out = replay(&[]).await;
    assert!(out.contains("3 replayed"), "{out}");
    wait_settled(&engine, 6.0).await;
    assert_eq!(stored_ids(&env).await, ids);
}

// ---------------------------------------------------------------------------
// Backfill
// ---------------------------------------------------------------------------

/// Rows lost downstream are re-read from the stream, from a sequence and
/// from a time, on a consumer of the backfill's own: the live durable does
/// not move and the backfill's consumer is gone afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_rereads_the_stream_and_leaves_the_live_consumer_alone() {
    let env = TestEnv::new().await;
    let bus = Bus::shared(&env);
    let engine = env.engine().start().await;
    let ids = event_ids("backfill", 3);
    bus.publish_events(&ids).await;
    wait_settled(&engine, 3.0).await;
    let live = env.wait_all_acked().await;
    env.exec(r#"DELETE FROM "TiktokEvent""#).await;

    let file = env.pipelines_dir().join("tiktok.yaml");
    let file = file.to_str().unwrap();
    let first = env.stream_info().await.state.first_sequence;
    let from = (first + 1).to_string();
    let out = stdout_of(
        &env.engine()
            .output(&["backfill", file, "--from-sequence", &from])
            .await,
    );
    assert!(out.contains("2 events stored"), "{out}");
    assert_eq!(stored_ids(&env).await, ids[1..].to_vec());

    let out = stdout_of(
        &env.engine()
            .output(&["backfill", file, "--from-time", "2020-01-01T00:00:00Z"])
            .await,
    );
    assert!(out.contains("3 events stored"), "{out}");
    assert_eq!(stored_ids(&env).await, ids);

    let after = env.consumer_info().await;
    assert_eq!(
        (
            after.delivered.stream_sequence,
            after.ack_floor.stream_sequence
        ),
        (
            live.delivered.stream_sequence,
            live.ack_floor.stream_sequence
        ),
        "the live consumer moved"
    );
    let backfill = format!("{}-backfill", env.durable);
    let gone = consumer_info(&env.js, &env.stream, &backfill).await;
    assert!(gone.is_err(), "the backfill consumer is still there");
    assert_eq!(engine.metrics().await.sum(PROCESSED, &[]), 3.0);
}

// ---------------------------------------------------------------------------
// Kubernetes
// ---------------------------------------------------------------------------

/// Every document of `deploy/kubernetes/*.yaml`, by kind.
fn manifests() -> BTreeMap<String, Vec<Value>> {
    let dir = repo_root().join("deploy/kubernetes");
    let mut by_kind: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value: Value = serde::Deserialize::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let kind = value["kind"].as_str().unwrap_or_default().to_owned();
            by_kind.entry(kind).or_default().push(value);
        }
    }
    by_kind
}

/// The probes name routes the binary serves on the port it listens on by
/// default; the ConfigMap is mounted as a directory (so updates reach the
/// watcher); its pipelines pass `ingestd check` laid out as in the image;
/// `max_ack_pending` scales with the replicas.
#[tokio::test]
async fn kubernetes_manifests_match_the_binary() {
    let kinds = manifests();
    let deployment = &kinds["Deployment"][0];
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let env: BTreeMap<&str, &str> = container["env"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| Some((e["name"].as_str()?, e["value"].as_str()?)))
        .collect();
    let port_named = |name: &Value| -> u64 {
        let ports = container["ports"].as_array().unwrap();
        let found = ports.iter().find(|p| &p["name"] == name);
        found.map_or_else(
            || name.as_u64().unwrap(),
            |p| p["containerPort"].as_u64().unwrap(),
        )
    };

    let help = std::process::Command::new(ingestd_bin())
        .args(["run", "--help"])
        .env_remove("PORT")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    let default_port: u64 = help
        .split("[env: PORT=] [default: ")
        .nth(1)
        .and_then(|rest| rest.split(']').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no default port in `ingestd run --help`:\n{help}"));
    assert_eq!(env["PORT"].parse::<u64>().unwrap(), default_port);
    let routes = repo_file("src/http/mod.rs");
    for (probe, path) in [("livenessProbe", "/live"), ("readinessProbe", "/ready")] {
        let get = &container[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        assert_eq!(port_named(&get["port"]), default_port, "{probe}");
        assert!(
            routes.contains(&format!(".route(\"{path}\"")),
            "{path} not served"
        );
    }
    let service = &kinds["Service"][0]["spec"]["ports"][0];
    assert_eq!(port_named(&service["targetPort"]), default_port);

    let mount = &container["volumeMounts"][0];
    assert!(
        mount.get("subPath").is_none(),
        "a subPath mount never sees updates"
    );
    assert_eq!(mount["mountPath"], "/app/pipelines");
    let config_map = &kinds["ConfigMap"][0];
    assert_eq!(
        pod["volumes"][0]["configMap"]["name"],
        config_map["metadata"]["name"]
    );
    assert!(container["args"]
        .as_array()
        .unwrap()
        .contains(&"/app/pipelines".into()));

    let app = std::env::temp_dir().join(format!("ingestd-k8s-{}", unique_id()));
    let replicas = deployment["spec"]["replicas"].as_u64().unwrap();
    for (name, text) in config_map["data"].as_object().unwrap() {
        let text = text.as_str().unwrap();
        write_file(&app.join("pipelines").join(name), text);
        let doc: Value = serde_yaml::from_str(text).unwrap();
        let batch = &doc["sink"]["postgres"]["batch"];
        let per_process =
            batch["max_rows"].as_u64().unwrap() * (batch["max_in_flight"].as_u64().unwrap() + 3);
        let pending = doc["source"]["nats"]["consumer"]["max_ack_pending"].as_u64();
        assert_eq!(
            pending,
            Some(replicas * per_process),
            "{name}: max_ack_pending"
        );
    }
    for dir in ["schemas", "migrations"] {
        std::os::unix::fs::symlink(repo_root().join(dir), app.join(dir)).unwrap();
    }
    let checked = run_to_exit(
        ingestd_bin(),
        &["check", app.join("pipelines").to_str().unwrap()],
        &BTreeMap::new(),
        Path::new(&app),
    )
    .await;
    let _ = std::fs::remove_dir_all(&app);
    stdout_of(&checked);
}
