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

/// Acknowledgements sent within the consumer's `ack_wait`, to be sent
/// again after a disruption.
pub struct RecentAcks {
    client: async_nats::Client,
    ring: Mutex<AckRing>,
}

impl RecentAcks {
    pub fn new(client: async_nats::Client, ack_wait: Duration, max_ack_pending: usize) -> Self {
        Self {
            client,
            ring: Mutex::new(AckRing::new(ack_wait, max_ack_pending)),
        }
    }

    /// Notes acknowledgements just sent (one lock per batch).
    pub fn record(&self, replies: impl IntoIterator<Item = Subject>) {
        let now = Instant::now();
        let mut ring = self.ring.lock().expect("recent acks lock");
        for reply in replies {
            ring.push(now, reply);
        }
    }

    /// Sends every recent acknowledgement again; returns how many.
    pub(super) async fn resend(&self) -> usize {
        let replies = self
            .ring
            .lock()
            .expect("recent acks lock")
            .recent(Instant::now());
        for reply in &replies {
            let sent = self.client.publish(reply.clone(), Bytes::from_static(ACK));
            if sent.await.is_err() {
                break; // the connection is closed: nothing more can be sent
            }
        }
        replies.len()
    }
}

/// The reply subjects of the messages acknowledged within `keep` (the
/// consumer's `ack_wait`), at most `cap` (its `max_ack_pending`): the
/// server holds no more unacknowledged messages than that, and redelivers
/// older ones anyway.
struct AckRing {
    keep: Duration,
    cap: usize,
    sent: VecDeque<(Instant, Subject)>,
}

impl AckRing {
    fn new(keep: Duration, cap: usize) -> Self {
        Self {
            keep,
            cap: cap.max(1),
            sent: VecDeque::new(),
        }
    }

    fn push(&mut self, at: Instant, reply: Subject) {
        if self.sent.len() == self.cap {
            self.sent.pop_front();
        }
        self.sent.push_back((at, reply));
    }

    /// The replies younger than `keep` at `now`; older ones are dropped.
    fn recent(&mut self, now: Instant) -> Vec<Subject> {
        let oldest = now.checked_sub(self.keep);
        while oldest.is_some_and(|o| self.sent.front().is_some_and(|(at, _)| *at < o)) {
            self.sent.pop_front();
        }
        self.sent.iter().map(|(_, reply)| reply.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_keeps_the_newest_within_ack_wait() {
        let start = Instant::now();
        let mut ring = AckRing::new(Duration::from_secs(10), 3);
        for (i, s) in ["a", "b", "c", "d"].into_iter().enumerate() {
            ring.push(start + Duration::from_secs(i as u64 * 4), Subject::from(s));
        }
        let names = |v: Vec<Subject>| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        // Capped at three: "a" is gone.
        assert_eq!(
            names(ring.recent(start + Duration::from_secs(12))),
            ["b", "c", "d"]
        );
        // 10 s after "b" (at 4 s) and "c" (at 8 s): only "d" (12 s) is left.
        assert_eq!(names(ring.recent(start + Duration::from_secs(19))), ["d"]);
    }
}
