//! Collecting a batch: receiving messages (max_rows, max_bytes, max_wait),
//! and preparing each into a row (its message's metadata and headers,
//! decode, validate, render).

use super::*;

/// How long a batch may keep filling past `max_wait` while JetStream
/// reports more messages pending for the consumer: in a backlog the next
/// messages are on their way, and a batch cut short costs a transaction.
const BACKLOG_WAIT: Duration = Duration::from_millis(60);
/// The shortest wait for the next message of a backlog (`max_wait` may be
/// zero).
const BACKLOG_STEP: Duration = Duration::from_millis(1);

impl Pipeline {
    /// Waits for the first message, then gathers until `max_rows` or
    /// `max_wait` after the first; in a backlog, until `max_rows` or
    /// [`BACKLOG_WAIT`]. None once `stop` is cancelled.
    pub(super) async fn collect(
        &self,
        puller: &mut Puller,
        stop: &CancellationToken,
        adopt: &mut Option<mpsc::UnboundedReceiver<Handoff>>,
    ) -> Option<Vec<Held>> {
        let b = &self.cfg.sink.postgres.batch;
        let first = loop {
            tokio::select! {
                biased;
                _ = stop.cancelled() => return None,
                handoff = recv(adopt) => {
                    // A closed channel means none; a handoff may name the
                    // channel of one still to come.
                    *adopt = handoff.and_then(|h| puller.adopt(h));
                }
                m = puller.next(None) => break m?,
            }
        };
        let start = Instant::now();
        let mut deadline = start + b.max_wait;
        let mut bytes = first.payload.len() as u64;
        let mut held = vec![self.receive(first)];
        // What the batch held when it was last extended (see `worth_waiting`).
        let mut extended_at = None;
        while held.len() < b.max_rows.get() && bytes < b.max_bytes {
            match puller.next(Some(deadline)).await {
                Some(m) => {
                    bytes += m.payload.len() as u64;
                    held.push(self.receive(m));
                }
                None if deadline < start + BACKLOG_WAIT
                    && worth_waiting(&held, extended_at == Some(held.len()), b.max_rows.get()) =>
                {
                    extended_at = Some(held.len());
                    let step = b.max_wait.max(BACKLOG_STEP);
                    deadline = (Instant::now() + step).min(start + BACKLOG_WAIT);
                }
                None => break,
            }
        }
        self.count_received(held.iter().map(|h| &h.msg));
        Some(held)
    }

    /// Counts deliveries by subject, one series lookup per run of a
    /// subject (a batch's messages mostly share theirs).
    pub(super) fn count_received<'a>(&self, messages: impl Iterator<Item = &'a Message>) {
        let mut run: Option<(&str, u64)> = None;
        let mut total = 0;
        for subject in messages.map(|m| m.subject.as_str()) {
            total += 1;
            match &mut run {
                Some((last, n)) if *last == subject => *n += 1,
                _ => {
                    if let Some(ended) = run.replace((subject, 1)) {
                        self.count_run(ended);
                    }
                }
            }
        }
        if let Some(ended) = run {
            self.count_run(ended);
        }
        self.stats.received.fetch_add(total, Ordering::Relaxed);
    }

    fn count_run(&self, (subject, n): (&str, u64)) {
        let counter = self.families.received.with_label_values(&[subject]);
        counter.inc_by(n as f64);
    }

    pub(super) fn receive(&self, msg: Message) -> Held {
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
            crate::util::testhook::panic_point("prepare", &h.msg.payload);
            match self
                .compiled
                .prepare(&h.msg.payload, &self.meta(&h.msg), &self.headers(&h.msg))
            {
                Ok(Prepared { rendered, labels }) => rows.push(Row {
                    write: SinkRow {
                        rendered,
                        outcome: Outcome::Pending,
                        seq: self.ledger_seq(&h.msg),
                    },
                    held: h,
                    labels,
                }),
                Err(invalid) => self.reject(h, invalid).await,
            }
        }
        rows
    }

    /// What a template sees of the message as `msg` (only the subject
    /// when no template reads `msg`, nothing when none reads either).
    pub(super) fn meta(&self, msg: &Message) -> MsgMeta {
        let templates = &self.compiled.templates;
        if !templates.reads_msg {
            return MsgMeta {
                subject: match templates.reads_subject {
                    true => msg.subject.to_string(),
                    false => String::new(),
                },
                ..MsgMeta::default()
            };
        }
        match msg.info() {
            Ok(i) => MsgMeta::delivered(
                msg.subject.to_string(),
                i.stream.to_string(),
                i.stream_sequence,
                i.delivered,
                i.published,
            ),
            Err(_) => MsgMeta {
                subject: msg.subject.to_string(),
                ..MsgMeta::default()
            },
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

/// True when the server had more messages for the consumer after the
/// batch's last one (JetStream tells with each delivery), unless the last
/// step brought nothing (`quiet`) and those messages would not fill the
/// batch: a backlog over a slow link is worth the wait, a count that stays
/// above zero while nothing comes is not. After a reload the server counts
/// one message pending for about a second (while the predecessor's pull
/// requests are open), and every batch of a steady trickle waited the
/// whole [`BACKLOG_WAIT`] for it.
fn worth_waiting(held: &[Held], quiet: bool, max_rows: usize) -> bool {
    let pending = held
        .last()
        .and_then(|h| h.msg.info().ok())
        .map_or(0, |info| info.pending);
    let lacking = max_rows.saturating_sub(held.len()) as u64;
    pending > 0 && (!quiet || pending >= lacking)
}
