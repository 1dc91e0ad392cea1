//! Panics surface: a panic in a pipeline's loop, a writer or the
//! dead-letter stage is caught where the task is owned, logged, reported as
//! the pipeline's `failing` problem (on the side it happened: the loop is
//! the source side, a writer the sink side), and the work is started again
//! with backoff: a writer's panic ends the loop's run after its current
//! batch, which then restarts like a panicked loop. What the panicking task held is not
//! acknowledged, so JetStream delivers it again after `ack_wait`: nothing is
//! lost, though those deliveries end in no outcome of their own.

use std::any::Any;
use std::panic::AssertUnwindSafe;

use futures::FutureExt;

use super::deadletter::stopped_within;
use super::*;
use crate::util::backoff::Backoff;

/// First and longest pause before a panicked loop runs again.
const RESTART_BACKOFF: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(30));

/// Why a run of the pipeline's loop ended.
pub(super) enum Ended {
    /// Told to stop: everything it held is settled or released.
    Stopped,
    /// A writer panicked: the loop restarts after a pause, like a panicked
    /// one.
    WriterPanicked,
}

/// The message a panic carried.
pub(super) fn panic_text(panic: &(dyn Any + Send)) -> String {
    match (panic.downcast_ref::<&str>(), panic.downcast_ref::<String>()) {
        (Some(s), _) => (*s).to_string(),
        (_, Some(s)) => s.clone(),
        _ => "a panic without a message".to_string(),
    }
}

impl Pipeline {
    /// Runs the pipeline until `stop` (see [`Self::run_once`]); a panic of
    /// its loop is reported and the loop started again.
    pub async fn run(
        self: Arc<Self>,
        mut stop: watch::Receiver<bool>,
        mut adopt: Option<mpsc::UnboundedReceiver<Handoff>>,
    ) {
        let mut backoff = Backoff::new(RESTART_BACKOFF);
        let mut restarted = false;
        loop {
            let once = self.clone().run_once(stop.clone(), adopt.take(), restarted);
            match AssertUnwindSafe(once).catch_unwind().await {
                Ok(Ended::Stopped) => return,
                // The panic stays shown through the pause: only a write of
                // the restarted loop clears it.
                Ok(Ended::WriterPanicked) => {}
                Err(panic) => self.panicked(Side::Source, "the pipeline's loop", &*panic),
            }
            if stopped_within(&mut stop, backoff.pause()).await {
                return;
            }
            self.writer_panicked.store(false, Ordering::Relaxed);
            restarted = true;
        }
    }

    /// Reports a panic of one of this pipeline's tasks.
    pub(super) fn panicked(&self, side: Side, task: &str, panic: &(dyn Any + Send)) {
        let text = panic_text(panic);
        tracing::error!(pipeline = %self.name, task, panic = %text,
            "task panicked; what it held is delivered again after ack_wait");
        self.health
            .fail(side, Severity::Failing, format!("{task} panicked: {text}"));
    }

    /// Writes a batch on a task of its own; a panic there is reported and
    /// ends the loop's run (the first write after the restart clears it).
    pub(super) fn spawn_writer(
        self: &Arc<Self>,
        rows: Vec<Row>,
        stop: watch::Receiver<bool>,
        permit: OwnedSemaphorePermit,
    ) {
        let this = self.clone();
        tokio::spawn(async move {
            let write = AssertUnwindSafe(this.write(rows, stop, permit)).catch_unwind();
            if let Err(panic) = write.await {
                this.panicked(Side::Sink, "a writer", &*panic);
                this.writer_panicked.store(true, Ordering::Relaxed);
            }
        });
    }
}
