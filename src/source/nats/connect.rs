//! Connecting to NATS: the server list, credentials and TLS, reconnection,
//! and server URLs with their credentials taken out.

use super::*;

/// Where and how every command connects to NATS: one set of options, so
/// `run`, `publish`, `replay` and `backfill` cannot drift apart.
#[derive(clap::Args, Clone)]
pub struct NatsOptions {
    /// NATS server URL. A cluster takes several: comma-separated in
    /// NATS_URL, or the flag repeated. The client also learns the other
    /// members from the server it reaches first.
    #[arg(
        long = "nats-url",
        env = "NATS_URL",
        value_delimiter = ',',
        default_value = "nats://localhost:4222"
    )]
    pub urls: Vec<String>,
    #[command(flatten)]
    pub auth: NatsAuth,
}

impl NatsOptions {
    /// The options for one server URL list (tests and tools).
    pub fn new(urls: &str) -> Self {
        Self {
            urls: urls.split(',').map(str::to_owned).collect(),
            auth: NatsAuth::default(),
        }
    }
}

/// Why the server list cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ServerListError {
    #[error("no NATS server URL given")]
    Empty,
    /// `url` is redacted; the source read the URL without its credentials.
    #[error("invalid NATS server URL {url}: {source}")]
    Invalid {
        url: String,
        #[source]
        source: std::io::Error,
    },
    /// async-nats sends one set of credentials to whichever server it
    /// reaches, so URLs that carry different ones cannot all be honoured.
    #[error("the NATS server URLs carry different credentials; give one set (in each URL or in NATS_USER/NATS_PASSWORD/NATS_TOKEN)")]
    MixedCredentials,
}

/// User and password, or a token (password `None`), taken out of a URL.
type UrlCredentials = (String, Option<String>);

/// The server URLs parsed one by one (async-nats reads one `&str` as a
/// single address), without their credentials, and the credentials they
/// carried.
pub(super) fn server_list(
    urls: &[String],
) -> Result<(Vec<async_nats::ServerAddr>, Option<UrlCredentials>), ServerListError> {
    let mut credentials: Option<Option<UrlCredentials>> = None;
    let mut servers = Vec::new();
    for one in urls.iter().map(|u| u.trim()).filter(|u| !u.is_empty()) {
        let (cleaned, carried) = without_credentials(one);
        if credentials.get_or_insert_with(|| carried.clone()) != &carried {
            return Err(ServerListError::MixedCredentials);
        }
        let server = cleaned
            .parse::<async_nats::ServerAddr>()
            .map_err(|source| ServerListError::Invalid {
                url: crate::util::redact::url(one),
                source,
            })?;
        servers.push(server);
    }
    if servers.is_empty() {
        return Err(ServerListError::Empty);
    }
    Ok((servers, credentials.flatten()))
}

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
    nats: &NatsOptions,
    name: &str,
    metrics: Arc<Metrics>,
) -> anyhow::Result<async_nats::Client> {
    let events = metrics.clone();
    let (servers, from_url) = server_list(&nats.urls)?;
    let mut options = nats.auth.apply(async_nats::ConnectOptions::new()).await?;
    match from_url {
        Some((user, Some(pass))) => options = options.user_and_password(user, pass),
        Some((token, None)) => options = options.token(token),
        None => {}
    }
    let shown = servers
        .iter()
        .map(async_nats::ServerAddr::as_url_str)
        .collect::<Vec<_>>()
        .join(",");
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
        .connect(servers)
        .await
        .with_context(|| format!("cannot connect to NATS at {shown}"))?;
    Ok(client)
}

/// Takes `user:password@` (or `token@`) out of one server URL and returns
/// it apart: passed in the URL, async-nats would print it in its debug
/// logs.
fn without_credentials(one: &str) -> (String, Option<UrlCredentials>) {
    match url::Url::parse(one) {
        Ok(mut u) if !u.username().is_empty() => {
            let user = percent_decode(u.username());
            let pass = u.password().map(percent_decode);
            let _ = u.set_username("");
            let _ = u.set_password(None);
            (
                u.to_string().trim_end_matches('/').to_string(),
                Some((user, pass)),
            )
        }
        _ => (one.to_string(), None),
    }
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
