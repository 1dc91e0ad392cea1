//! Dead letters: events that can never be stored, published with the reason
//! to a subject the pipeline names, and events JetStream gave up on after
//! `max_deliver` attempts (found through its advisories).
//!
//! Every dead letter carries `Nats-Msg-Id: <stream>:<sequence>`, so JetStream
//! stores it once even when it is published twice (a redelivery after a
//! lost ack, or two pipeline versions during a reload).

use async_nats::jetstream::{self, stream::Stream};
use async_nats::HeaderMap;
use bytes::Bytes;
use futures::StreamExt;
use prometheus::IntCounterVec;
use serde::Deserialize;
use tokio::sync::watch;

use crate::util::text::truncate;

/// Where a pipeline's dead letters go.
#[derive(Clone)]
pub struct DeadLetters {
    pub js: jetstream::Context,
    pub subject: String,
    pub pipeline: String,
    pub counter: IntCounterVec,
}

/// One event to dead-letter and why.
pub struct Letter<'a> {
    pub payload: Bytes,
    pub headers: Option<&'a HeaderMap>,
    pub subject: &'a str,
    pub stream: &'a str,
    pub stream_seq: u64,
    pub delivered: i64,
    pub reason: &'a str,
    pub error: &'a str,
}

impl DeadLetters {
    /// Publishes and waits for JetStream's confirmation: only then may the
    /// original be acknowledged.
    pub async fn publish(&self, letter: Letter<'_>) -> Result<(), String> {
        let mut headers = carried_headers(letter.headers);
        headers.insert(
            "Nats-Msg-Id",
            format!("{}:{}", letter.stream, letter.stream_seq).as_str(),
        );
        headers.insert("Ingestd-Pipeline", self.pipeline.as_str());
        headers.insert("Ingestd-Reason", letter.reason);
        let error = truncate(letter.error, 1000).replace(['\r', '\n'], " ");
        headers.insert("Ingestd-Error", error.as_str());
        headers.insert("Ingestd-Subject", letter.subject);
        headers.insert(
            "Ingestd-Stream-Sequence",
            letter.stream_seq.to_string().as_str(),
        );
        headers.insert("Ingestd-Delivered", letter.delivered.to_string().as_str());
        let confirm = self
            .js
            .publish_with_headers(self.subject.clone(), headers, letter.payload)
            .await
            .map_err(|e| format!("dead-letter publish to {}: {e}", self.subject))?;
        confirm.await.map_err(|e| {
            format!(
                "dead letter not confirmed by JetStream ({}): {e}",
                self.subject
            )
        })?;
        self.counter
            .with_label_values(&[&self.pipeline, letter.reason])
            .inc();
        Ok(())
    }

    /// Fails when no stream captures the dead-letter subject: every dead
    /// letter would be refused, and its original never acknowledged.
    pub async fn check(&self) -> Result<(), String> {
        self.js
            .stream_by_subject(self.subject.clone())
            .await
            .map(|_| ())
            .map_err(|e| {
                format!(
                    "no stream captures the dead-letter subject `{}`: {e}",
                    self.subject
                )
            })
    }
}

/// The original's headers for its dead letter. JetStream control headers
/// (`Nats-Expected-*`, `Nats-Msg-Id`, `Nats-Rollup`, `Nats-TTL`, any
/// `Nats-*`) would make the dead-letter stream judge the letter by the
/// original's conditions (an expected stream or sequence, a rollup it does
/// not allow) and refuse it, so they are kept under `Original-<name>`.
fn carried_headers(original: Option<&HeaderMap>) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (name, values) in original.into_iter().flat_map(|h| h.iter()) {
        let name = name.to_string();
        let control = name
            .get(..5)
            .is_some_and(|p| p.eq_ignore_ascii_case("nats-"));
        let name = if control {
            format!("Original-{name}")
        } else {
            name
        };
        for value in values {
            headers.append(name.as_str(), value.as_str());
        }
    }
    headers
}

/// JetStream's advisory for a message that reached `max_deliver`.
#[derive(Deserialize)]
struct MaxDeliveries {
    stream_seq: u64,
    deliveries: i64,
}

/// Dead-letters each message JetStream stops delivering to the consumer,
/// until `stop` turns true.
pub async fn watch_max_deliveries(
    letters: DeadLetters,
    stream: Stream,
    durable: String,
    mut stop: watch::Receiver<bool>,
) {
    let stream_name = stream.cached_info().config.name.clone();
    let advisory = format!("$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{stream_name}.{durable}");
    let mut sub = match letters.js.client().subscribe(advisory.clone()).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, %advisory, "cannot watch max-deliveries advisories");
            return;
        }
    };
    loop {
        let msg = tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            m = sub.next() => match m { Some(m) => m, None => return },
        };
        let Ok(adv) = serde_json::from_slice::<MaxDeliveries>(&msg.payload) else {
            continue;
        };
        if let Err(e) = dead_letter_sequence(&letters, &stream, &stream_name, &adv).await {
            tracing::error!(pipeline = %letters.pipeline, stream_seq = adv.stream_seq, error = %e,
                "message reached max_deliver and could not be dead-lettered");
        }
    }
}

async fn dead_letter_sequence(
    letters: &DeadLetters,
    stream: &Stream,
    name: &str,
    adv: &MaxDeliveries,
) -> Result<(), String> {
    let m = stream
        .get_raw_message(adv.stream_seq)
        .await
        .map_err(|e| e.to_string())?;
    tracing::warn!(pipeline = %letters.pipeline, stream_seq = adv.stream_seq, deliveries = adv.deliveries,
        "message reached max_deliver: dead-lettering it");
    letters
        .publish(Letter {
            payload: m.payload,
            headers: Some(&m.headers),
            subject: m.subject.as_str(),
            stream: name,
            stream_seq: adv.stream_seq,
            delivered: adv.deliveries,
            reason: "max_deliver",
            error: "JetStream stopped redelivering: max_deliver reached",
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_headers_are_kept_under_original() {
        let mut h = HeaderMap::new();
        h.insert("Nats-Expected-Stream", "S");
        h.insert("nats-msg-id", "m1");
        h.insert("Trace", "t");
        let carried = carried_headers(Some(&h));
        assert_eq!(
            carried
                .get("Original-Nats-Expected-Stream")
                .map(|v| v.as_str()),
            Some("S")
        );
        assert_eq!(
            carried.get("Original-nats-msg-id").map(|v| v.as_str()),
            Some("m1")
        );
        assert_eq!(carried.get("Trace").map(|v| v.as_str()), Some("t"));
        assert!(carried.get("Nats-Expected-Stream").is_none());
    }
}
