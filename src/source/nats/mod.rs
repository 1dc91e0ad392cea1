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

mod acks;
mod connect;
mod ensure;
mod handoff;
mod puller;
mod request;

pub use acks::RecentAcks;
pub use connect::{connect, NatsAuth, NatsOptions, ServerListError};
pub use ensure::{ensure, subject_covers, EnsureError};
pub use handoff::Handoff;
pub use puller::Puller;

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

#[cfg(test)]
mod tests {
    use super::subject_covers;

    #[test]
    fn credentials_leave_the_urls() {
        let list = |urls: &[&str]| {
            let urls: Vec<String> = urls.iter().map(|u| u.to_string()).collect();
            super::connect::server_list(&urls)
        };
        let (servers, creds) = list(&[
            "nats://me:s%40c+ret@h1:4222",
            " nats://me:s%40c+ret@h2:4223",
        ])
        .unwrap();
        let shown: Vec<_> = servers.iter().map(|s| s.as_url_str().to_owned()).collect();
        assert_eq!(shown, ["nats://h1:4222", "nats://h2:4223"]);
        assert_eq!(creds, Some(("me".to_string(), Some("s@c+ret".to_string()))));
        let (_, token) = list(&["nats://tok@h:4222"]).unwrap();
        assert_eq!(token, Some(("tok".to_string(), None)));
        assert_eq!(list(&["nats://h:4222"]).unwrap().1, None);
    }

    #[test]
    fn a_server_list_is_every_url_of_it() {
        let urls: Vec<String> = "nats://a:4222,nats://b:4223,tls://c:4224"
            .split(',')
            .map(str::to_owned)
            .collect();
        let (servers, _) = super::connect::server_list(&urls).unwrap();
        let hosts: Vec<_> = servers
            .iter()
            .map(|s| (s.host().to_owned(), s.port()))
            .collect();
        assert_eq!(
            hosts,
            [("a".into(), 4222), ("b".into(), 4223), ("c".into(), 4224)]
        );
        assert!(servers[2].tls_required());
    }

    #[test]
    fn a_server_list_refuses_what_it_cannot_honour() {
        let list = |urls: &[&str]| {
            let urls: Vec<String> = urls.iter().map(|u| u.to_string()).collect();
            super::connect::server_list(&urls).map(|_| ())
        };
        assert!(matches!(
            list(&["nats://a:1@h1:4222", "nats://b:2@h2:4222"]),
            Err(super::ServerListError::MixedCredentials)
        ));
        assert!(matches!(
            list(&["nats://a:1@h1:4222", "nats://h2:4222"]),
            Err(super::ServerListError::MixedCredentials)
        ));
        assert!(matches!(
            list(&[" ", ""]),
            Err(super::ServerListError::Empty)
        ));
        assert!(matches!(
            list(&["nats://h:notaport"]),
            Err(super::ServerListError::Invalid { .. })
        ));
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
