//! `ingestd replay`: re-publishes dead letters to the subjects their events
//! came from, once the cause is fixed (a relaxed schema, a created table).
//!
//! Safe to interrupt and run again: a letter is deleted from the dead-letter
//! stream only after JetStream confirmed its re-publish, and every
//! re-publish carries `Nats-Msg-Id: ingestd-replay:<stream>:<sequence>`, so
//! a letter re-published twice within the original stream's duplicate
//! window is stored once (and after it, an idempotent insert stores its row
//! once). Only the letters present when the replay starts are read: a
//! replayed event that fails again becomes a new letter, left for the next
//! run instead of looping.

use async_nats::jetstream::{self, consumer::pull, stream::Stream, Message};
use async_nats::HeaderMap;
use futures::StreamExt;
use time::OffsetDateTime;

use crate::config;
use crate::config::reason::Reason;
use crate::source::nats::{self, NatsOptions};

/// How long to wait for the next letter of those counted at start.
const NEXT_LETTER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(clap::Args)]
pub struct Args {
    /// The dead-letter subject (a pipeline's `on_error.invalid.subject`;
    /// wildcards allowed): its stream holds the letters.
    #[arg(long)]
    pub dead_letters: String,
    /// Only letters of this pipeline (`Ingestd-Pipeline`).
    #[arg(long)]
    pub pipeline: Option<String>,
    /// Only letters with this reason (`Ingestd-Reason`, e.g. `schema`, `max_deliver`).
    #[arg(long)]
    pub reason: Option<Reason>,
    /// Only letters whose original subject matches (wildcards allowed).
    #[arg(long)]
    pub subject: Option<String>,
    /// Only letters dead-lettered at or after this time (RFC 3339).
    #[arg(long, value_parser = config::parse_time)]
    pub since: Option<OffsetDateTime>,
    /// Only letters dead-lettered before this time (RFC 3339).
    #[arg(long, value_parser = config::parse_time)]
    pub until: Option<OffsetDateTime>,
    /// Print what would be re-published; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub nats: NatsOptions,
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("{0:#}")]
    Setup(anyhow::Error),
    #[error("no stream captures the dead-letter subject `{subject}`: {source}")]
    NoStream {
        subject: String,
        #[source]
        source: jetstream::context::GetStreamByNameError,
    },
    /// Any of the client's errors while reading the stream (each call has
    /// its own error type; what matters is where it happened).
    #[error("reading the dead letters: {0}")]
    Read(#[source] async_nats::Error),
    #[error("reading the dead letters: the dead-letter stream stopped answering")]
    Stalled,
    #[error("dead letter {seq}: re-publish to {subject} not confirmed: {source}")]
    Publish {
        seq: u64,
        subject: String,
        #[source]
        source: jetstream::context::PublishError,
    },
    #[error("dead letter {seq} was re-published but could not be deleted: {source}")]
    Delete {
        seq: u64,
        #[source]
        source: jetstream::stream::DeleteMessageError,
    },
}

/// Counts printed at the end.
#[derive(Debug, Default)]
pub struct Counts {
    pub replayed: u64,
    /// Letters the filters left out.
    pub skipped: u64,
    /// Messages on the subject without the dead-letter headers.
    pub not_letters: u64,
}

/// What a dead letter says about its event.
struct Letter {
    seq: u64,
    pipeline: String,
    /// None for a reason this version does not know (a newer engine's).
    reason: Option<Reason>,
    subject: String,
    dead_lettered: OffsetDateTime,
}

pub fn main(args: Args) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let counts = rt.block_on(run(&args))?;
    let verb = if args.dry_run {
        "would be replayed"
    } else {
        "replayed"
    };
    println!(
        "{} {verb}, {} skipped by the filters, {} not dead letters",
        counts.replayed, counts.skipped, counts.not_letters
    );
    Ok(())
}

pub async fn run(args: &Args) -> Result<Counts, ReplayError> {
    let metrics =
        std::sync::Arc::new(crate::telemetry::metrics::Metrics::new().map_err(ReplayError::Setup)?);
    let client = nats::connect(&args.nats, "ingestd-replay", metrics)
        .await
        .map_err(ReplayError::Setup)?;
    let js = jetstream::new(client);
    let stream = js
        .get_stream(stream_of(&js, &args.dead_letters).await?)
        .await
        .map_err(read)?;
    let last = stream.cached_info().state.last_sequence;
    let mut consumer = stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: args.dead_letters.clone(),
            ..Default::default()
        })
        .await
        .map_err(read)?;
    let mut left = consumer.info().await.map_err(read)?.num_pending;
    let mut messages = consumer.messages().await.map_err(read)?;
    let mut counts = Counts::default();
    while left > 0 {
        let next = tokio::time::timeout(NEXT_LETTER_TIMEOUT, messages.next()).await;
        let msg = match next {
            Ok(Some(Ok(m))) => m,
            Ok(Some(Err(e))) => return Err(read(e)),
            Ok(None) | Err(_) => return Err(ReplayError::Stalled),
        };
        let info = msg.info().map_err(ReplayError::Read)?;
        if info.stream_sequence > last {
            break; // dead-lettered since the start (maybe by this replay)
        }
        left = info.pending;
        let Some(letter) = Letter::read(&msg, info.stream_sequence, info.published) else {
            counts.not_letters += 1;
            continue;
        };
        if !args.selects(&letter) {
            counts.skipped += 1;
            continue;
        }
        println!(
            "{} dead letter {} of pipeline {} ({}) to {}",
            if args.dry_run {
                "would replay"
            } else {
                "replay"
            },
            letter.seq,
            letter.pipeline,
            letter.reason.map_or("?", Reason::as_str),
            letter.subject
        );
        if !args.dry_run {
            replay(&js, &stream, &msg, &letter).await?;
        }
        counts.replayed += 1;
    }
    Ok(counts)
}

/// A client error met while reading the dead letters.
fn read(e: impl std::error::Error + Send + Sync + 'static) -> ReplayError {
    ReplayError::Read(Box::new(e))
}

async fn stream_of(js: &jetstream::Context, subject: &str) -> Result<String, ReplayError> {
    js.stream_by_subject(subject.to_string())
        .await
        .map_err(|source| ReplayError::NoStream {
            subject: subject.to_string(),
            source,
        })
}

impl Args {
    fn selects(&self, letter: &Letter) -> bool {
        let is = |want: &Option<String>, have: &str| want.as_deref().is_none_or(|w| w == have);
        is(&self.pipeline, &letter.pipeline)
            && self.reason.is_none_or(|r| letter.reason == Some(r))
            && self
                .subject
                .as_deref()
                .is_none_or(|s| nats::subject_covers(s, &letter.subject))
            && self.since.is_none_or(|t| letter.dead_lettered >= t)
            && self.until.is_none_or(|t| letter.dead_lettered < t)
    }
}

impl Letter {
    /// None for a message without the dead-letter headers.
    fn read(msg: &Message, seq: u64, published: time::OffsetDateTime) -> Option<Self> {
        let headers = msg.headers.as_ref()?;
        let get = |name: &str| headers.get(name).map(|v| v.to_string());
        Some(Self {
            seq,
            pipeline: get("Ingestd-Pipeline")?,
            reason: get("Ingestd-Reason").and_then(|r| r.parse().ok()),
            subject: get("Ingestd-Subject")?,
            dead_lettered: published,
        })
    }
}

/// Re-publishes one letter, waits for JetStream to confirm it, then deletes
/// the letter.
async fn replay(
    js: &jetstream::Context,
    stream: &Stream,
    msg: &Message,
    letter: &Letter,
) -> Result<(), ReplayError> {
    let name = &stream.cached_info().config.name;
    let mut headers = original_headers(msg.headers.as_ref());
    let id = format!("ingestd-replay:{name}:{}", letter.seq);
    headers.insert("Nats-Msg-Id", id.as_str());
    let failed = |source| ReplayError::Publish {
        seq: letter.seq,
        subject: letter.subject.clone(),
        source,
    };
    js.publish_with_headers(letter.subject.clone(), headers, msg.payload.clone())
        .await
        .map_err(failed)?
        .await
        .map_err(failed)?;
    stream
        .delete_message(letter.seq)
        .await
        .map(|_| ())
        .map_err(|source| ReplayError::Delete {
            seq: letter.seq,
            source,
        })
}

/// The letter's headers without the dead-letter ones (`Ingestd-*`) and
/// without JetStream control headers (`Nats-*`: the letter's own id, and
/// conditions meant for the dead-letter stream). The original's control
/// headers stay under `Original-*`, for information only.
fn original_headers(letter: Option<&HeaderMap>) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (name, values) in letter.into_iter().flat_map(|h| h.iter()) {
        let name = name.to_string();
        let lower = name.to_ascii_lowercase();
        if lower.starts_with("ingestd-") || lower.starts_with("nats-") {
            continue;
        }
        for value in values {
            headers.append(name.as_str(), value.as_str());
        }
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(at: &str) -> Letter {
        Letter {
            seq: 7,
            pipeline: "tiktok".into(),
            reason: Some(Reason::Schema),
            subject: "raw.events.tiktok.top.like".into(),
            dead_lettered: config::parse_time(at).unwrap(),
        }
    }

    fn args(argv: &[&str]) -> Args {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: Args,
        }
        let mut all = vec!["replay", "--dead-letters", "dlq"];
        all.extend_from_slice(argv);
        <Cli as clap::Parser>::parse_from(all).args
    }

    #[test]
    fn filters_select_by_pipeline_reason_subject_and_time() {
        let l = letter("2026-11-25T12:00:00Z");
        assert!(args(&[]).selects(&l));
        assert!(args(&["--pipeline", "tiktok", "--reason", "schema"]).selects(&l));
        assert!(!args(&["--pipeline", "facebook"]).selects(&l));
        assert!(!args(&["--reason", "not_json"]).selects(&l));
        assert!(args(&["--subject", "raw.events.tiktok.>"]).selects(&l));
        assert!(!args(&["--subject", "raw.events.tiktok.bottom.>"]).selects(&l));
        assert!(args(&["--since", "2026-11-25T12:00:00Z"]).selects(&l));
        assert!(!args(&["--until", "2026-11-25T12:00:00Z"]).selects(&l));
        assert!(!args(&[
            "--since",
            "2026-11-25T13:00:00+01:00",
            "--until",
            "2026-11-25T11:00:00Z"
        ])
        .selects(&l));
    }

    #[test]
    fn replayed_headers_drop_dead_letter_and_control_headers() {
        let mut letter = HeaderMap::new();
        letter.insert("Nats-Msg-Id", "S:1");
        letter.insert("Ingestd-Reason", "schema");
        letter.insert("Original-Nats-Msg-Id", "abc");
        letter.insert("Trace-Id", "t1");
        let kept = original_headers(Some(&letter));
        let names: Vec<String> = kept.iter().map(|(n, _)| n.to_string()).collect();
        let mut names = names;
        names.sort();
        assert_eq!(names, ["Original-Nats-Msg-Id", "Trace-Id"]);
    }
}
