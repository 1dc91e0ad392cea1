//! NATS: the servers of the tests, publishing, consumer state, and the
//! checks read from it.

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

/// Publishes without waiting for JetStream's confirmation, which the
/// returned future (see [`confirmed`]) brings.
pub async fn publish_unconfirmed(
    js: &jetstream::Context,
    subject: &str,
    payload: Vec<u8>,
) -> PublishAckFuture {
    js.publish(subject.to_owned(), payload.into())
        .await
        .unwrap_or_else(|e| panic!("publish to {subject}: {e}"))
}

/// JetStream's confirmation of a publish: the message's stream sequence.
pub async fn confirmed(ack: PublishAckFuture) -> u64 {
    ack.await
        .unwrap_or_else(|e| panic!("JetStream did not confirm a publish: {e}"))
        .sequence
}

/// Publishes and waits for JetStream to confirm storing the message;
/// returns its stream sequence.
pub async fn publish_confirmed(js: &jetstream::Context, subject: &str, payload: Vec<u8>) -> u64 {
    confirmed(publish_unconfirmed(js, subject, payload).await).await
}

/// Publishes `(subject, payload)` messages in order with up to `window`
/// confirmations outstanding, and returns once JetStream confirmed every one
/// with how many there were: one round trip per message would make a
/// backlog of tens of thousands take seconds; a window keeps the connection
/// busy and memory bounded.
pub async fn publish_windowed(
    js: &jetstream::Context,
    window: usize,
    messages: impl IntoIterator<Item = (String, Vec<u8>)>,
) -> u64 {
    let mut acks = VecDeque::with_capacity(window);
    let mut published = 0;
    for (subject, payload) in messages {
        if acks.len() == window {
            if let Some(ack) = acks.pop_front() {
                confirmed(ack).await;
            }
        }
        acks.push_back(publish_unconfirmed(js, &subject, payload).await);
        published += 1;
    }
    for ack in acks {
        confirmed(ack).await;
    }
    published
}

/// The state of `durable` on `stream`, or why it could not be read (one
/// request: cheap enough to poll often).
pub async fn consumer_info(
    js: &jetstream::Context,
    stream: &str,
    durable: &str,
) -> Result<consumer::Info, String> {
    let stream = js
        .get_stream_no_info(stream)
        .await
        .map_err(state("stream name"))?;
    stream
        .consumer_info(durable)
        .await
        .map_err(state("consumer info"))
}

/// Best-effort deletion of a stream on the server at `url`; a failure other
/// than the stream not existing is reported on stderr.
pub async fn delete_stream(url: String, stream: String) {
    let deleted = match async_nats::connect(url).await {
        Ok(client) => jetstream::new(client)
            .delete_stream(&stream)
            .await
            .map(drop)
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    match deleted {
        Err(e) if !e.contains("not found") => {
            eprintln!("cleanup: cannot delete stream {stream}: {e}")
        }
        _ => {}
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

/// `Ok` once JetStream answers account info through `client`: a server
/// the test started has recovered its streams by then. The raw API:
/// async-nats' typed account info does not parse the answer of a 2.9
/// server.
pub async fn jetstream_answers(client: &async_nats::Client) -> Result<(), String> {
    let reply = client
        .request("$JS.API.INFO", bytes::Bytes::new())
        .await
        .map_err(state("account info"))?;
    let info: Value = serde_json::from_slice(&reply.payload).map_err(state("parse"))?;
    match info.get("error") {
        None => Ok(()),
        Some(e) => Err(format!("account info: {e}")),
    }
}
