//! Acknowledgements sent lately, sent again after the consumer's leader
//! may have changed.
//!
//! An ack is a core NATS publish to the consumer's leader. While a cluster
//! elects a new leader nobody receives it, and nothing tells the engine:
//! the server redelivers every such message after `ack_wait`, and until
//! then it counts them against `max_ack_pending`, so a pipeline that kept
//! writing through the election stalls for `ack_wait` once it is over.
//! Acks are idempotent, so the engine sends the recent ones again once a
//! new leader delivers to it.

use std::sync::Mutex;

use async_nats::Subject;
use bytes::Bytes;

use super::*;

/// The payload of a positive acknowledgement.
const ACK: &[u8] = b"+ACK";

/// The reply subjects of the messages acknowledged within the consumer's
/// `ack_wait`, at most `max_ack_pending` of them: the server holds no more
/// unacknowledged messages than that, and redelivers older ones anyway.
pub struct RecentAcks {
    client: async_nats::Client,
    keep: Duration,
    cap: usize,
    sent: Mutex<VecDeque<(Instant, Subject)>>,
}

impl RecentAcks {
    pub fn new(client: async_nats::Client, ack_wait: Duration, max_ack_pending: usize) -> Self {
        Self {
            client,
            keep: ack_wait,
            cap: max_ack_pending.max(1),
            sent: Mutex::new(VecDeque::new()),
        }
    }

    /// Notes acknowledgements just sent (one lock per batch).
    pub fn record(&self, replies: impl IntoIterator<Item = Subject>) {
        let now = Instant::now();
        let mut sent = self.sent.lock().expect("recent acks lock");
        for reply in replies {
            if sent.len() == self.cap {
                sent.pop_front();
            }
            sent.push_back((now, reply));
        }
    }

    /// Sends every recent acknowledgement again; returns how many.
    pub(super) async fn resend(&self) -> usize {
        let replies: Vec<Subject> = {
            let mut sent = self.sent.lock().expect("recent acks lock");
            let oldest = Instant::now().checked_sub(self.keep);
            while oldest.is_some_and(|o| sent.front().is_some_and(|(at, _)| *at < o)) {
                sent.pop_front();
            }
            sent.iter().map(|(_, reply)| reply.clone()).collect()
        };
        for reply in &replies {
            if self
                .client
                .publish(reply.clone(), Bytes::from_static(ACK))
                .await
                .is_err()
            {
                break; // the connection is closed: nothing more can be sent
            }
        }
        replies.len()
    }
}
