//! The puller: bounded pull requests, ended by the engine's own clock, and
//! the source's health (pull errors repaired through `ensure`, with
//! backoff).

use super::request::{Pulled, Refusal, Request};
use super::*;
use crate::util::backoff::Backoff;

/// Delivers messages from bounded pull requests ([`REQUESTS_AHEAD`] of
/// at most `batch` messages and `max_bytes` bytes each). Messages delivered
/// while the pipeline is busy are buffered here, so the pipeline can keep
/// them alive.
pub struct Puller {
    consumer: PullConsumer,
    batch: usize,
    max_bytes: usize,
    pub(super) requests: VecDeque<Request>,
    pub(super) buffered: VecDeque<Message>,
    watch: SourceWatch,
    /// What to acknowledge again once a leader may have changed.
    acks: Arc<RecentAcks>,
    /// Set when a request was refused, abandoned by a new leader or lost:
    /// acks sent meanwhile may have reached nobody.
    disrupted: bool,
    /// Set when a message arrived after a disruption: the new leader is
    /// there to receive the acks again.
    resend_due: bool,
}

/// First and longest pause between two repairs of a source that cannot be
/// repaired (the stream or consumer cannot be ensured): a rejected pull
/// must not loop hot.
const REPAIR_BACKOFF: (Duration, Duration) = (Duration::from_millis(200), Duration::from_secs(5));

/// Longest pause between two pulls the server refuses although the
/// repair found the stream and consumer in place: a cluster electing the
/// consumer's leader answers 503 until it has one, and pulling must resume
/// soon after.
const REFUSED_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// How long a repair waits for each JetStream API answer: the client's
/// default (5 s) would hold pulling that long after a cluster has elected
/// a leader, when a request sent just before the election went unanswered.
const REPAIR_API_TIMEOUT: Duration = Duration::from_secs(2);

/// The source side's health: pull errors are problems, their repair is
/// [`ensure`] with backoff.
struct SourceWatch {
    target: Target,
    /// The target's JetStream context with [`REPAIR_API_TIMEOUT`].
    repair_js: jetstream::Context,
    health: Arc<Health>,
    pipeline: String,
    /// The last pull error, not yet repaired.
    trouble: Option<Refusal>,
    /// Wait before the next repair (zero for the first one).
    wait: Duration,
    /// The waits after a failed or refused repair.
    backoff: Backoff,
}

impl SourceWatch {
    /// A pull worked: the source is fine again.
    fn healthy(&mut self) {
        if self.wait.is_zero() {
            return;
        }
        self.wait = Duration::ZERO;
        self.backoff.reset();
        if self.health.recover(Side::Source) {
            tracing::info!(pipeline = %self.pipeline, "pulling again");
        }
    }

    /// Reports the pending trouble, waits out the backoff and ensures the
    /// stream and consumer. Returns the new consumer, or None (trouble kept)
    /// when `deadline` comes first or the repair failed.
    async fn repair(&mut self, deadline: Option<Instant>) -> Option<PullConsumer> {
        let trouble = self.trouble.clone()?;
        let wake = Instant::now() + self.wait;
        if deadline.is_some_and(|d| d < wake) {
            return None;
        }
        if self
            .health
            .fail(Side::Source, trouble.severity, &trouble.error)
        {
            tracing::warn!(pipeline = %self.pipeline, error = %trouble.error,
                "cannot pull: the consumer or stream is gone, refuses or has no leader; ensuring them");
        }
        self.health.pausing(Side::Source, self.wait);
        tokio::time::sleep_until(wake).await;
        let next = self.backoff.pause();
        let t = &self.target;
        match ensure(&self.repair_js, &t.stream, &t.consumer, t.max_ack_pending).await {
            Ok((_, consumer)) => {
                self.wait = next.min(REFUSED_BACKOFF_MAX);
                self.trouble = None;
                Some(consumer)
            }
            Err(e) => {
                self.wait = next;
                let error = format!("{e:#}");
                self.health.fail(Side::Source, Severity::Failing, &error);
                self.health.pausing(Side::Source, next);
                self.trouble = Some(Refusal {
                    error,
                    severity: Severity::Failing,
                });
                None
            }
        }
    }
}

impl Puller {
    pub fn new(
        consumer: PullConsumer,
        batch: usize,
        max_bytes: usize,
        target: Target,
        health: Arc<Health>,
        pipeline: &str,
        acks: Arc<RecentAcks>,
    ) -> Self {
        Self {
            consumer,
            batch,
            max_bytes,
            requests: VecDeque::new(),
            buffered: VecDeque::new(),
            watch: SourceWatch {
                repair_js: {
                    let mut js = target.js.clone();
                    js.set_timeout(REPAIR_API_TIMEOUT);
                    js
                },
                target,
                health,
                pipeline: pipeline.to_string(),
                trouble: None,
                wait: Duration::ZERO,
                backoff: Backoff::new(REPAIR_BACKOFF),
            },
            acks,
            disrupted: false,
            resend_due: false,
        }
    }

    /// The next message, keeping [`REQUESTS_AHEAD`] requests open; None when
    /// `deadline` passes first.
    pub async fn next(&mut self, deadline: Option<Instant>) -> Option<Message> {
        loop {
            if let Some(m) = self.buffered.pop_front() {
                return Some(m);
            }
            self.top_up(deadline).await;
            if self.requests.is_empty() {
                if deadline.is_some() {
                    return None;
                }
                continue; // a failed repair: the next one waits its backoff
            }
            // In a backlog the next message is mostly here already: taken
            // without arming a timer.
            let ready = std::future::poll_fn(|cx| self.poll_requests(cx)).now_or_never();
            if let Some((next, index)) = ready {
                self.take(next, index);
                self.resend_acks_if_due().await;
                continue;
            }
            match deadline {
                Some(d) => tokio::time::timeout_at(d, self.drain_open()).await.ok()?,
                None => self.drain_open().await,
            }
        }
    }

    /// Repairs the source if a pull failed, then opens requests until
    /// [`REQUESTS_AHEAD`] are open. When none is open and NATS refuses
    /// (down), retries every second until `deadline`.
    async fn top_up(&mut self, deadline: Option<Instant>) {
        if self.watch.trouble.is_some() {
            match self.watch.repair(deadline).await {
                Some(consumer) => self.consumer = consumer,
                None => return,
            }
        }
        while self.requests.iter().filter(|r| r.is_open()).count() < REQUESTS_AHEAD {
            let opened = Request::open(
                &self.consumer,
                &self.watch.target.js,
                self.batch,
                self.max_bytes,
            );
            match opened.await {
                Ok(request) => self.requests.push_back(request),
                Err(e) if self.requests.is_empty() => {
                    tracing::warn!(error = %e, "cannot open a pull request; retrying");
                    let wake = Instant::now() + Duration::from_secs(1);
                    if deadline.is_some_and(|d| d < wake) {
                        return;
                    }
                    tokio::time::sleep_until(wake).await;
                }
                Err(_) => return,
            }
        }
    }

    /// Moves the next message of any open request (JetStream may deliver to
    /// any of them) into the buffer, without opening another; a request
    /// that ends is dropped, one the server refused is noted for repair.
    /// Pending forever when none is open. Also used while the pipeline
    /// waits, so delivered messages are held (and kept alive), not left in a
    /// socket buffer to time out.
    pub async fn drain_open(&mut self) {
        if self.end_expired() {
            return; // the caller may open new ones
        }
        let Some(first_expiry) = self.requests.iter().map(|r| r.expires).min() else {
            return std::future::pending().await;
        };
        let (next, index) = tokio::select! {
            biased;
            next = std::future::poll_fn(|cx| self.poll_requests(cx)) => next,
            // The server may drop an expired request without its timeout
            // reply (nats-server 2.9.10): end it by our own clock rather than
            // wait for the client's 5 s fallback.
            _ = tokio::time::sleep_until(first_expiry + EXPIRY_GRACE) => {
                self.end_expired();
                self.watch.healthy();
                return;
            }
        };
        self.take(next, index);
        self.resend_acks_if_due().await;
    }

    /// Acknowledges the recent messages again once a leader delivers after
    /// a disruption (see [`RecentAcks`]).
    async fn resend_acks_if_due(&mut self) {
        if std::mem::take(&mut self.resend_due) {
            let sent = self.acks.resend().await;
            tracing::info!(pipeline = %self.watch.pipeline, acks = sent,
                "pulling after a refused or lost pull request: recent acknowledgements sent again");
        }
    }

    /// Buffers what request `index` gave: a message, its end, or the
    /// server's refusal.
    fn take(&mut self, next: Pulled, index: usize) {
        match next {
            Pulled::Message(m) => {
                self.watch.healthy();
                self.buffered.push_back(m);
                self.resend_due |= std::mem::take(&mut self.disrupted);
            }
            Pulled::Done => {
                self.requests.remove(index);
                self.watch.healthy();
            }
            Pulled::LeaderChanged => self.disrupted = true,
            Pulled::Refused(trouble) => {
                self.requests.remove(index);
                self.watch.trouble = Some(trouble);
                self.disrupted = true;
            }
        }
    }

    /// The next item of the first open request that has one, with its index.
    fn poll_requests(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<(Pulled, usize)> {
        for (index, request) in self.requests.iter_mut().enumerate() {
            if let std::task::Poll::Ready(next) = request.poll_next(cx) {
                return std::task::Poll::Ready((next, index));
            }
        }
        std::task::Poll::Pending
    }

    /// Ends the requests past their expiry (plus grace) by our clock, after
    /// taking the messages they already delivered: a message left in a
    /// dropped request would wait out the ack wait. True if any ended.
    fn end_expired(&mut self) -> bool {
        let now = Instant::now();
        if self.requests.iter().all(|r| r.expires + EXPIRY_GRACE > now) {
            return false;
        }
        let open = self.requests.len();
        let mut kept = VecDeque::with_capacity(open);
        for mut request in self.requests.drain(..) {
            if request.expires + EXPIRY_GRACE > now {
                kept.push_back(request);
                continue;
            }
            self.buffered.extend(request.take_ready());
            self.disrupted |= request.lost();
        }
        self.requests = kept;
        self.requests.len() < open
    }

    /// Stops pulling: returns every message buffered or still to come on
    /// the open requests. A request is read until its expiry plus a short
    /// grace, by our own clock: some servers (nats-server 2.9.10) may drop
    /// an expired request without the timeout reply, and the client's own
    /// fallback waits 5 s more.
    pub async fn finish(&mut self) -> Vec<Message> {
        let mut rest: Vec<Message> = self.buffered.drain(..).collect();
        while let Some(mut request) = self.requests.pop_front() {
            let until = request.expires + EXPIRY_GRACE;
            loop {
                let next = std::future::poll_fn(|cx| request.poll_next(cx));
                match tokio::time::timeout_at(until, next).await {
                    Ok(Pulled::Message(m)) => rest.push(m),
                    Ok(Pulled::LeaderChanged) => continue,
                    _ => break,
                }
            }
        }
        rest
    }

    pub fn buffered(&self) -> impl Iterator<Item = &Message> {
        self.buffered.iter()
    }
}
