//! Keeping held messages alive: progress acknowledgements every `ack_wait /
//! 3` while a batch waits for a write slot, the database or a backoff.

use super::*;

impl Pipeline {
    /// Waits for a write slot while keeping `rows` and the puller's
    /// buffered messages alive.
    pub(super) async fn wait_for_slot(
        &self,
        slots: &Arc<Semaphore>,
        rows: &[Row],
        puller: &mut Puller,
    ) -> OwnedSemaphorePermit {
        let keepalive = self.keepalive_period();
        let mut next_progress = Instant::now() + keepalive;
        loop {
            tokio::select! {
                permit = slots.clone().acquire_owned() => return permit.expect("the semaphore is never closed"),
                _ = puller.drain_open() => {}
                _ = tokio::time::sleep_until(next_progress) => {
                    let held = rows.iter().map(|r| &r.held.msg).chain(puller.buffered());
                    progress(held).await;
                    next_progress = Instant::now() + keepalive;
                }
            }
        }
    }

    pub(super) fn keepalive_period(&self) -> Duration {
        (self.cfg.source.nats.consumer.ack_wait / 3).max(Duration::from_millis(100))
    }

    /// Awaits `fut` (a write attempt, a backoff) while sending progress acks
    /// for the batch's messages whenever `next_progress` comes: an attempt
    /// may take longer than the ack wait (a lock, a connect timeout), and
    /// JetStream must not redeliver what the engine still holds.
    pub(super) async fn keeping_alive<T>(
        &self,
        fut: impl std::future::Future<Output = T>,
        messages: &[&Message],
        next_progress: &mut Instant,
    ) -> T {
        tokio::pin!(fut);
        loop {
            tokio::select! {
                out = &mut fut => return out,
                _ = tokio::time::sleep_until(*next_progress) => {
                    progress(messages.iter().copied()).await;
                    *next_progress = Instant::now() + self.keepalive_period();
                }
            }
        }
    }
}

pub(super) async fn progress<'a>(messages: impl Iterator<Item = &'a Message>) {
    for m in messages {
        let _ = m.ack_with(AckKind::Progress).await;
    }
}
