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
use futures::StreamExt;
use tokio::time::Instant;

use crate::config::{self, ConsumerConfig, StreamConfig};
use crate::metrics::Metrics;

/// How long one pull request waits on the server for messages. A request
/// cannot be cancelled, so this bounds how long a stopping pipeline drains
/// its open request (it processes those messages rather than dropping them
/// into a closed inbox, where they would wait out the ack wait).
const PULL_EXPIRES: Duration = Duration::from_secs(1);

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
    /// Refuse to connect without TLS.
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
        Ok(o.require_tls(self.nats_tls_required))
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
    let options = auth.apply(async_nats::ConnectOptions::new()).await?;
    let client = options
        .name(name)
        .max_reconnects(None)
        .reconnect_delay_callback(|_| Duration::from_secs(1))
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
        .with_context(|| format!("cannot connect to NATS at {}", crate::sink::redact_url(url)))?;
    Ok(client)
}

/// Ensures the stream (created when missing, used as is when present) and
/// the durable consumer (created, or its settings updated to the file's).
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
    if !info
        .config
        .subjects
        .iter()
        .any(|p| subject_covers(p, &c.filter_subject))
    {
        tracing::warn!(
            stream = %s.name,
            subjects = ?info.config.subjects,
            filter = %c.filter_subject,
            "the existing stream's subjects do not cover the consumer's filter: it will receive nothing"
        );
    }
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

/// Delivers messages from bounded pull requests. Messages delivered while
/// the pipeline is busy are buffered here (at most one request's worth), so
/// the pipeline can keep them alive.
pub struct Puller {
    consumer: PullConsumer,
    batch: usize,
    request: Option<jetstream::consumer::pull::Batch>,
    buffered: VecDeque<Message>,
}

impl Puller {
    pub fn new(consumer: PullConsumer, batch: usize) -> Self {
        Self {
            consumer,
            batch,
            request: None,
            buffered: VecDeque::new(),
        }
    }

    /// The next message, issuing a new pull request when the last one is
    /// done; None when `deadline` passes first.
    pub async fn next(&mut self, deadline: Option<Instant>) -> Option<Message> {
        if let Some(m) = self.buffered.pop_front() {
            return Some(m);
        }
        loop {
            if self.request.is_none() {
                self.request = self.open_request(deadline).await;
                self.request.as_ref()?;
            }
            let request = self.request.as_mut().expect("request is open");
            let next = match deadline {
                Some(d) => tokio::time::timeout_at(d, request.next()).await.ok()?,
                None => request.next().await,
            };
            match next {
                Some(Ok(m)) => return Some(m),
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "pull request failed");
                    self.request = None;
                }
                None => self.request = None,
            }
        }
    }

    /// Opens a pull request; on failure (NATS down) waits a second and
    /// tries again until `deadline`.
    async fn open_request(
        &self,
        deadline: Option<Instant>,
    ) -> Option<jetstream::consumer::pull::Batch> {
        loop {
            match self
                .consumer
                .batch()
                .max_messages(self.batch)
                .expires(PULL_EXPIRES)
                .messages()
                .await
            {
                Ok(b) => return Some(b),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot open a pull request; retrying");
                    let wake = Instant::now() + Duration::from_secs(1);
                    if deadline.is_some_and(|d| d < wake) {
                        return None;
                    }
                    tokio::time::sleep_until(wake).await;
                }
            }
        }
    }

    /// Takes the next message of the request already open, without opening
    /// another; pending forever when none is open. Used while the pipeline
    /// waits, so delivered messages are held (and kept alive), not left in
    /// a socket buffer to time out.
    pub async fn drain_open(&mut self) {
        match self.request.as_mut() {
            Some(r) => match r.next().await {
                Some(Ok(m)) => self.buffered.push_back(m),
                _ => self.request = None,
            },
            None => std::future::pending().await,
        }
    }

    /// Stops pulling: returns every message buffered or still to come on
    /// the open request (which ends at its expiry at the latest).
    pub async fn finish(&mut self) -> Vec<Message> {
        let mut rest: Vec<Message> = self.buffered.drain(..).collect();
        if let Some(mut request) = self.request.take() {
            while let Some(Ok(m)) = request.next().await {
                rest.push(m);
            }
        }
        rest
    }

    pub fn buffered(&self) -> impl Iterator<Item = &Message> {
        self.buffered.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::subject_covers;

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
