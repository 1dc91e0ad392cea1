//! NATS: the servers of the tests, consumer state, and the checks read from
//! it.

use super::*;

/// The NATS server of the tests: `$NATS_URL`, by default the machine's
/// (to run the suite against another server version, start one and point
/// `NATS_URL` at it; see also [`nats_server_bin`]).
pub fn nats_url() -> &'static str {
    static URL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    URL.get_or_init(|| {
        std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
    })
}

/// The `nats-server` binary tests start servers of their own with:
/// `$NATS_SERVER`, by default Debian's.
pub fn nats_server_bin() -> String {
    std::env::var("NATS_SERVER").unwrap_or_else(|_| "/usr/sbin/nats-server".to_owned())
}

/// The state of `durable` on `stream`, or why it could not be read.
pub async fn consumer_info(
    js: &jetstream::Context,
    stream: &str,
    durable: &str,
) -> Result<consumer::Info, String> {
    let stream = js.get_stream(stream).await.map_err(state("get stream"))?;
    stream
        .consumer_info(durable)
        .await
        .map_err(state("consumer info"))
}

/// Best-effort deletion of a stream on the server at `url`.
pub async fn delete_stream(url: String, stream: String) {
    if let Ok(client) = async_nats::connect(url).await {
        let _ = jetstream::new(client).delete_stream(&stream).await;
    }
}

/// How many deliveries were redeliveries, ever. `num_redelivered` only
/// counts messages still pending (an ack clears it), so it reads 0 at rest
/// whatever happened; the consumer sequence counts every delivery and the
/// stream sequence every message (all of the stream's messages match the
/// test's filter), so their difference is the redeliveries.
pub fn redeliveries(info: &consumer::Info) -> u64 {
    info.delivered.consumer_sequence - info.delivered.stream_sequence
}

/// Fails when a message was delivered more than once (see [`redeliveries`]).
pub fn assert_no_redelivery(info: &consumer::Info) {
    assert_eq!(
        redeliveries(info),
        0,
        "messages delivered more than once: {info:?}"
    );
}

/// `info` when the consumer has delivered and seen acknowledged every
/// message, else what is still outstanding.
pub fn all_acked(info: consumer::Info) -> Result<consumer::Info, String> {
    expect_eq((info.num_pending, info.num_ack_pending), (0, 0))
        .map_err(|e| format!("(num_pending, num_ack_pending) {e}"))?;
    Ok(info)
}
