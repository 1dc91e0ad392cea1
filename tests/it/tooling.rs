//! Operator tooling: `ingestd check` on each class of mistake, `ingestd test`
//! on the shipped pipelines and on a wrong expectation, `--help`, and the
//! Facebook example dropped into a running engine.

use std::path::{Path, PathBuf};
use std::process::Output;

use crate::harness::{adapt_pipeline, line_of, names_location, repo_file, repo_root, TestEnv};

/// One class of mistake: how to break the shipped tiktok pipeline, and the
/// text on the line the error must point at.
struct Mistake {
    what: &'static str,
    from: &'static str,
    to: &'static str,
    /// A text on the line the error must name (after the change).
    line_marker: &'static str,
}

const MISTAKES: &[Mistake] = &[
    Mistake {
        what: "unknown key",
        from: "      max_deliver: 5\n",
        to: "      max_deliver: 5\n      max_delivr: 5\n",
        line_marker: "max_delivr",
    },
    Mistake {
        what: "bad duration",
        from: "ack_wait: 30s",
        to: "ack_wait: thirty",
        line_marker: "ack_wait: thirty",
    },
    Mistake {
        what: "bad enum value",
        from: "discard: old",
        to: "discard: oldest",
        line_marker: "discard: oldest",
    },
    Mistake {
        what: "unset environment variable",
        from: "${NODE_ENV:-development}",
        to: "${INGESTD_TEST_SURELY_UNSET}",
        line_marker: "INGESTD_TEST_SURELY_UNSET",
    },
    Mistake {
        what: "YAML syntax error",
        from: "      max_rows: 1000\n",
        to: "      max_rows: [1000\n",
        line_marker: "max_rows: [1000",
    },
    Mistake {
        what: "template syntax error",
        from: "{{ event.eventType }}, {{ event.data }})",
        to: "{{ event.eventType }}, {{ event.data )",
        line_marker: "{{ event.data )",
    },
    Mistake {
        what: "value spliced inside quotes",
        from: "{{ event.eventId }},",
        to: "'{{ event.eventId }}',",
        line_marker: "insert: |",
    },
    Mistake {
        what: "missing schema file",
        from: "tiktok-event.schema.json",
        to: "no-such.schema.json",
        line_marker: "schema: ",
    },
    Mistake {
        what: "duration label that is not a label",
        from: "duration_labels: [source, event_type]",
        to: "duration_labels: [source, kind]",
        line_marker: "duration_labels:",
    },
];

/// Writes the shipped pipeline with `mistake` applied and runs `check` on it.
async fn check_mistake(env: &TestEnv, n: usize, m: &Mistake) -> (String, usize, Output) {
    let yaml = adapt_pipeline(&env.tiktok_pipeline(), &[(m.from.into(), m.to.into())]);
    let name = format!("mistake-{n}.yaml");
    let dir = env.fresh_dir("check");
    let path = dir.join(&name);
    std::fs::write(&path, &yaml).expect("write the broken pipeline");
    let out = env
        .engine()
        .output(&["check", path.to_str().expect("utf-8 path")])
        .await;
    (name, line_of(&yaml, m.line_marker), out)
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_the_line_of_each_class_of_mistake() {
    let env = TestEnv::new().await;
    for (n, m) in MISTAKES.iter().enumerate() {
        let (name, line, out) = check_mistake(&env, n, m).await;
        let output = text(&out);
        assert!(!out.status.success(), "{}: check passed:\n{output}", m.what);
        assert!(
            names_location(&output, &name, line),
            "{}: expected {name}:{line} in:\n{output}",
            m.what
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_accepts_the_shipped_pipelines() {
    let env = TestEnv::new().await;
    for dir in ["pipelines", "examples/facebook/pipelines"] {
        let path = repo_root().join(dir);
        let out = env
            .engine()
            .output(&["check", path.to_str().unwrap()])
            .await;
        assert!(out.status.success(), "{dir}: {}", text(&out));
    }
}

/// Runs `ingestd test` on `path` against this test's database.
async fn pipeline_tests(env: &TestEnv, path: &Path) -> Output {
    env.engine()
        .output(&["test", path.to_str().expect("utf-8 path")])
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeline_tests_pass_on_the_shipped_pipelines() {
    let env = TestEnv::new().await;
    for (dir, cases) in [("pipelines", 8), ("examples/facebook/pipelines", 4)] {
        let out = pipeline_tests(&env, &repo_root().join(dir)).await;
        let output = text(&out);
        assert!(out.status.success(), "{dir}:\n{output}");
        assert!(
            output.contains(&format!("{cases} passed, 0 failed")),
            "{dir}:\n{output}"
        );
    }
}

/// A copy of the shipped tiktok test file whose first case expects a wrong
/// eventId, with paths made absolute.
fn wrong_expectation(env: &TestEnv) -> PathBuf {
    let root = repo_root().display().to_string();
    let text = repo_file("pipelines/tiktok.test.yaml")
        .replace("eventId: test-123", "eventId: test-999")
        .replace("../examples/", &format!("{root}/examples/"));
    let text = format!("pipeline: {root}/pipelines/tiktok.yaml\n{text}");
    let path = env.fresh_dir("wrong").join("wrong.test.yaml");
    std::fs::write(&path, text).expect("write the test file");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeline_tests_fail_with_a_diff_on_a_wrong_expectation() {
    let env = TestEnv::new().await;
    let out = pipeline_tests(&env, &wrong_expectation(&env)).await;
    let output = text(&out);
    assert!(!out.status.success(), "{output}");
    assert!(output.contains("7 passed, 1 failed"), "{output}");
    let diff = output
        .split("FAIL")
        .nth(1)
        .expect("a FAIL line")
        .to_string();
    assert!(
        diff.contains("eventId:")
            && diff.contains("expected \"test-999\"")
            && diff.contains("actual   \"test-123\""),
        "the diff names the column, the expected and the actual value:\n{output}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_has_help_with_an_example() {
    let env = TestEnv::new().await;
    for cmd in ["run", "check", "test", "schema", "publish", "healthcheck"] {
        let out = env.engine().output(&[cmd, "--help"]).await;
        let output = text(&out);
        assert!(out.status.success(), "{cmd}: {output}");
        assert!(
            output.contains("Example"),
            "{cmd} --help has no example:\n{output}"
        );
    }
}

/// The rewrites that make the Facebook example this test's own: its
/// stream, subjects and durable, and absolute paths to its files.
fn facebook_pipeline(env: &TestEnv) -> String {
    let example = repo_root().join("examples/facebook").display().to_string();
    adapt_pipeline(
        &repo_file("examples/facebook/pipelines/facebook.yaml"),
        &[
            ("RAW_EVENTS".into(), env.stream.clone()),
            ("raw.events.".into(), env.subject_prefix.clone()),
            ("ingestd-facebook".into(), format!("fb-{}", env.id)),
            ("../schemas/".into(), format!("{example}/schemas/")),
            ("../migrations".into(), format!("{example}/migrations")),
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn facebook_example_dropped_into_a_running_engine_stores_its_events() {
    let env = TestEnv::new().await;
    let engine = env.engine().start().await;
    env.write_pipeline("facebook.yaml", &facebook_pipeline(&env));
    crate::harness::wait_for(
        "the facebook pipeline to run",
        crate::harness::DEADLINE,
        || async {
            let body = engine.try_get("/pipelines").await?.json();
            let running = body["pipelines"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|p| p["name"] == "facebook" && p["state"] == "running");
            running.then_some(()).ok_or_else(|| body.to_string())
        },
    )
    .await;
    for (suffix, file) in [
        ("facebook.top.ad.view", "top-ad-view.json"),
        ("facebook.bottom.checkout.complete", "bottom-checkout.json"),
    ] {
        let payload = repo_file(&format!("examples/facebook/events/{file}"));
        env.publish(suffix, payload).await;
    }
    for id in ["fb-top-1", "fb-bottom-1"] {
        env.wait_row_in(r#""FacebookEvent""#, id).await;
    }
    engine
        .wait_metric("facebook_events_processed_total", &[], 2.0)
        .await;
    env.publish_event(&crate::harness::example_event("top-video-view.json"))
        .await;
    env.wait_row("test-123").await;
}

/// Waits until `/metrics` satisfies `accept` (given the page's text).
async fn wait_metrics_page(
    engine: &crate::harness::Engine,
    what: &str,
    accept: impl Fn(&str) -> bool,
) {
    crate::harness::wait_for(what, crate::harness::DEADLINE, || async {
        let page = engine.try_get("/metrics").await?.body;
        if accept(&page) {
            Ok(())
        } else {
            Err(page
                .lines()
                .filter(|l| !l.starts_with('#'))
                .take(12)
                .collect::<Vec<_>>()
                .join("\n"))
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metric_families_follow_their_pipelines() {
    let env = TestEnv::new().await;
    let engine = env.engine().start().await;
    let facebook = env.write_pipeline("facebook.yaml", &facebook_pipeline(&env));
    env.publish(
        "facebook.top.ad.view",
        repo_file("examples/facebook/events/top-ad-view.json"),
    )
    .await;
    wait_metrics_page(&engine, "facebook families", |p| {
        p.contains("facebook_events_processed_total{")
    })
    .await;

    std::fs::remove_file(facebook).expect("remove the facebook pipeline");
    wait_metrics_page(&engine, "facebook families gone", |p| {
        !p.contains("facebook_") && p.contains("collector_nats_connection_status")
    })
    .await;

    // A changed label set replaces the families instead of failing the reload.
    let relabelled = adapt_pipeline(
        &env.tiktok_pipeline(),
        &[(
            "    funnel_stage: \"{{ event.funnelStage }}\"\n".into(),
            "    funnel_stage: \"{{ event.funnelStage }}\"\n    country: \"{{ event.data.engagement.country }}\"\n".into(),
        )],
    );
    env.write_pipeline("tiktok.yaml", &relabelled);
    // Loads so far: tiktok and facebook once each; then the relabelled tiktok.
    engine
        .wait_metric("ingestd_reloads_total", &[("result", "success")], 3.0)
        .await;
    env.publish_event(&crate::harness::example_event("top-video-view.json"))
        .await;
    env.wait_row("test-123").await;
    wait_metrics_page(&engine, "the new label", |p| {
        p.contains("collector_events_processed_total{")
            && p.contains("country=\"US\"")
            && p.contains(
                "collector_nats_connection_status{app=\"ttk-collector\",environment=\"test\"} 1",
            )
    })
    .await;
}

/// `ingestd check pipelines/*.yaml`: the shell's glob includes the pipeline
/// test file, which is checked as a test file (it parses, its pipeline
/// exists); a test file whose pipeline is missing is a problem.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_takes_test_files_from_a_glob_as_test_files() {
    let env = TestEnv::new().await;
    let dir = repo_root().join("pipelines");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .expect("read pipelines/")
        .map(|e| e.expect("entry").path().display().to_string())
        .filter(|p| p.ends_with(".yaml"))
        .collect();
    files.sort();
    assert!(files.iter().any(|f| f.ends_with(".test.yaml")), "{files:?}");
    let mut args = vec!["check"];
    args.extend(files.iter().map(String::as_str));
    let out = env.engine().output(&args).await;
    assert!(out.status.success(), "{}", text(&out));

    let orphan = env.dir.join("orphan.test.yaml");
    std::fs::write(&orphan, "cases: []\n").expect("write");
    let out = env
        .engine()
        .output(&["check", orphan.to_str().expect("utf-8 path")])
        .await;
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("orphan.yaml does not exist"),
        "{}",
        text(&out)
    );
}

/// The runtime has the worker threads `INGESTD_WORKER_THREADS` asks for,
/// and by default half the CPUs (at least one), as its start-up line says
/// (read from the runtime itself).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_threads_follow_the_setting_and_default_to_half_the_cpus() {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    for (setting, expected) in [(Some("3"), 3), (None, (cpus / 2).max(1))] {
        let env = TestEnv::new().await;
        env.write_pipeline("tiktok.yaml", &env.tiktok_pipeline());
        let builder = env.engine();
        let builder = match setting {
            Some(n) => builder.var("INGESTD_WORKER_THREADS", n),
            None => builder,
        };
        let engine = builder.start().await;
        let log = engine.log();
        let started = log
            .lines()
            .find(|l| l.contains("engine started"))
            .unwrap_or_else(|| panic!("no start-up line in:\n{log}"));
        let logged = |n: usize| {
            started.contains(&format!("worker_threads={n}"))
                || started.contains(&format!("\"worker_threads\":{n}"))
        };
        assert!(
            logged(expected),
            "{setting:?}: want {expected} worker threads: {started}"
        );
    }
}
