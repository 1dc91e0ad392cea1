//! One pull request on an inbox of its own, read as the server means its
//! status messages.
//!
//! async-nats' `Batch` ends a request at the first status it does not
//! expect, dropping its inbox. On a replicated consumer the leader sends a
//! message only once the delivery is replicated, but a status (409 Batch
//! Completed, 409 Message Size Exceeds MaxBytes) at once, so the status can
//! overtake messages still on their way; dropped there, they come back only
//! after `ack_wait`, each spending a delivery attempt. Here a status that
//! closes the request says how many messages the server sent in all (the
//! request's size less `Nats-Pending-Messages`), and the inbox is read
//! until they have all arrived or the request's expiry has passed.

use async_nats::jetstream::consumer::pull::BatchConfig;
use async_nats::StatusCode;

use super::*;

/// The header in which a closing status tells how many of the request's
/// messages were not sent.
const PENDING_MESSAGES: &str = "Nats-Pending-Messages";

/// An open pull request.
pub(super) struct Request {
    inbox: async_nats::Subscriber,
    context: jetstream::Context,
    /// When the server expires it.
    pub(super) expires: Instant,
    /// Its size, in messages.
    asked: usize,
    /// Messages it delivered so far.
    pub(super) delivered: usize,
    phase: Phase,
}

/// Where a request stands at the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting there for messages.
    Waiting,
    /// Closed there, with `total` messages sent in all: the ones not yet
    /// here are on their way.
    Owing { total: usize },
    /// Given up there without saying what it sent (a leadership change):
    /// its inbox is still read until the expiry, but the request no longer
    /// counts as open.
    Abandoned,
}

/// What reading a request gave. It is handed on at once, never stored, so
/// the message is not boxed (one allocation per event).
#[allow(clippy::large_enum_variant)]
pub(super) enum Pulled {
    Message(Message),
    /// Nothing more will come on its inbox.
    Done,
    /// The consumer's new leader does not know the request (its inbox is
    /// still read until the expiry).
    LeaderChanged,
    /// The server refused the request or no longer serves the consumer:
    /// the source needs repair.
    Refused(Refusal),
}

/// Why the server did not serve a request, and how bad that is.
#[derive(Debug, Clone)]
pub(super) struct Refusal {
    pub error: String,
    /// Retrying for a consumer without a leader (503: nobody answers for
    /// it, as while a cluster elects one, or when it is gone), failing for
    /// a refusal the server gave a reason for.
    pub severity: Severity,
}

impl Request {
    /// Subscribes to a fresh inbox and sends the request for at most
    /// `batch` messages and `max_bytes` bytes.
    pub(super) async fn open(
        consumer: &PullConsumer,
        context: &jetstream::Context,
        batch: usize,
        max_bytes: usize,
    ) -> Result<Self, async_nats::Error> {
        let client = context.client();
        let inbox = client.new_inbox();
        let subscriber = client.subscribe(inbox.clone()).await?;
        let config = BatchConfig {
            batch,
            max_bytes,
            expires: Some(PULL_EXPIRES),
            ..BatchConfig::default()
        };
        consumer.request_batch(config, inbox.into()).await?;
        Ok(Self {
            inbox: subscriber,
            context: context.clone(),
            expires: Instant::now() + PULL_EXPIRES,
            asked: batch,
            delivered: 0,
            phase: Phase::Waiting,
        })
    }

    /// True for a request ended by our clock without the server's word of
    /// its end, or without the messages it said it sent: lost with the
    /// server that held it.
    pub(super) fn lost(&self) -> bool {
        match self.phase {
            Phase::Waiting => true,
            Phase::Owing { total } => self.delivered < total,
            Phase::Abandoned => false,
        }
    }

    /// True while the server may still send it messages it counts: such a
    /// request takes one of the [`REQUESTS_AHEAD`] places.
    pub(super) fn is_open(&self) -> bool {
        self.phase != Phase::Abandoned
    }

    /// The next message, or what the request's end means.
    pub(super) fn poll_next(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Pulled> {
        use std::task::Poll;
        loop {
            if self.owes_nothing() {
                return Poll::Ready(Pulled::Done);
            }
            let Some(message) = std::task::ready!(self.inbox.poll_next_unpin(cx)) else {
                return Poll::Ready(Pulled::Done);
            };
            match message.status {
                None | Some(StatusCode::OK) => {
                    self.delivered += 1;
                    return Poll::Ready(Pulled::Message(Message {
                        message,
                        context: self.context.clone(),
                    }));
                }
                Some(StatusCode::IDLE_HEARTBEAT) => continue,
                Some(status) => {
                    if let Some(refused) = self.close(status, &message) {
                        return Poll::Ready(Pulled::Refused(refused));
                    }
                    if self.phase == Phase::Abandoned {
                        return Poll::Ready(Pulled::LeaderChanged);
                    }
                }
            }
        }
    }

    /// True once every message the server sent has arrived.
    fn owes_nothing(&self) -> bool {
        match self.phase {
            Phase::Waiting => self.delivered >= self.asked,
            Phase::Owing { total } => self.delivered >= total,
            Phase::Abandoned => false,
        }
    }

    /// Reads a status that ends the request at the server; returns the
    /// trouble when it means the source needs repair.
    fn close(&mut self, status: StatusCode, message: &async_nats::Message) -> Option<Refusal> {
        let description = message.description.as_deref().unwrap_or_default();
        let unsent = message
            .headers
            .as_ref()
            .and_then(|h| h.get(PENDING_MESSAGES))
            .and_then(|v| v.as_str().trim().parse::<usize>().ok());
        let closing = closing(status, description);
        let total = sent_in_all(&closing, self.asked, self.delivered, unsent);
        match closing {
            Closing::Served | Closing::Full => {
                self.phase = Phase::Owing { total };
                None
            }
            Closing::TooLarge => {
                self.phase = Phase::Owing { total };
                (total == 0 && self.delivered == 0).then(|| Refusal {
                    error: format!(
                        "{status} {description} (a message is larger than a whole pull request)"
                    ),
                    severity: Severity::Failing,
                })
            }
            Closing::Abandoned => {
                self.phase = Phase::Abandoned;
                None
            }
            Closing::Refused => {
                self.phase = Phase::Owing { total: 0 };
                let unanswered = status == StatusCode::NO_RESPONDERS;
                Some(Refusal {
                    error: if unanswered {
                        format!("{status}: nobody serves the consumer (a cluster electing its leader, or the consumer is gone)")
                    } else {
                        format!("{status} {description}").trim().to_owned()
                    },
                    severity: if unanswered {
                        Severity::Retrying
                    } else {
                        Severity::Failing
                    },
                })
            }
        }
    }

    /// Takes the messages already here without waiting (a request given
    /// up by our clock).
    pub(super) fn take_ready(&mut self) -> Vec<Message> {
        let mut ready = Vec::new();
        let waker = futures::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        while let std::task::Poll::Ready(Pulled::Message(m)) = self.poll_next(&mut cx) {
            ready.push(m);
        }
        ready
    }
}

/// What a status ending a pull request means.
#[derive(Debug, PartialEq, Eq)]
enum Closing {
    /// Expired or closed with `Nats-Pending-Messages` of it unsent.
    Served,
    /// Its message count was reached (with bytes to spare).
    Full,
    /// The next message would exceed its bytes.
    TooLarge,
    /// The consumer's new leader does not know it; it is not an error.
    Abandoned,
    /// Refused or no longer served: the consumer is gone, has no leader,
    /// or its limits refuse the request.
    Refused,
}

/// How many messages a closed request brought in all: its size less what
/// the server says it did not send (`unsent`, from `Nats-Pending-Messages`),
/// or what has arrived when the server does not say; never less than that.
fn sent_in_all(closing: &Closing, asked: usize, delivered: usize, unsent: Option<usize>) -> usize {
    let total = match closing {
        Closing::Full => asked,
        Closing::Served | Closing::TooLarge => {
            unsent.map_or(delivered, |n| asked.saturating_sub(n))
        }
        Closing::Abandoned | Closing::Refused => delivered,
    };
    total.max(delivered)
}

/// The descriptions the server gives a 409 (Request Terminated) that ends
/// a pull request, which tell its cases apart.
///
/// This is the one place the engine reads a server's text: a 409 carries
/// no finer code, and async-nats hands its description over only as text
/// (`Message::description`, an `Option<String>`; its own pull stream
/// compares the same texts). They are the server's wire protocol
/// (nats-server's `jsPullRequest*` statuses), stable across releases;
/// `statuses_mean_what_the_server_means` holds them.
mod terminated {
    /// The request's message count was reached.
    pub const BATCH_COMPLETED: &str = "Batch Completed";
    /// The next message would exceed the request's `max_bytes`.
    pub const MESSAGE_SIZE_EXCEEDS_MAX_BYTES: &str = "Message Size Exceeds MaxBytes";
    /// The consumer's leader changed; the new one does not know the request.
    pub const LEADERSHIP_CHANGE: &str = "Leadership Change";
}

/// Reads a status by its code and, for 409s, the server's description.
fn closing(status: StatusCode, description: &str) -> Closing {
    match status {
        StatusCode::TIMEOUT => Closing::Served,
        StatusCode::REQUEST_TERMINATED => match description {
            terminated::BATCH_COMPLETED => Closing::Full,
            terminated::MESSAGE_SIZE_EXCEEDS_MAX_BYTES => Closing::TooLarge,
            terminated::LEADERSHIP_CHANGE => Closing::Abandoned,
            _ => Closing::Refused,
        },
        // 404 answers only requests without expiry or with no_wait, which
        // the engine never sends: the server did not take ours.
        _ => Closing::Refused,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_mean_what_the_server_means() {
        let c = |code: u16, d: &str| closing(StatusCode::from_u16(code).unwrap(), d);
        assert_eq!(c(408, "Request Timeout"), Closing::Served);
        assert_eq!(c(409, "Batch Completed"), Closing::Full);
        assert_eq!(c(409, "Message Size Exceeds MaxBytes"), Closing::TooLarge);
        assert_eq!(c(409, "Leadership Change"), Closing::Abandoned);
        assert_eq!(c(409, "Consumer Deleted"), Closing::Refused);
        assert_eq!(c(409, "Exceeded MaxWaiting"), Closing::Refused);
        assert_eq!(c(503, ""), Closing::Refused);
        assert_eq!(c(404, "No Messages"), Closing::Refused);
    }

    #[test]
    fn a_closed_request_waits_for_what_the_server_sent() {
        // 1,000 asked, 645 here when "Batch Completed" arrives: 355 to come.
        assert_eq!(sent_in_all(&Closing::Full, 1000, 645, Some(0)), 1000);
        // Expired with 400 unsent: 600 in all.
        assert_eq!(sent_in_all(&Closing::Served, 1000, 550, Some(400)), 600);
        // No header (older servers): what is here is all.
        assert_eq!(sent_in_all(&Closing::Served, 1000, 550, None), 550);
        // The next message did not fit: 10 unsent of 1,000.
        assert_eq!(sent_in_all(&Closing::TooLarge, 1000, 0, Some(10)), 990);
        // Never less than what has arrived.
        assert_eq!(sent_in_all(&Closing::Served, 1000, 700, Some(400)), 700);
    }
}
