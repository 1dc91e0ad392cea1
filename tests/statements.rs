//! Any statement a user writes is stored right: differential tests of the
//! sink against its reference (see `common/statements.rs`), and the
//! pipeline's reaction to errors that are not the events' fault.

mod common;
#[path = "common/statements.rs"]
mod statements;

use std::time::Duration;

use async_nats::jetstream::stream::{self, StorageType};
use common::*;
use serde_json::{json, Value};
use statements::*;

/// Events per pipeline of the corpus.
const EVENTS: usize = 300;

/// Deadline for the whole corpus to drain: 17+ pipelines on two cores.
const DRAIN: Duration = Duration::from_secs(120);

/// Publishes every case's events (case `i` on `diff.<i>.e`), before any
/// engine runs, and returns each case's statements as the reference
/// renders them, in stream order.
async fn publish_corpus(env: &TestEnv, cases: &[Case]) -> Vec<Vec<(String, Vec<Value>)>> {
    env.js
        .get_or_create_stream(stream::Config {
            name: env.stream.clone(),
            subjects: vec![env.subject(">")],
            storage: StorageType::File,
            ..Default::default()
        })
        .await
        .expect("create the test's stream");
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
/// at once if the pipeline reports a problem instead.
async fn wait_drained(env: &TestEnv, engine: &Engine, schema: &str) {
    let durable = format!("{schema}-{}", env.id);
    wait_for(&format!("{schema} to drain"), DRAIN, || async {
        let s = status(engine, schema).await;
        assert!(s["problem"].is_null(), "{schema} stalls: {s}");
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
            let yaml = pipeline_yaml(&env, case, index, &schema, in_flight);
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
        let expected_failed = if schema.starts_with("eng_") {
            run_reference(&mut conn, &reference, &statements[*index]).await
        } else {
            // The reference of this case ran with its eng_ variant.
            usize::MAX
        };
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
        let s = status(&engine, schema).await;
        let failed = s["failed"].as_u64().unwrap_or(u64::MAX) as usize;
        if expected_failed != usize::MAX && failed != expected_failed {
            failures.push(format!(
                "{} ({schema}): the engine counted {failed} failed events, the reference {expected_failed}",
                case.name
            ));
        }
        if s["processed"].as_u64().unwrap_or(0) as usize + failed != EVENTS {
            failures.push(format!(
                "{} ({schema}): counts do not add up: {s}",
                case.name
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
