mod common;
use common::*;
use std::time::Duration;

#[test]
fn parser() {
    let text = r#"# HELP collector_events_received_total Total
# TYPE collector_events_received_total counter
collector_events_received_total{app="ttk-collector",environment="staging",subject="a.b \"q\" \\ x"} 3
# TYPE collector_event_processing_duration_seconds histogram
collector_event_processing_duration_seconds_bucket{app="a",le="0.001"} 0
collector_event_processing_duration_seconds_bucket{app="a",le="+Inf"} 1
collector_nats_connection_status 1
collector_process_start_time_seconds 1.7e9
"#;
    let m = Metrics::parse(text).unwrap();
    println!("{m:#?}");
    assert_eq!(
        m.one(
            "collector_events_received_total",
            &[("subject", "a.b \"q\" \\ x")]
        )
        .value,
        3.0
    );
    assert_eq!(
        m.type_of("collector_event_processing_duration_seconds"),
        Some("histogram")
    );
    assert_eq!(
        m.sum("collector_event_processing_duration_seconds_bucket", &[]),
        1.0
    );
    assert!(names_location(
        "error: /x/tiktok.yaml:35:7: unknown",
        "tiktok.yaml",
        35
    ));
    assert!(!names_location(
        "error: /x/tiktok.yaml:351:7: unknown",
        "tiktok.yaml",
        35
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn env_and_proxy() {
    let env = TestEnv::new().await;
    println!("{}", env.tiktok_pipeline());
    let mut proxy = TcpProxy::to_postgres().await;
    let url = postgres_url(proxy.port(), &env.db_name);
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(2))
        .connect(&url)
        .await
        .unwrap();
    let one: i32 = sqlx::query_scalar("select 1")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(one, 1);
    proxy.stop().await;
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        sqlx::query_scalar::<_, i32>("select 1").fetch_one(&pool),
    )
    .await;
    println!("while stopped: {r:?}");
    assert!(matches!(r, Ok(Err(_))));
    assert!(std::net::TcpStream::connect(("127.0.0.1", proxy.port())).is_err());
    proxy.start().await;
    let one: i32 = wait_for("db back", DEADLINE, || async {
        sqlx::query_scalar("select 1")
            .fetch_one(&pool)
            .await
            .map_err(|e| e.to_string())
    })
    .await;
    assert_eq!(one, 1);
    env.js
        .create_stream(async_nats::jetstream::stream::Config {
            name: env.stream.clone(),
            subjects: vec![env.subject(">")],
            ..Default::default()
        })
        .await
        .unwrap();
    env.publish("tiktok.top.x", b"hi".to_vec()).await;
    println!("stream {:?}", env.stream_info().await.state);
    let db = env.db_name.clone();
    drop(env);
    let admin = sqlx::postgres::PgPoolOptions::new()
        .connect(&postgres_url(5432, "postgres"))
        .await
        .unwrap();
    let n: i64 = sqlx::query_scalar("select count(*) from pg_database where datname = $1")
        .bind(&db)
        .fetch_one(&admin)
        .await
        .unwrap();
    assert_eq!(n, 0);
}
