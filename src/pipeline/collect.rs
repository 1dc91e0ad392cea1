//! Collecting a batch: receiving messages (max_rows, max_bytes, max_wait),
//! and preparing each into a row (its message's metadata and headers,
//! decode, validate, render).

use super::*;

impl Pipeline {
    /// Waits for the first message, then gathers until `max_rows` or
    /// `max_wait` after the first. None once `stop` is set.
    pub(super) async fn collect(
        &self,
        puller: &mut Puller,
        stop: &mut watch::Receiver<bool>,
        adopt: &mut Option<mpsc::UnboundedReceiver<Handoff>>,
    ) -> Option<Vec<Held>> {
        let b = &self.cfg.sink.postgres.batch;
        let first = loop {
            tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => return None,
                handoff = recv(adopt) => {
                    // A closed channel means none; a handoff may name the
                    // channel of one still to come.
                    *adopt = handoff.and_then(|h| puller.adopt(h));
                }
                m = puller.next(None) => break m?,
            }
        };
        let deadline = Instant::now() + b.max_wait;
        let mut bytes = first.payload.len() as u64;
        let mut held = vec![self.receive(first)];
        while held.len() < b.max_rows.get() && bytes < b.max_bytes {
            match puller.next(Some(deadline)).await {
                Some(m) => {
                    bytes += m.payload.len() as u64;
                    held.push(self.receive(m));
                }
                None => break,
            }
        }
        Some(held)
    }

    pub(super) fn count_received(&self, subject: &str) {
        self.families.received.with_label_values(&[subject]).inc();
        self.stats.received.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn receive(&self, msg: Message) -> Held {
        self.count_received(msg.subject.as_str());
        Held {
            _held: self.lag.hold(&msg),
            msg,
            received: Instant::now(),
        }
    }

    /// Prepares every event; invalid ones get the invalid policy at once.
    pub(super) async fn prepare_all(&self, held: Vec<Held>) -> Vec<Row> {
        let mut rows = Vec::with_capacity(held.len());
        for h in held {
            match self
                .compiled
                .prepare(&h.msg.payload, &self.meta(&h.msg), &self.headers(&h.msg))
            {
                Ok(Prepared {
                    rendered,
                    labels,
                    event_id,
                }) => rows.push(Row {
                    held: h,
                    labels,
                    event_id,
                    write: SinkRow {
                        rendered,
                        outcome: Outcome::Pending,
                    },
                }),
                Err(invalid) => self.reject(h, invalid).await,
            }
        }
        rows
    }

    /// What a template sees of the message as `msg` (only the subject
    /// when no template reads `msg`).
    pub(super) fn meta(&self, msg: &Message) -> MsgMeta {
        if !self.compiled.templates.reads_msg {
            return MsgMeta {
                subject: msg.subject.to_string(),
                ..MsgMeta::default()
            };
        }
        let info = msg.info().ok();
        MsgMeta {
            subject: msg.subject.to_string(),
            stream: info.as_ref().map(|i| i.stream.to_string()),
            seq: info.as_ref().map(|i| i.stream_sequence),
            delivered: info.as_ref().map(|i| i.delivered),
            time: info.as_ref().map(|i| {
                let nanos = i.published.unix_timestamp_nanos();
                chrono::DateTime::from_timestamp_nanos(nanos as i64)
                    .to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
            }),
        }
    }

    /// The first value of each header (none when no template reads them).
    pub(super) fn headers(&self, msg: &Message) -> BTreeMap<String, String> {
        if !self.compiled.templates.reads_headers {
            return BTreeMap::new();
        }
        msg.headers
            .iter()
            .flat_map(|h| h.iter())
            .filter_map(|(k, v)| v.first().map(|v| (k.to_string(), v.to_string())))
            .collect()
    }
}
