//! Ensuring the stream and the durable consumer a pipeline reads: created
//! when missing, the consumer updated to match the file.

use super::*;

/// Why a stream or consumer could not be ensured, and whether trying again
/// later may succeed (NATS did not answer) or the file must change.
#[derive(Debug, thiserror::Error)]
#[error("{error:#}")]
pub struct EnsureError {
    error: anyhow::Error,
    transient: bool,
}

impl EnsureError {
    pub fn is_transient(&self) -> bool {
        self.transient
    }

    fn new(transient: bool, error: anyhow::Error) -> Self {
        Self { error, transient }
    }
}

/// A JetStream error passes by itself when its code is 503: the server is
/// unavailable (no quorum, JetStream starting), not refusing the request.
const UNAVAILABLE: usize = 503;

fn stream_transient(e: &jetstream::context::CreateStreamError) -> bool {
    use jetstream::context::CreateStreamErrorKind as K;
    match e.kind() {
        K::JetStreamUnavailable | K::TimedOut => true,
        K::JetStream(js) => js.code() == UNAVAILABLE,
        _ => false,
    }
}

fn request_transient(e: &jetstream::context::RequestError) -> bool {
    use jetstream::context::RequestErrorKind as K;
    matches!(e.kind(), K::NoResponders | K::TimedOut | K::Other)
}

fn consumer_transient(e: &jetstream::stream::ConsumerError) -> bool {
    use jetstream::stream::ConsumerErrorKind as K;
    match e.kind() {
        K::TimedOut | K::Request => true,
        K::JetStream(js) => js.code() == UNAVAILABLE,
        _ => false,
    }
}

/// Ensures the stream (created when missing, used as is when present, but
/// refused when its subjects do not cover the consumer's filter) and the
/// durable consumer (created, or its settings updated to the file's).
pub async fn ensure(
    js: &jetstream::Context,
    s: &StreamConfig,
    c: &ConsumerConfig,
    max_ack_pending: i64,
) -> Result<(stream::Stream, PullConsumer), EnsureError> {
    let mut stream = js
        .get_or_create_stream(stream_config(s))
        .await
        .map_err(|e| {
            let transient = stream_transient(&e);
            EnsureError::new(
                transient,
                anyhow::Error::new(e).context(format!("cannot ensure stream {}", s.name)),
            )
        })?;
    let info = stream.info().await.map_err(|e| {
        let transient = request_transient(&e);
        EnsureError::new(
            transient,
            anyhow::Error::new(e).context(format!("stream {}", s.name)),
        )
    })?;
    // Servers before 2.10 refuse such a consumer, later ones accept it and
    // deliver nothing: refuse it on every version.
    if !info
        .config
        .subjects
        .iter()
        .any(|p| subject_covers(p, &c.filter_subject))
    {
        return Err(EnsureError::new(
            false,
            anyhow::anyhow!(
                "the existing stream {} has subjects {:?}, which do not cover the consumer's filter {}: \
                 it would receive nothing",
                s.name,
                info.config.subjects,
                c.filter_subject
            ),
        ));
    }
    let consumer = stream
        .create_consumer(consumer_config(c, max_ack_pending))
        .await
        .map_err(|e| {
            let transient = consumer_transient(&e);
            EnsureError::new(
                transient,
                anyhow::Error::new(e).context(format!(
                    "cannot create or update consumer {} on stream {}",
                    c.durable, s.name
                )),
            )
        })?;
    Ok((stream, consumer))
}

fn stream_config(s: &StreamConfig) -> stream::Config {
    stream::Config {
        name: s.name.clone(),
        subjects: s.subjects.clone(),
        retention: match s.retention {
            config::Retention::Limits => stream::RetentionPolicy::Limits,
            config::Retention::Interest => stream::RetentionPolicy::Interest,
            config::Retention::WorkQueue => stream::RetentionPolicy::WorkQueue,
        },
        max_age: s.max_age.unwrap_or_default(),
        max_messages: s.max_messages.unwrap_or(-1),
        max_bytes: s.max_bytes.map_or(-1, |b| b as i64),
        discard: match s.discard {
            config::Discard::Old => stream::DiscardPolicy::Old,
            config::Discard::New => stream::DiscardPolicy::New,
        },
        storage: match s.storage {
            config::Storage::File => stream::StorageType::File,
            config::Storage::Memory => stream::StorageType::Memory,
        },
        num_replicas: s.replicas,
        duplicate_window: s.duplicate_window.unwrap_or_default(),
        ..Default::default()
    }
}

fn consumer_config(c: &ConsumerConfig, max_ack_pending: i64) -> pull::Config {
    use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy};
    pull::Config {
        durable_name: Some(c.durable.clone()),
        name: Some(c.durable.clone()),
        filter_subject: c.filter_subject.clone(),
        deliver_policy: match c.deliver_policy {
            config::DeliverPolicy::All => DeliverPolicy::All,
            config::DeliverPolicy::Last => DeliverPolicy::Last,
            config::DeliverPolicy::New => DeliverPolicy::New,
            config::DeliverPolicy::LastPerSubject => DeliverPolicy::LastPerSubject,
            config::DeliverPolicy::ByStartSequence => DeliverPolicy::ByStartSequence {
                start_sequence: c.start_sequence.unwrap_or(1),
            },
            config::DeliverPolicy::ByStartTime => DeliverPolicy::ByStartTime {
                start_time: c.start_time.unwrap_or(time::OffsetDateTime::UNIX_EPOCH),
            },
        },
        ack_policy: match c.ack_policy {
            config::AckPolicy::Explicit => AckPolicy::Explicit,
        },
        ack_wait: c.ack_wait,
        max_deliver: c.max_deliver,
        max_ack_pending,
        ..Default::default()
    }
}

/// True when every subject matched by `filter` is matched by `pattern`
/// (both may hold `*` and `>` wildcards).
pub fn subject_covers(pattern: &str, filter: &str) -> bool {
    let mut f = filter.split('.');
    for p in pattern.split('.') {
        match (p, f.next()) {
            (">", Some(_)) => return true,
            ("*", Some(t)) if t != ">" => {}
            (lit, Some(t)) if lit == t && t != "*" && t != ">" => {}
            _ => return false,
        }
    }
    f.next().is_none()
}
