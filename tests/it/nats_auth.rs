//! NATS credentials and TLS: the engine connects to servers that demand a
//! user and password, a token, or TLS (against servers the tests start), and
//! refuses to run without what the server demands.

use std::path::Path;
use std::process::Command;

use crate::harness::faults::{Bus, NatsServer};
use crate::harness::TestEnv;

/// Starts the engine on `nats` with `vars`, publishes one event on `bus`
/// and waits for its row: the connection works end to end.
async fn stores_through(env: &TestEnv, nats_url: &str, bus: &Bus, vars: &[(&str, &str)]) {
    let mut builder = env.engine().var("NATS_URL", nats_url);
    for (k, v) in vars {
        builder = builder.var(k, *v);
    }
    let engine = bus.start(builder).await;
    let event = crate::harness::example_event("top-video-view.json");
    bus.publish(
        "tiktok.top.video.view",
        Default::default(),
        serde_json::to_vec(&event).unwrap(),
    )
    .await;
    env.wait_row("test-123").await;
    assert_eq!(
        engine
            .metrics()
            .await
            .sum("collector_nats_connection_status", &[]),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_and_password_from_the_environment_or_the_url() {
    let env = TestEnv::new().await;
    let auth = r#"authorization { user: ingestd, password: "pa+ss word" }"#;
    let nats =
        NatsServer::start_with_credentials(env.fresh_dir("nats"), auth, "ingestd:pa%2Bss%20word@")
            .await;
    let bare = format!("nats://127.0.0.1:{}", nats.port);

    let refused = env
        .engine()
        .var("NATS_URL", &bare)
        .output(&["run", "--pipelines", env.pipelines_dir().to_str().unwrap()])
        .await;
    assert!(!refused.status.success(), "ran without credentials");
    let stderr = String::from_utf8_lossy(&refused.stderr).to_lowercase();
    assert!(stderr.contains("authorization"), "{stderr}");

    let bus = Bus::connect(&env, &nats.url()).await;
    let vars = [("NATS_USER", "ingestd"), ("NATS_PASSWORD", "pa+ss word")];
    stores_through(&env, &bare, &bus, &vars).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_in_the_url_work_and_stay_out_of_the_logs() {
    let env = TestEnv::new().await;
    let auth = r#"authorization { user: ingestd, password: "S3cretPassw0rd" }"#;
    let nats =
        NatsServer::start_with_credentials(env.fresh_dir("nats"), auth, "ingestd:S3cretPassw0rd@")
            .await;
    let bus = Bus::connect(&env, &nats.url()).await;
    let mut builder = env
        .engine()
        .var("NATS_URL", nats.url())
        .var("RUST_LOG", "debug");
    builder = builder.var("NODE_ENV", "test");
    let engine = bus.start(builder).await;
    bus.publish(
        "tiktok.top.video.view",
        Default::default(),
        serde_json::to_vec(&crate::harness::example_event("top-video-view.json")).unwrap(),
    )
    .await;
    env.wait_row("test-123").await;
    assert!(
        !engine.log().contains("S3cretPassw0rd"),
        "the password is in the log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token() {
    let env = TestEnv::new().await;
    let nats = NatsServer::start_with_credentials(
        env.fresh_dir("nats"),
        r#"authorization { token: "t0ken" }"#,
        "t0ken@",
    )
    .await;
    let bus = Bus::connect(&env, &nats.url()).await;
    let bare = format!("nats://127.0.0.1:{}", nats.port);
    stores_through(&env, &bare, &bus, &[("NATS_TOKEN", "t0ken")]).await;

    // `publish` connects as the engine does: the same variables.
    let event = env.dir.join("event.json");
    let payload = serde_json::to_vec(&crate::harness::example_event("top-video-view.json"));
    std::fs::write(&event, payload.unwrap()).unwrap();
    let subject = bus.subject("tiktok.top.video.view");
    let publish = ["publish", subject.as_str(), event.to_str().unwrap()];
    let refused = env.engine().var("NATS_URL", &bare).output(&publish).await;
    assert!(!refused.status.success(), "published without the token");
    let published = env
        .engine()
        .var("NATS_URL", &bare)
        .var("NATS_TOKEN", "t0ken")
        .output(&publish)
        .await;
    let stdout = String::from_utf8_lossy(&published.stdout);
    assert!(
        published.status.success(),
        "publish with NATS_TOKEN: {published:?}"
    );
    assert!(stdout.contains("sequence 2"), "{stdout}");
}

/// Runs openssl with `args` in `dir`.
fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(out.status.success(), "openssl {args:?}: {out:?}");
}

/// A private CA and a server certificate for 127.0.0.1 it signs (rustls
/// refuses a self-signed certificate used as its own CA). Returns the CA,
/// the server certificate and its key, as paths.
fn private_ca(dir: &Path) -> (String, String, String) {
    let ca_ext = [
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=keyCertSign",
    ];
    let ca_args = [
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=ingestd test CA",
    ];
    let ca_out = ["-keyout", "ca.key", "-out", "ca.pem"];
    openssl(dir, &[&ca_args[..], &ca_ext[..], &ca_out[..]].concat());
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            "key.pem",
            "-out",
            "srv.csr",
        ],
    );
    std::fs::write(
        dir.join("srv.ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "srv.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-out",
            "cert.pem",
            "-extfile",
            "srv.ext",
        ],
    );
    let path = |f: &str| dir.join(f).display().to_string();
    (path("ca.pem"), path("cert.pem"), path("key.pem"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_private_ca() {
    let env = TestEnv::new().await;
    let dir = env.fresh_dir("tls");
    let (ca, cert, key) = private_ca(&dir);
    let tls = format!("tls {{ cert_file: {cert:?}\n key_file: {key:?} }}");
    let nats = NatsServer::start_with_tls(dir, &tls, &ca).await;
    let bus = Bus::connect_tls(&env, &nats.url(), &ca).await;
    let url = nats.url().replace("nats://", "tls://");
    let vars = [("NATS_TLS_CA", ca.as_str()), ("NATS_TLS_REQUIRED", "true")];
    stores_through(&env, &url, &bus, &vars).await;
}

/// Giving a CA (without NATS_TLS_REQUIRED) means TLS is intended: against a
/// server without TLS the engine refuses to start instead of talking plain
/// text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_alone_makes_tls_required() {
    let env = TestEnv::new().await;
    let (ca, _, _) = private_ca(&env.fresh_dir("tls"));
    let refused = env
        .engine()
        .var("NATS_TLS_CA", &ca)
        .output(&["run", "--pipelines", env.pipelines_dir().to_str().unwrap()])
        .await;
    let stderr = String::from_utf8_lossy(&refused.stderr).to_lowercase();
    assert!(!refused.status.success(), "ran in plain text:\n{stderr}");
    assert!(stderr.contains("cannot connect to nats"), "{stderr}");
}
