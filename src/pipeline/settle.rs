//! Settling rows: acknowledged after the commit, released for redelivery,
//! or given the invalid policy (ack, dead letter, nak, term).

use super::*;
use crate::sink::postgres::Entry;

impl Pipeline {
    /// Acknowledges the stored rows, then rejects the rows the database
    /// refused (stored rows never wait on a rejection's policy); returns the
    /// rows still pending.
    pub(super) async fn settle(&self, rows: Vec<Row>) -> Vec<Row> {
        let mut pending = Vec::new();
        let mut rejected = Vec::new();
        let mut settled = Settled::now();
        for mut row in rows {
            match std::mem::replace(&mut row.write.outcome, Outcome::Pending) {
                Outcome::Stored => self.processed(row, &mut settled).await,
                Outcome::Duplicate => {
                    self.count_duplicate();
                    self.processed(row, &mut settled).await
                }
                Outcome::Rejected(rejection) => rejected.push((row, rejection)),
                Outcome::Pending => pending.push(row),
            }
        }
        self.acks.record(settled.acked);
        for (row, rejection) in rejected {
            let invalid = Invalid {
                kind: Reason::Unstorable,
                error: rejection.error,
                event_id: self.compiled.event_id_in(&row.held.msg.payload),
            };
            self.reject(row.held, invalid).await
        }
        pending
    }

    async fn processed(&self, row: Row, settled: &mut Settled) {
        match row.held.msg.ack().await {
            Ok(()) => settled.acked.extend(row.held.msg.reply.clone()),
            Err(e) => {
                tracing::warn!(pipeline = %self.name, error = %e, "ack failed; the event will be redelivered and deduplicated");
            }
        }
        self.lag.committed(&row.held.msg, settled.wall);
        self.stats.processed.fetch_add(1, Ordering::Relaxed);
        let elapsed = settled.at.saturating_duration_since(row.held.received);
        if tracing::enabled!(tracing::Level::DEBUG) {
            tracing::debug!(
                pipeline = %self.name,
                subject = %row.held.msg.subject,
                stream_seq = ?row.held.msg.info().ok().map(|i| i.stream_sequence),
                event_id = ?self.compiled.event_id_in(&row.held.msg.payload),
                "stored"
            );
        }
        let series = match &mut settled.last {
            Some(last) if last.labels == row.labels => last,
            last => last.insert(self.series(row.labels)),
        };
        series.processed.inc();
        series.duration.observe(elapsed.as_secs_f64());
    }

    /// The series a stored event with these label values counts in.
    fn series(&self, labels: Vec<String>) -> LabelSeries {
        let families = &self.families;
        LabelSeries {
            processed: families.processed.with_label_values(&labels),
            duration: families
                .duration
                .with_label_values(&duration_values(&self.cfg.metrics, &labels)),
            labels,
        }
    }

    /// Leaves the pending rows for JetStream to redeliver (nak: another
    /// process may take them at once); their failed attempt is counted. A
    /// row on its last allowed delivery would not come back: with dead
    /// letters it is dead-lettered instead.
    pub(super) async fn release(&self, rows: Vec<Row>) {
        for row in rows {
            match self.last_delivery(&row.held.msg) {
                Some(letter) => {
                    self.record(&row.held.msg, Entry::DeadLettered).await;
                    self.post(row.held, letter).await
                }
                None => {
                    let _ = row.held.msg.ack_with(AckKind::Nak(None)).await;
                }
            }
        }
    }

    /// The `max_deliver` letter for `msg` when this is its last allowed
    /// delivery and the pipeline has dead letters.
    fn last_delivery(&self, msg: &Message) -> Option<Letter> {
        self.dead_letters.as_ref()?;
        let max = self.cfg.source.nats.consumer.max_deliver;
        let info = msg.info().ok().filter(|i| max > 0 && i.delivered >= max)?;
        Some(letter(
            msg,
            &info,
            Reason::MaxDeliver,
            "held at its last allowed delivery when the pipeline stopped".into(),
        ))
    }

    /// Hands a letter to the dead-letter stage; without one running (the
    /// pipeline has stopped), the event is left for redelivery.
    async fn post(&self, held: Held, letter: Letter) {
        let outbox = self.outbox.lock().expect("outbox lock").clone();
        match outbox {
            Some(outbox) => outbox.post(Parcel::delivery(held, letter)).await,
            None => {
                let _ = held.msg.ack_with(AckKind::Nak(None)).await;
            }
        }
    }

    /// Applies the pipeline's invalid policy to an event that can never be
    /// stored.
    pub(super) async fn reject(&self, held: Held, invalid: Invalid) {
        let policy = &self.cfg.on_error.invalid;
        tracing::warn!(
            pipeline = %self.name,
            subject = %held.msg.subject,
            stream_seq = ?held.msg.info().ok().map(|i| i.stream_sequence),
            event_id = ?invalid.event_id,
            kind = %invalid.kind,
            error = %truncate(&invalid.error, 500),
            "invalid event"
        );
        if let Some(entry) = self.invalid_entry(invalid.kind) {
            self.record(&held.msg, entry).await;
        }
        let settled = match policy.action {
            InvalidAction::Ack => held.msg.ack().await,
            InvalidAction::Term => held.msg.ack_with(AckKind::Term).await,
            InvalidAction::Nak => held.msg.ack_with(AckKind::Nak(policy.delay)).await,
            InvalidAction::DeadLetter => {
                self.count_failure(&held, Reason::ValidationError);
                return self.dead_letter(held, &invalid).await;
            }
        };
        match settled {
            Ok(()) if policy.action == InvalidAction::Ack => {
                self.acks.record(held.msg.reply.clone());
            }
            Ok(()) => {}
            Err(e) => {
                tracing::warn!(pipeline = %self.name, error = %e, "could not settle the invalid event; it will be redelivered");
            }
        }
        self.count_failure(&held, Reason::ValidationError);
    }

    /// Hands the event to the dead-letter stage, which acknowledges it once
    /// JetStream confirms its letter (see `letters`): a refused letter holds
    /// back only itself.
    async fn dead_letter(&self, held: Held, invalid: &Invalid) {
        match held.msg.info() {
            Ok(info) => {
                let letter = letter(&held.msg, &info, invalid.kind, invalid.error.clone());
                self.post(held, letter).await
            }
            Err(error) => {
                tracing::warn!(pipeline = %self.name, %error, "an invalid event without JetStream metadata cannot be dead-lettered; it is left for redelivery");
                let _ = held.msg.ack_with(AckKind::Nak(None)).await;
            }
        }
    }
}

/// The letter for a delivered message.
fn letter(
    msg: &Message,
    info: &async_nats::jetstream::message::Info<'_>,
    reason: Reason,
    error: String,
) -> Letter {
    Letter {
        payload: msg.payload.clone(),
        headers: msg.headers.clone(),
        subject: msg.subject.to_string(),
        stream: info.stream.to_string(),
        stream_seq: info.stream_sequence,
        delivered: info.delivered,
        reason,
        error,
    }
}

/// The moment a batch's rows are settled, and the series of the last
/// stored row: one clock reading per batch, and the events of a batch
/// mostly share their labels, so most rows find their series without a
/// lookup.
struct Settled {
    at: Instant,
    wall: std::time::SystemTime,
    last: Option<LabelSeries>,
    /// Reply subjects of the acknowledged rows (see `nats::RecentAcks`).
    acked: Vec<async_nats::Subject>,
}

impl Settled {
    fn now() -> Self {
        Self {
            at: Instant::now(),
            wall: std::time::SystemTime::now(),
            last: None,
            acked: Vec::new(),
        }
    }
}

/// A label set's values and the series of stored events with them.
struct LabelSeries {
    labels: Vec<String>,
    processed: prometheus::Counter,
    duration: prometheus::Histogram,
}
