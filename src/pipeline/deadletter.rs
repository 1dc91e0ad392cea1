//! Dead letters: events that can never be stored, published with the reason
//! to a subject the pipeline names, and events JetStream gave up on after
//! `max_deliver` attempts.
//!
//! Every dead letter carries `Nats-Msg-Id: <stream>:<sequence>`, so JetStream
//! stores it once even when it is published twice (a redelivery after a
//! lost ack, two pipeline versions during a reload, or both the engine's own
//! view of a last delivery and the server's advisory).
//!
//! JetStream announces a message it stops redelivering with a core-NATS
//! advisory, which nobody receives while the engine restarts or NATS
//! reconnects. So the engine keeps each consumer's advisories in a small
//! work-queue stream of its own ([`capture_advisories`]) and acknowledges
//! one only once its letter is confirmed.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::context::{GetStreamByNameError, PublishError};
use async_nats::jetstream::stream::{LastRawMessageErrorKind, Stream};
use async_nats::jetstream::{self, AckKind, Message};
use async_nats::HeaderMap;
use bytes::Bytes;
use futures::StreamExt;
use prometheus::IntCounterVec;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use super::letters::{Outbox, Parcel};
use super::supervise::stopped_within;
use crate::config::reason::Reason;
use crate::sink::postgres::{Entry, PgSink};
use crate::util::backoff::Backoff;
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
pub struct Letter {
    pub payload: Bytes,
    pub headers: Option<HeaderMap>,
    pub subject: String,
    pub stream: String,
    pub stream_seq: u64,
    pub delivered: i64,
    pub reason: Reason,
    pub error: String,
}

/// Why JetStream did not take a dead letter.
#[derive(Debug, thiserror::Error)]
pub enum LetterError {
    #[error("dead-letter publish to {subject}: {source}")]
    Publish {
        subject: String,
        #[source]
        source: PublishError,
    },
    #[error("dead letter not confirmed by JetStream ({subject}): {source}")]
    NotConfirmed {
        subject: String,
        #[source]
        source: PublishError,
    },
    #[error("no stream captures the dead-letter subject `{subject}`: {source}")]
    NoStream {
        subject: String,
        #[source]
        source: GetStreamByNameError,
    },
}

impl DeadLetters {
    /// Publishes and waits for JetStream's confirmation: only then may the
    /// original be acknowledged.
    pub async fn publish(&self, letter: &Letter) -> Result<(), LetterError> {
        let mut headers = carried_headers(letter.headers.as_ref());
        headers.insert(
            "Nats-Msg-Id",
            format!("{}:{}", letter.stream, letter.stream_seq).as_str(),
        );
        headers.insert("Ingestd-Pipeline", self.pipeline.as_str());
        headers.insert("Ingestd-Reason", letter.reason.as_str());
        let error = truncate(&letter.error, 1000).replace(['\r', '\n'], " ");
        headers.insert("Ingestd-Error", error.as_str());
        headers.insert("Ingestd-Subject", letter.subject.as_str());
        headers.insert(
            "Ingestd-Stream-Sequence",
            letter.stream_seq.to_string().as_str(),
        );
        headers.insert("Ingestd-Delivered", letter.delivered.to_string().as_str());
        let subject = || self.subject.clone();
        let confirm = self
            .js
            .publish_with_headers(self.subject.clone(), headers, letter.payload.clone())
            .await
            .map_err(|source| LetterError::Publish {
                subject: subject(),
                source,
            })?;
        confirm.await.map_err(|source| LetterError::NotConfirmed {
            subject: subject(),
            source,
        })?;
        self.counter
            .with_label_values(&[&self.pipeline, letter.reason.as_str()])
            .inc();
        Ok(())
    }

    /// Fails when no stream captures the dead-letter subject: every dead
    /// letter would be refused, and its original never acknowledged.
    pub async fn check(&self) -> Result<(), LetterError> {
        self.js
            .stream_by_subject(self.subject.clone())
            .await
            .map(|_| ())
            .map_err(|source| LetterError::NoStream {
                subject: self.subject.clone(),
                source,
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

/// Where a consumer's max-deliveries advisories are read from.
pub enum Advisories {
    /// Kept in a work-queue stream of the engine's own until dead-lettered.
    Kept(Box<PullConsumer>),
    /// Received as they are published: the account would not let the engine
    /// keep them (no permission, or another stream captures the subject).
    Live,
}

/// Why the advisories could not be kept in a stream of the engine's own.
#[derive(Debug, thiserror::Error)]
enum KeepError {
    #[error("the advisories' stream: {0}")]
    Stream(#[source] jetstream::context::CreateStreamError),
    #[error("the advisories' consumer: {0}")]
    Consumer(#[source] jetstream::stream::ConsumerError),
}

/// How long kept advisories wait for an engine to dead-letter them.
const ADVISORIES_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
/// The durable that reads kept advisories (every version and process of the
/// pipeline shares it; the letters' `Nats-Msg-Id` absorbs a second reader).
const ADVISORIES_DURABLE: &str = "ingestd";

fn advisory_subject(stream: &str, durable: &str) -> String {
    format!("$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{stream}.{durable}")
}

/// Ensures the stream that keeps the consumer's max-deliveries advisories
/// (as replicated as the source stream) and its reader; falls back to live
/// advisories, with a warning, where the account does not allow it.
pub async fn capture_advisories(
    js: &jetstream::Context,
    source: &Stream,
    durable: &str,
) -> Advisories {
    let config = &source.cached_info().config;
    let name = format!("INGESTD_MAX_DELIVERIES_{}_{durable}", config.name);
    let kept = async {
        let stream = js
            .get_or_create_stream(jetstream::stream::Config {
                name: name.clone(),
                subjects: vec![advisory_subject(&config.name, durable)],
                retention: jetstream::stream::RetentionPolicy::WorkQueue,
                max_age: ADVISORIES_MAX_AGE,
                num_replicas: config.num_replicas,
                description: Some(format!(
                    "ingestd: max-deliveries advisories of {}/{durable} until dead-lettered",
                    config.name
                )),
                ..Default::default()
            })
            .await
            .map_err(KeepError::Stream)?;
        stream
            .get_or_create_consumer(
                ADVISORIES_DURABLE,
                jetstream::consumer::pull::Config {
                    durable_name: Some(ADVISORIES_DURABLE.into()),
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    ..Default::default()
                },
            )
            .await
            .map_err(KeepError::Consumer)
    };
    match kept.await {
        Ok(consumer) => Advisories::Kept(Box::new(consumer)),
        Err(error) => {
            tracing::warn!(stream = %name, %error,
                "cannot keep max-deliveries advisories in a stream; reading them live (those published while the engine is away are missed)");
            Advisories::Live
        }
    }
}

/// How many kept advisories one request asks for, and how long it waits.
const ADVISORY_BATCH: (usize, Duration) = (64, Duration::from_secs(5));
/// First and longest pause after the advisories could not be read.
const ADVISORY_BACKOFF: (Duration, Duration) = (Duration::from_millis(200), Duration::from_secs(5));

/// Turns each advisory into a letter for the outbox, until `stop` is
/// cancelled; with an exactly-once ledger in `sink`, each letter's message
/// is recorded there as dead-lettered first (so `ingestd audit` does not
/// count it missing).
pub(super) async fn watch_max_deliveries(
    advisories: Advisories,
    letters: DeadLetters,
    source: Stream,
    durable: String,
    outbox: Outbox,
    sink: Arc<PgSink>,
    stop: CancellationToken,
) {
    let reader = AdvisoryReader {
        stream_name: source.cached_info().config.name.clone(),
        source,
        pipeline: letters.pipeline.clone(),
        outbox,
        sink,
    };
    match advisories {
        Advisories::Kept(consumer) => reader.kept(consumer, &stop).await,
        Advisories::Live => reader.live(&letters, &durable, &stop).await,
    }
}

/// Reads advisories and hands their letters to the outbox.
struct AdvisoryReader {
    source: Stream,
    stream_name: String,
    pipeline: String,
    outbox: Outbox,
    sink: Arc<PgSink>,
}

impl AdvisoryReader {
    async fn kept(&self, consumer: Box<PullConsumer>, stop: &CancellationToken) {
        let mut backoff = Backoff::new(ADVISORY_BACKOFF);
        loop {
            let batch = consumer
                .batch()
                .max_messages(ADVISORY_BATCH.0)
                .expires(ADVISORY_BATCH.1)
                .messages();
            let batch = tokio::select! {
                _ = stop.cancelled() => return,
                b = batch => b,
            };
            let mut batch = match batch {
                Ok(b) => b,
                Err(error) => {
                    tracing::warn!(pipeline = %self.pipeline, %error, "cannot read kept max-deliveries advisories; retrying");
                    if stopped_within(stop, backoff.pause()).await {
                        return;
                    }
                    continue;
                }
            };
            backoff.reset();
            loop {
                let next = tokio::select! {
                    _ = stop.cancelled() => return,
                    n = batch.next() => n,
                };
                match next {
                    Some(Ok(msg)) => self.kept_advisory(msg).await,
                    Some(Err(error)) => {
                        tracing::debug!(pipeline = %self.pipeline, %error, "advisory request ended");
                        break;
                    }
                    None => break,
                }
            }
        }
    }

    /// Posts a kept advisory's letter; the advisory itself is acknowledged
    /// by the outbox once the letter is confirmed.
    async fn kept_advisory(&self, msg: Message) {
        let Ok(adv) = serde_json::from_slice::<MaxDeliveries>(&msg.payload) else {
            tracing::warn!(pipeline = %self.pipeline, "unreadable max-deliveries advisory dropped");
            let _ = msg.ack().await;
            return;
        };
        match self.letter(&adv).await {
            Ok(Some(letter)) => {
                self.record(&letter).await;
                self.outbox.post(Parcel::advisory(msg, letter)).await
            }
            Ok(None) => {
                let _ = msg.ack().await;
            }
            Err(error) => {
                tracing::warn!(pipeline = %self.pipeline, stream_seq = adv.stream_seq, %error,
                    "cannot read the message that reached max_deliver; the advisory is read again");
                let _ = msg.ack_with(AckKind::Nak(Some(ADVISORY_BACKOFF.1))).await;
            }
        }
    }

    async fn live(&self, letters: &DeadLetters, durable: &str, stop: &CancellationToken) {
        let advisory = advisory_subject(&self.stream_name, durable);
        let mut sub = match letters.js.client().subscribe(advisory.clone()).await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, %advisory, "cannot watch max-deliveries advisories");
                return;
            }
        };
        loop {
            let msg = tokio::select! {
                _ = stop.cancelled() => return,
                m = sub.next() => match m { Some(m) => m, None => return },
            };
            let Ok(adv) = serde_json::from_slice::<MaxDeliveries>(&msg.payload) else {
                continue;
            };
            match self.letter(&adv).await {
                Ok(Some(letter)) => {
                    self.record(&letter).await;
                    self.outbox.post(Parcel::unacknowledged(letter)).await
                }
                Ok(None) => {}
                Err(error) => {
                    tracing::error!(pipeline = %self.pipeline, stream_seq = adv.stream_seq, %error,
                        "message reached max_deliver and could not be dead-lettered");
                }
            }
        }
    }

    /// Records the letter's message in the exactly-once ledger (if any) as
    /// dead-lettered. A failure is logged, not held: the message then shows
    /// as missing in `ingestd audit`, whose repair settles it again.
    async fn record(&self, letter: &Letter) {
        if let Err(error) = self
            .sink
            .record(letter.stream_seq, Entry::DeadLettered)
            .await
        {
            tracing::warn!(pipeline = %self.pipeline, seq = letter.stream_seq, %error,
                "could not record a max_deliver letter in the exactly-once ledger; `ingestd audit` will report it missing");
        }
    }

    /// The letter for an advisory's message; none when the stream no longer
    /// holds it (its limits removed it).
    async fn letter(
        &self,
        adv: &MaxDeliveries,
    ) -> Result<Option<Letter>, async_nats::jetstream::stream::RawMessageError> {
        let m = match self.source.get_raw_message(adv.stream_seq).await {
            Ok(m) => m,
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => {
                tracing::warn!(pipeline = %self.pipeline, stream_seq = adv.stream_seq,
                    "a message reached max_deliver but the stream no longer holds it: no dead letter");
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        tracing::warn!(pipeline = %self.pipeline, stream_seq = adv.stream_seq, deliveries = adv.deliveries,
            "message reached max_deliver: dead-lettering it");
        Ok(Some(Letter {
            payload: m.payload,
            headers: Some(m.headers),
            subject: m.subject.to_string(),
            stream: self.stream_name.clone(),
            stream_seq: adv.stream_seq,
            delivered: adv.deliveries,
            reason: Reason::MaxDeliver,
            error: "JetStream stopped redelivering: max_deliver reached".into(),
        }))
    }
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
