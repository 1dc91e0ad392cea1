//! Settling rows: acknowledged after the commit, released for redelivery,
//! or given the invalid policy (ack, dead letter, nak, term).

use super::*;

impl Pipeline {
    /// Acknowledges the stored rows and rejects the rows the database
    /// refused; returns the rows still pending.
    pub(super) async fn settle(&self, rows: Vec<Row>) -> Vec<Row> {
        let mut pending = Vec::new();
        let mut settled = Settled::now();
        for mut row in rows {
            match std::mem::replace(&mut row.write.outcome, Outcome::Pending) {
                Outcome::Stored => self.processed(row, &mut settled).await,
                Outcome::Rejected(rejection) => {
                    let invalid = Invalid {
                        kind: InvalidKind::Unstorable,
                        error: rejection.error,
                        event_id: self.compiled.event_id_in(&row.held.msg.payload),
                    };
                    self.reject(row.held, invalid).await
                }
                Outcome::Pending => pending.push(row),
            }
        }
        self.acks.record(settled.acked);
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
    /// process may take them at once); their failed attempt is counted.
    pub(super) async fn release(&self, rows: &[Row]) {
        for row in rows {
            let _ = row.held.msg.ack_with(AckKind::Nak(None)).await;
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
            kind = invalid.kind.as_str(),
            error = %truncate(&invalid.error, 500),
            "invalid event"
        );
        let settled = match policy.action {
            InvalidAction::Ack => held.msg.ack().await.map_err(|e| e.to_string()),
            InvalidAction::Term => held
                .msg
                .ack_with(AckKind::Term)
                .await
                .map_err(|e| e.to_string()),
            InvalidAction::Nak => held
                .msg
                .ack_with(AckKind::Nak(policy.delay))
                .await
                .map_err(|e| e.to_string()),
            InvalidAction::DeadLetter => self.dead_letter(&held.msg, &invalid).await,
        };
        match settled {
            Ok(())
                if matches!(
                    policy.action,
                    InvalidAction::Ack | InvalidAction::DeadLetter
                ) =>
            {
                self.acks.record(held.msg.reply.clone());
            }
            Ok(()) => {}
            Err(e) => {
                tracing::warn!(pipeline = %self.name, error = %e, "could not settle the invalid event; it will be redelivered");
            }
        }
        self.count_failure(&held, VALIDATION_ERROR);
    }

    /// Publishes the original payload with headers explaining the failure,
    /// waits for JetStream to confirm it, and only then acks the original.
    /// A refused publish (the dead-letter stream gone, NATS down) is retried
    /// with backoff while the original is held and kept alive; a pipeline
    /// that stops meanwhile leaves the original for redelivery. Never a
    /// silent loss.
    pub(super) async fn dead_letter(&self, msg: &Message, invalid: &Invalid) -> Result<(), String> {
        let letters = self.dead_letters.as_ref().expect("checked at load");
        let info = msg.info().map_err(|e| e.to_string())?;
        let mut backoff = DEAD_LETTER_BACKOFF.0;
        loop {
            let letter = Letter {
                payload: msg.payload.clone(),
                headers: msg.headers.as_ref(),
                subject: msg.subject.as_str(),
                stream: info.stream,
                stream_seq: info.stream_sequence,
                delivered: info.delivered,
                reason: invalid.kind.as_str(),
                error: &invalid.error,
            };
            let Err(e) = letters.publish(letter).await else {
                break;
            };
            if backoff == DEAD_LETTER_BACKOFF.0 {
                tracing::warn!(pipeline = %self.name, error = %e, "dead letter refused; holding the event and retrying");
            }
            if self.stopping() {
                return Err(format!("{e}; left for redelivery"));
            }
            let _ = msg.ack_with(AckKind::Progress).await;
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(DEAD_LETTER_BACKOFF.1);
        }
        msg.ack().await.map_err(|e| e.to_string())
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
