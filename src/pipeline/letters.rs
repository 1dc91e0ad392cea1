//! The dead-letter stage: letters wait here, each until JetStream confirms
//! it, while the batches they came from go on. A dead-letter stream that is
//! gone or refusing holds back only the letters (kept alive, reported as the
//! pipeline's `dead_letters` problem), never a valid event: before, the
//! policy ran inline and a refused letter stalled its whole batch, whose
//! mates then timed out and were written twice.
//!
//! Invariants:
//! - an original (or the kept advisory that reported it) is acknowledged
//!   only after its letter is confirmed;
//! - letters still refused when the pipeline stops are left for redelivery
//!   (nak), so another process or version dead-letters them;
//! - the stage is a task of its pipeline version, joined when it stops.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;

use futures::FutureExt;

use super::deadletter::{DeadLetters, Letter};
use super::keepalive::progress;
use super::supervise::panic_text;
use super::*;
use crate::util::backoff::Backoff;
use crate::util::testhook;

/// First and longest pause between attempts to publish a refused letter.
const DEAD_LETTER_BACKOFF: (Duration, Duration) =
    (Duration::from_millis(100), Duration::from_secs(5));

/// Letters that may wait to be taken by the stage before posting waits
/// (each one is also a message JetStream counts against `max_ack_pending`).
const OUTBOX_CAPACITY: usize = 1024;

/// One letter and what its confirmation settles.
pub(super) struct Parcel {
    carrier: Carrier,
    letter: Letter,
}

enum Carrier {
    /// The event itself, delivered to this pipeline.
    Delivery(Held),
    /// The kept advisory that reported the event.
    Advisory(Message),
    /// A live advisory: nothing to settle.
    Nothing,
}

impl Parcel {
    pub(super) fn delivery(held: Held, letter: Letter) -> Self {
        Self {
            carrier: Carrier::Delivery(held),
            letter,
        }
    }

    pub(super) fn advisory(msg: Message, letter: Letter) -> Self {
        Self {
            carrier: Carrier::Advisory(msg),
            letter,
        }
    }

    pub(super) fn unacknowledged(letter: Letter) -> Self {
        Self {
            carrier: Carrier::Nothing,
            letter,
        }
    }

    fn message(&self) -> Option<&Message> {
        match &self.carrier {
            Carrier::Delivery(held) => Some(&held.msg),
            Carrier::Advisory(msg) => Some(msg),
            Carrier::Nothing => None,
        }
    }

    /// The letter is confirmed: acknowledges what carried it.
    async fn settle(self, acks: &nats::RecentAcks) {
        let Some(msg) = self.message() else { return };
        match msg.ack().await {
            Ok(()) if matches!(self.carrier, Carrier::Delivery(_)) => {
                acks.record(msg.reply.clone());
            }
            Ok(()) => {}
            Err(error) => {
                tracing::warn!(%error, stream_seq = self.letter.stream_seq,
                    "ack after a confirmed dead letter failed; the letter may be published again (and deduplicated)");
            }
        }
    }

    /// Leaves the letter's original for redelivery.
    async fn leave(self) {
        match self.message() {
            Some(msg) => {
                let _ = msg.ack_with(AckKind::Nak(None)).await;
            }
            None => {
                tracing::error!(stream_seq = self.letter.stream_seq, reason = %self.letter.reason,
                    "dead letter not published before the pipeline stopped (from a live advisory: it is lost)");
            }
        }
    }
}

/// Where letters are posted; the stage ends once every outbox is dropped.
#[derive(Clone)]
pub(super) struct Outbox(mpsc::Sender<Parcel>);

impl Outbox {
    /// Hands `parcel` to the stage, waiting while it is full.
    pub(super) async fn post(&self, parcel: Parcel) {
        if let Err(mpsc::error::SendError(parcel)) = self.0.send(parcel).await {
            tracing::error!(
                stream_seq = parcel.letter.stream_seq,
                "the dead-letter stage has ended; leaving the event for redelivery"
            );
            parcel.leave().await;
        }
    }
}

/// The stage's task: publishes letters oldest first, holds and keeps alive
/// those JetStream refuses, retries with backoff.
pub(super) struct Stage {
    pub(super) letters: DeadLetters,
    pub(super) health: Arc<Health>,
    pub(super) acks: Arc<nats::RecentAcks>,
    pub(super) keepalive: Duration,
}

/// An outbox and the stage's end of it.
pub(super) fn outbox() -> (Outbox, mpsc::Receiver<Parcel>) {
    let (tx, rx) = mpsc::channel(OUTBOX_CAPACITY);
    (Outbox(tx), rx)
}

impl Stage {
    /// Runs until every outbox is dropped; a panic is reported as the
    /// pipeline's `dead_letters` problem (cleared by the next confirmed
    /// letter) and the stage serves on (the letters it held come back after
    /// `ack_wait`).
    pub(super) async fn run(self, mut inbox: mpsc::Receiver<Parcel>) {
        loop {
            let serve = AssertUnwindSafe(self.serve(&mut inbox)).catch_unwind();
            let Err(panic) = serve.await else { return };
            let text = panic_text(&*panic);
            tracing::error!(pipeline = %self.letters.pipeline, panic = %text,
                "the dead-letter stage panicked; the letters it held are delivered again after ack_wait");
            self.health.fail(
                Side::DeadLetters,
                Severity::Failing,
                format!("the dead-letter stage panicked: {text}"),
            );
            self.health.pausing(Side::DeadLetters, Duration::ZERO);
        }
    }

    /// Serves the outbox until every sender is dropped; then tries the
    /// letters still held once more and leaves the rest for redelivery.
    async fn serve(&self, inbox: &mut mpsc::Receiver<Parcel>) {
        let mut held = VecDeque::new();
        let mut backoff = Backoff::new(DEAD_LETTER_BACKOFF);
        let mut retry_at: Option<Instant> = None;
        let mut next_progress = Instant::now() + self.keepalive;
        loop {
            let retry = retry_at.unwrap_or_else(|| Instant::now() + self.keepalive);
            tokio::select! {
                biased;
                parcel = inbox.recv() => match parcel {
                    Some(parcel) => held.push_back(parcel),
                    None => break,
                },
                _ = tokio::time::sleep_until(retry), if retry_at.is_some() => retry_at = None,
                _ = tokio::time::sleep_until(next_progress), if !held.is_empty() => {
                    progress(held.iter().filter_map(Parcel::message)).await;
                    next_progress = Instant::now() + self.keepalive;
                }
            }
            if retry_at.is_none() {
                retry_at = self.deliver(&mut held, &mut backoff).await;
            }
        }
        if !held.is_empty() {
            self.deliver(&mut held, &mut backoff).await;
        }
        for parcel in held {
            parcel.leave().await;
        }
        self.health.recover(Side::DeadLetters);
    }

    /// Publishes held letters oldest first until one is refused; returns
    /// when to try again then.
    async fn deliver(&self, held: &mut VecDeque<Parcel>, backoff: &mut Backoff) -> Option<Instant> {
        while let Some(parcel) = held.front() {
            testhook::panic_point("dead_letter", &parcel.letter.payload);
            if let Err(error) = self.letters.publish(&parcel.letter).await {
                if self
                    .health
                    .fail(Side::DeadLetters, Severity::Retrying, error.to_string())
                {
                    tracing::warn!(pipeline = %self.letters.pipeline, %error, held = held.len(),
                        "dead letters refused; holding them (valid events go on) and retrying");
                }
                let pause = backoff.pause();
                self.health.pausing(Side::DeadLetters, pause);
                return Some(Instant::now() + pause);
            }
            backoff.reset();
            if let Some(parcel) = held.pop_front() {
                parcel.settle(&self.acks).await;
            }
            if self.health.recover(Side::DeadLetters) {
                tracing::info!(pipeline = %self.letters.pipeline, "dead letters accepted again");
            }
        }
        None
    }
}
