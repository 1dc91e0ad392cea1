//! Connecting to NATS: credentials and TLS, reconnection, and server URLs
//! with their credentials taken out.

use super::*;

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

/// Takes `user:password@` (or `token@`) out of the server URLs and returns
/// them apart: passed in the URL, async-nats would print them in its debug
/// logs.
pub(super) fn split_credentials(urls: &str) -> (String, Option<(String, Option<String>)>) {
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
