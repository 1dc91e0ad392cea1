//! NATS JetStream: the connection, stream and consumer set-up, and the
//! puller that feeds batches.
//!
//! Pulling uses explicit pull requests of at most one batch, never an
//! open-ended subscription: what has been delivered to the engine is exactly
//! what it holds, so while the sink is down it can keep every held message
//! alive with progress acks and ask for no more.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::consumer::{pull, PullConsumer};
use async_nats::jetstream::{self, stream, Message};
use futures::{FutureExt, StreamExt};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::config::{self, ConsumerConfig, StreamConfig, REQUESTS_AHEAD};
use crate::telemetry::health::{Health, Severity, Side};
use crate::telemetry::metrics::Metrics;

/// How long one pull request waits on the server for messages. A request
/// cannot be cancelled, so this bounds how long a stopping pipeline drains
/// its open request (it processes those messages rather than dropping them
/// into a closed inbox, where they would wait out the ack wait).
const PULL_EXPIRES: Duration = Duration::from_secs(1);

/// How long after its expiry a pull request is still read: the server's
/// last messages and timeout reply arrive well within it.
const EXPIRY_GRACE: Duration = Duration::from_millis(250);

/// NATS credentials and TLS, from the environment (or flags). Secrets are
/// never logged: `Debug` is not derived.
#[derive(clap::Args, Clone, Default)]
pub struct NatsAuth {
    /// User name (with --nats-password).
    #[arg(long, env = "NATS_USER")]
    pub nats_user: Option<String>,
    #[arg(long, env = "NATS_PASSWORD", hide_env_values = true)]
    pub nats_password: Option<String>,
    #[arg(long, env = "NATS_TOKEN", hide_env_values = true)]
    pub nats_token: Option<String>,
    /// NKey seed.
    #[arg(long, env = "NATS_NKEY", hide_env_values = true)]
    pub nats_nkey: Option<String>,
    /// Credentials file (JWT and NKey seed).
    #[arg(long, env = "NATS_CREDS")]
    pub nats_creds: Option<std::path::PathBuf>,
    /// CA certificate (PEM) to verify the server.
    #[arg(long, env = "NATS_TLS_CA")]
    pub nats_tls_ca: Option<std::path::PathBuf>,
    /// Client certificate (PEM), with --nats-tls-key.
    #[arg(long, env = "NATS_TLS_CERT")]
    pub nats_tls_cert: Option<std::path::PathBuf>,
    #[arg(long, env = "NATS_TLS_KEY")]
    pub nats_tls_key: Option<std::path::PathBuf>,
    /// Refuse to connect without TLS (implied by a CA or client certificate).
    #[arg(long, env = "NATS_TLS_REQUIRED")]
    pub nats_tls_required: bool,
}

impl NatsAuth {
    async fn apply(
        &self,
        mut o: async_nats::ConnectOptions,
    ) -> anyhow::Result<async_nats::ConnectOptions> {
        if let Some(path) = &self.nats_creds {
            o = o
                .credentials_file(path)
                .await
                .with_context(|| format!("cannot read NATS credentials file {}", path.display()))?;
        }
        if let (Some(user), Some(pass)) = (&self.nats_user, &self.nats_password) {
            o = o.user_and_password(user.clone(), pass.clone());
        }
        if let Some(token) = &self.nats_token {
            o = o.token(token.clone());
        }
        if let Some(seed) = &self.nats_nkey {
            o = o.nkey(seed.clone());
        }
        if let Some(ca) = &self.nats_tls_ca {
            o = o.add_root_certificates(ca.clone());
        }
        if let (Some(cert), Some(key)) = (&self.nats_tls_cert, &self.nats_tls_key) {
            o = o.add_client_certificate(cert.clone(), key.clone());
        }
        // Trusting a CA or presenting a certificate means TLS is intended:
        // never fall back to plain text.
        let tls =
            self.nats_tls_required || self.nats_tls_ca.is_some() || self.nats_tls_cert.is_some();
        Ok(o.require_tls(tls))
    }
}

/// Connects with the collector's options: reconnect forever, 1 s apart,
/// 10 s connect timeout, ping every 20 s. The connection gauge follows the
/// client's events.
pub async fn connect(
    url: &str,
    name: &str,
    auth: &NatsAuth,
    metrics: Arc<Metrics>,
) -> anyhow::Result<async_nats::Client> {
    let events = metrics.clone();
    let (url, from_url) = split_credentials(url);
    let mut options = auth.apply(async_nats::ConnectOptions::new()).await?;
    match from_url {
        Some((user, Some(pass))) => options = options.user_and_password(user, pass),
        Some((token, None)) => options = options.token(token),
        None => {}
    }
    let url = url.as_str();
    let client = options
        .name(name)
        .max_reconnects(None)
        .reconnect_delay_callback(reconnect_delay)
        .connection_timeout(Duration::from_secs(10))
        .ping_interval(Duration::from_secs(20))
        .event_callback(move |event| {
            let metrics = events.clone();
            async move {
                match event {
                    async_nats::Event::Connected => {
                        tracing::info!("NATS connected");
                        metrics.set_nats_connected(true);
                    }
                    async_nats::Event::Disconnected => {
                        tracing::warn!("NATS disconnected; reconnecting");
                        metrics.set_nats_connected(false);
                    }
                    other => tracing::info!(event = %other, "NATS event"),
                }
            }
        })
        .connect(url)
        .await
        .with_context(|| {
            format!(
                "cannot connect to NATS at {}",
                crate::util::redact::url(url)
            )
        })?;
    Ok(client)
}

/// Ensures the stream (created when missing, used as is when present, but
/// refused when its subjects do not cover the consumer's filter) and the
/// durable consumer (created, or its settings updated to the file's).
pub async fn ensure(
    js: &jetstream::Context,
    s: &StreamConfig,
    c: &ConsumerConfig,
    max_ack_pending: i64,
) -> anyhow::Result<(stream::Stream, PullConsumer)> {
    let mut stream = js
        .get_or_create_stream(stream_config(s))
        .await
        .with_context(|| format!("cannot ensure stream {}", s.name))?;
    let info = stream
        .info()
        .await
        .with_context(|| format!("stream {}", s.name))?;
    // Servers before 2.10 refuse such a consumer, later ones accept it and
    // deliver nothing: refuse it on every version.
    anyhow::ensure!(
        info.config
            .subjects
            .iter()
            .any(|p| subject_covers(p, &c.filter_subject)),
        "the existing stream {} has subjects {:?}, which do not cover the consumer's filter {}: \
         it would receive nothing",
        s.name,
        info.config.subjects,
        c.filter_subject
    );
    let consumer = stream
        .create_consumer(consumer_config(c, max_ack_pending))
        .await
        .with_context(|| {
            format!(
                "cannot create or update consumer {} on stream {}",
                c.durable, s.name
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
                start_time: offset_time(c.start_time.unwrap_or_default()),
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

/// Takes `user:password@` (or `token@`) out of the server URLs and returns
/// them apart: passed in the URL, async-nats would print them in its debug
/// logs.
/// A JetStream time for a consumer's start.
pub fn offset_time(t: chrono::DateTime<chrono::Utc>) -> time::OffsetDateTime {
    let nanos = t.timestamp_nanos_opt().unwrap_or_default();
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(nanos))
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

fn split_credentials(urls: &str) -> (String, Option<(String, Option<String>)>) {
    let mut credentials = None;
    let cleaned: Vec<String> = urls
        .split(',')
        .map(|one| match url::Url::parse(one.trim()) {
            Ok(mut u) if !u.username().is_empty() => {
                let user = percent_decode(u.username());
                let pass = u.password().map(percent_decode);
                credentials.get_or_insert((user, pass));
                let _ = u.set_username("");
                let _ = u.set_password(None);
                u.to_string().trim_end_matches('/').to_string()
            }
            _ => one.trim().to_string(),
        })
        .collect();
    (cleaned.join(","), credentials)
}

fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// 1 s between reconnection attempts, as the collector; async-nats also
/// asks before the very first attempt, which must not wait.
fn reconnect_delay(attempt: usize) -> Duration {
    if attempt <= 1 {
        Duration::ZERO
    } else {
        Duration::from_secs(1)
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

/// Delivers messages from bounded pull requests ([`REQUESTS_AHEAD`] of
/// at most `batch` messages and `max_bytes` bytes each). Messages delivered
/// while the pipeline is busy are buffered here, so the pipeline can keep
/// them alive.
pub struct Puller {
    consumer: PullConsumer,
    batch: usize,
    max_bytes: usize,
    requests: VecDeque<Request>,
    buffered: VecDeque<Message>,
    watch: SourceWatch,
}

/// An open pull request.
struct Request {
    batch: jetstream::consumer::pull::Batch,
    /// When the server expires it.
    expires: Instant,
    /// Messages it delivered so far.
    delivered: usize,
}

/// What a stopping pipeline version hands to its successor on the same
/// consumer: its open pull requests and the messages they delivered that it
/// has not taken. JetStream keeps serving those requests for up to
/// [`PULL_EXPIRES`]; whoever reads them must be the version that is
/// running, or events published just after a reload would meet the old
/// rules.
///
/// A version stopped before its own predecessor handed over passes that
/// predecessor's channel on (`pending`), so back-to-back reloads form a
/// chain that ends at the running version.
pub struct Handoff {
    requests: VecDeque<Request>,
    buffered: VecDeque<Message>,
    pending: Option<mpsc::UnboundedReceiver<Handoff>>,
}

/// What a pipeline pulls from, so that a consumer or stream deleted (or
/// changed) under a running engine is recreated through the same path as a
/// load ([`ensure`]).
#[derive(Clone)]
pub struct Target {
    pub js: jetstream::Context,
    pub stream: StreamConfig,
    pub consumer: ConsumerConfig,
    pub max_ack_pending: i64,
}

/// Longest pause between two repairs of a source the server keeps
/// rejecting: a rejected pull must not loop hot.
const REPAIR_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// A pull request that ends this long before its expiry without delivering
/// anything was refused by the server (a 404 the client reads as "no
/// messages").
const EARLY_END: Duration = Duration::from_millis(500);

/// The source side's health: pull errors are problems, their repair is
/// [`ensure`] with backoff.
struct SourceWatch {
    target: Target,
    health: Arc<Health>,
    pipeline: String,
    /// The last pull error, not yet repaired.
    trouble: Option<String>,
    /// Wait before the next repair (zero for the first one).
    backoff: Duration,
}

impl SourceWatch {
    /// A pull worked: the source is fine again.
    fn healthy(&mut self) {
        if self.backoff.is_zero() {
            return;
        }
        self.backoff = Duration::ZERO;
        if self.health.recover(Side::Source) {
            tracing::info!(pipeline = %self.pipeline, "pulling again");
        }
    }

    /// Reports the pending trouble, waits out the backoff and ensures the
    /// stream and consumer. Returns the new consumer, or None (trouble kept)
    /// when `deadline` comes first or the repair failed.
    async fn repair(&mut self, deadline: Option<Instant>) -> Option<PullConsumer> {
        let error = self.trouble.clone()?;
        let wake = Instant::now() + self.backoff;
        if deadline.is_some_and(|d| d < wake) {
            return None;
        }
        if self.health.fail(Side::Source, Severity::Failing, &error) {
            tracing::warn!(pipeline = %self.pipeline, %error,
                "cannot pull: the consumer or stream is gone or refuses; recreating them");
        }
        tokio::time::sleep_until(wake).await;
        self.backoff = (self.backoff * 2).clamp(Duration::from_millis(200), REPAIR_BACKOFF_MAX);
        let t = &self.target;
        match ensure(&t.js, &t.stream, &t.consumer, t.max_ack_pending).await {
            Ok((_, consumer)) => {
                self.trouble = None;
                Some(consumer)
            }
            Err(e) => {
                let error = format!("{e:#}");
                self.health.fail(Side::Source, Severity::Failing, &error);
                self.trouble = Some(error);
                None
            }
        }
    }
}

/// Why a pull request ended with an error, or None for the normal end of a
/// request whose next message would exceed its `max_bytes`.
fn pull_trouble(error: &str, delivered: usize) -> Option<String> {
    let size_limit = error.contains("Message Size Exceeds MaxBytes");
    match (size_limit, delivered) {
        (true, 0) => Some(format!(
            "{error} (a message is larger than a whole pull request)"
        )),
        (true, _) => None,
        (false, _) => Some(error.to_string()),
    }
}

impl Puller {
    pub fn new(
        consumer: PullConsumer,
        batch: usize,
        max_bytes: usize,
        target: Target,
        health: Arc<Health>,
        pipeline: &str,
    ) -> Self {
        Self {
            consumer,
            batch,
            max_bytes,
            requests: VecDeque::new(),
            buffered: VecDeque::new(),
            watch: SourceWatch {
                target,
                health,
                pipeline: pipeline.to_string(),
                trouble: None,
                backoff: Duration::ZERO,
            },
        }
    }

    /// The next message, keeping [`REQUESTS_AHEAD`] requests open; None when
    /// `deadline` passes first.
    pub async fn next(&mut self, deadline: Option<Instant>) -> Option<Message> {
        loop {
            if let Some(m) = self.buffered.pop_front() {
                return Some(m);
            }
            self.top_up(deadline).await;
            if self.requests.is_empty() {
                if deadline.is_some() {
                    return None;
                }
                continue; // a failed repair: the next one waits its backoff
            }
            match deadline {
                Some(d) => tokio::time::timeout_at(d, self.drain_open()).await.ok()?,
                None => self.drain_open().await,
            }
        }
    }

    /// Repairs the source if a pull failed, then opens requests until
    /// [`REQUESTS_AHEAD`] are open. When none is open and NATS refuses
    /// (down), retries every second until `deadline`.
    async fn top_up(&mut self, deadline: Option<Instant>) {
        if self.watch.trouble.is_some() {
            match self.watch.repair(deadline).await {
                Some(consumer) => self.consumer = consumer,
                None => return,
            }
        }
        while self.requests.len() < REQUESTS_AHEAD {
            match self.open_request().await {
                Ok(batch) => self.requests.push_back(Request {
                    batch,
                    expires: Instant::now() + PULL_EXPIRES,
                    delivered: 0,
                }),
                Err(e) if self.requests.is_empty() => {
                    tracing::warn!(error = %e, "cannot open a pull request; retrying");
                    let wake = Instant::now() + Duration::from_secs(1);
                    if deadline.is_some_and(|d| d < wake) {
                        return;
                    }
                    tokio::time::sleep_until(wake).await;
                }
                Err(_) => return,
            }
        }
    }

    async fn open_request(&self) -> Result<jetstream::consumer::pull::Batch, String> {
        self.consumer
            .batch()
            .max_messages(self.batch)
            .max_bytes(self.max_bytes)
            .expires(PULL_EXPIRES)
            .messages()
            .await
            .map_err(|e| e.to_string())
    }

    /// Moves the next message of any open request (JetStream may deliver to
    /// any of them) into the buffer, without opening another; a request
    /// that ends is dropped, one the server refused is noted for repair.
    /// Pending forever when none is open. Also used while the pipeline
    /// waits, so delivered messages are held (and kept alive), not left in a
    /// socket buffer to time out.
    pub async fn drain_open(&mut self) {
        if self.end_expired() {
            return; // the caller may open new ones
        }
        let Some(first_expiry) = self.requests.iter().map(|r| r.expires).min() else {
            return std::future::pending().await;
        };
        let polls = self.requests.iter_mut().map(|r| r.batch.next());
        let (next, index) = tokio::select! {
            (next, index, _) = futures::future::select_all(polls) => (next, index),
            // The server may drop an expired request without its timeout
            // reply (nats-server 2.9.10): end it by our own clock rather than
            // wait for the client's 5 s fallback.
            _ = tokio::time::sleep_until(first_expiry + EXPIRY_GRACE) => {
                self.end_expired();
                self.watch.healthy();
                return;
            }
        };
        match next {
            Some(Ok(m)) => {
                self.requests[index].delivered += 1;
                self.watch.healthy();
                self.buffered.push_back(m);
            }
            Some(Err(e)) => {
                let request = self.requests.remove(index).expect("polled request");
                if let Some(trouble) = pull_trouble(&e.to_string(), request.delivered) {
                    self.watch.trouble = Some(trouble);
                }
            }
            None => {
                let request = self.requests.remove(index).expect("polled request");
                if request.delivered == 0 && Instant::now() + EARLY_END < request.expires {
                    self.watch.trouble =
                        Some("the server ended a pull request at once, without messages".into());
                } else {
                    self.watch.healthy();
                }
            }
        }
    }

    /// Ends the requests past their expiry (plus grace) by our clock, after
    /// taking the messages they already delivered: a message left in a
    /// dropped request would wait out the ack wait. True if any ended.
    fn end_expired(&mut self) -> bool {
        let now = Instant::now();
        let open = self.requests.len();
        let mut kept = VecDeque::with_capacity(open);
        for mut request in self.requests.drain(..) {
            if request.expires + EXPIRY_GRACE > now {
                kept.push_back(request);
                continue;
            }
            while let Some(Some(Ok(m))) = request.batch.next().now_or_never() {
                self.buffered.push_back(m);
            }
        }
        self.requests = kept;
        self.requests.len() < open
    }

    /// Stops pulling: returns every message buffered or still to come on
    /// the open requests. A request is read until its expiry plus a short
    /// grace, by our own clock: some servers (nats-server 2.9.10) may drop
    /// an expired request without the timeout reply, and the client's own
    /// fallback waits 5 s more.
    pub async fn finish(&mut self) -> Vec<Message> {
        let mut rest: Vec<Message> = self.buffered.drain(..).collect();
        while let Some(mut request) = self.requests.pop_front() {
            let until = request.expires + EXPIRY_GRACE;
            while let Ok(Some(Ok(m))) = tokio::time::timeout_at(until, request.batch.next()).await {
                rest.push(m);
            }
        }
        rest
    }

    /// Stops pulling and gives away the open requests, the messages not
    /// yet taken and the channel of a handoff still to come (see
    /// [`Handoff`]).
    pub fn hand_over(&mut self, pending: Option<mpsc::UnboundedReceiver<Handoff>>) -> Handoff {
        Handoff {
            requests: std::mem::take(&mut self.requests),
            buffered: std::mem::take(&mut self.buffered),
            pending,
        }
    }

    /// Takes over a predecessor's requests and messages; returns the
    /// channel of a handoff still to come, if any.
    pub fn adopt(&mut self, handoff: Handoff) -> Option<mpsc::UnboundedReceiver<Handoff>> {
        self.buffered.extend(handoff.buffered);
        self.requests.extend(handoff.requests);
        handoff.pending
    }

    pub fn buffered(&self) -> impl Iterator<Item = &Message> {
        self.buffered.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::subject_covers;

    #[test]
    fn credentials_leave_the_url() {
        let (url, creds) = super::split_credentials("nats://me:s%40c+ret@h1:4222, nats://h2:4222");
        assert_eq!(url, "nats://h1:4222,nats://h2:4222");
        assert_eq!(creds, Some(("me".to_string(), Some("s@c+ret".to_string()))));
        let (_, token) = super::split_credentials("nats://tok@h:4222");
        assert_eq!(token, Some(("tok".to_string(), None)));
        assert_eq!(super::split_credentials("nats://h:4222").1, None);
    }

    #[test]
    fn subject_coverage() {
        assert!(subject_covers("raw.events.>", "raw.events.tiktok.>"));
        assert!(subject_covers(
            "raw.events.>",
            "raw.events.tiktok.top.video.view"
        ));
        assert!(!subject_covers("raw.events.*.*.*", "raw.events.tiktok.>"));
        assert!(subject_covers("raw.*.x", "raw.a.x"));
        assert!(!subject_covers("raw.a.x", "raw.*.x"));
        assert!(!subject_covers("raw.events.>", "raw.events"));
    }
}
