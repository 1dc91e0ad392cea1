//! Who owns a pipeline version's tasks, and what a panic becomes.
//!
//! The cancellation tree: the engine's shutdown token is the root; each
//! version's token is its child (a reload or a removed file cancels one
//! version, shutdown all at once); each run of the version's loop gets a
//! child of that, [`Crew::run`], which also ends when the loop panics. A
//! run's tasks belong to its [`Crew`]: writers to one tracker, the
//! dead-letter stage, the max-deliveries watch and the lag poll to another.
//! Whatever way the run ends, [`Pipeline::run`] joins both before it
//! returns or restarts, so no task outlives the version that started it.
//!
//! A panic in the loop, a writer or a stage is caught where the task is
//! owned, logged, reported as the pipeline's `failing` problem (on the side
//! it happened: the loop is the source side, a writer the sink side), and
//! the work is started again with backoff: a writer's panic cancels the
//! run's token, so the loop's run ends at once and restarts like a
//! panicked loop.
//! What the panicking task held is not acknowledged, so JetStream delivers
//! it again after `ack_wait`: nothing is lost, though those deliveries end
//! in no outcome of their own.

use std::any::Any;
use std::panic::AssertUnwindSafe;

use futures::FutureExt;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::*;
use crate::util::backoff::Backoff;

/// First and longest pause before a panicked loop runs again.
const RESTART_BACKOFF: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(30));

/// The pause before the loop runs again after a run of `ran` ended in a
/// panic: doubling while runs keep panicking, and back to the first pause
/// after a run that lasted at least the longest one, so panics a week
/// apart are each treated as the first.
fn restart_pause(backoff: &mut Backoff, ran: Duration) -> Duration {
    if ran >= RESTART_BACKOFF.1 {
        backoff.reset();
    }
    backoff.pause()
}

/// Why a run of the pipeline's loop ended.
pub(super) enum Ended {
    /// Told to stop: everything it held is settled or released.
    Stopped,
    /// A writer panicked: the loop restarts after a pause, like a panicked
    /// one.
    WriterPanicked,
}

/// The tasks of one run of a version's loop.
pub(super) struct Crew {
    /// Cancelled when the version stops, and when the run ends in any way
    /// (the watch and the poll then end).
    pub(super) run: CancellationToken,
    /// The batches being written.
    writers: TaskTracker,
    /// The dead-letter stage, the max-deliveries watch, the lag poll.
    stages: TaskTracker,
}

impl Crew {
    fn new(version: &CancellationToken) -> Self {
        Self {
            run: version.child_token(),
            writers: TaskTracker::new(),
            stages: TaskTracker::new(),
        }
    }

    /// Runs `stage` as one of the run's stages; its panic is reported on
    /// `side` and ends only that stage.
    pub(super) fn spawn_stage(
        &self,
        pipeline: &Arc<Pipeline>,
        side: Side,
        task: &'static str,
        stage: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        let pipeline = pipeline.clone();
        self.stages.spawn(async move {
            if let Err(panic) = AssertUnwindSafe(stage).catch_unwind().await {
                pipeline.panicked(side, task, &*panic);
            }
        });
    }
}

/// The message a panic carried.
pub(super) fn panic_text(panic: &(dyn Any + Send)) -> String {
    match (panic.downcast_ref::<&str>(), panic.downcast_ref::<String>()) {
        (Some(s), _) => (*s).to_string(),
        (_, Some(s)) => s.clone(),
        _ => "a panic without a message".to_string(),
    }
}

/// Waits `pause`; true when `stop` was cancelled meanwhile.
pub(super) async fn stopped_within(stop: &CancellationToken, pause: Duration) -> bool {
    tokio::select! {
        _ = stop.cancelled() => true,
        _ = tokio::time::sleep(pause) => false,
    }
}

impl Pipeline {
    /// Runs the pipeline until `stop` is cancelled (see
    /// [`Self::run_once`]); a panic of its loop is reported and the loop
    /// started again. Returns once every task it started has ended.
    pub async fn run(
        self: Arc<Self>,
        stop: CancellationToken,
        mut adopt: Option<mpsc::UnboundedReceiver<Handoff>>,
    ) {
        let mut backoff = Backoff::new(RESTART_BACKOFF);
        loop {
            let started = Instant::now();
            let crew = Crew::new(&stop);
            let once = self.clone().run_once(&stop, &crew, adopt.take());
            let ended = AssertUnwindSafe(once).catch_unwind().await;
            self.join(crew).await;
            let side = match ended {
                Ok(Ended::Stopped) => return,
                Ok(Ended::WriterPanicked) => Side::Sink,
                Err(panic) => {
                    self.panicked(Side::Source, "the pipeline's loop", &*panic);
                    Side::Source
                }
            };
            // The panic stays shown through the pause, and is cleared by
            // the restart: a batch in flight beside a panicked writer does
            // not clear it.
            let pause = restart_pause(&mut backoff, started.elapsed());
            self.health.pausing(side, pause);
            if stopped_within(&stop, pause).await {
                return;
            }
            self.writer_panicked.store(false, Ordering::Relaxed);
            if self.health.recover(side) {
                tracing::info!(pipeline = %self.name, "restarted after a panic");
            }
        }
    }

    /// Waits for a run's writers, then ends its stages: the watch and the
    /// poll with the run's token, the dead-letter stage by closing its
    /// outbox once nobody can post to it any more.
    async fn join(&self, crew: Crew) {
        crew.writers.close();
        crew.writers.wait().await;
        crew.run.cancel();
        self.outbox.lock().expect("outbox lock").take();
        crew.stages.close();
        crew.stages.wait().await;
    }

    /// Reports a panic of one of this pipeline's tasks.
    pub(super) fn panicked(&self, side: Side, task: &str, panic: &(dyn Any + Send)) {
        let text = panic_text(panic);
        tracing::error!(pipeline = %self.name, task, panic = %text,
            "task panicked; what it held is delivered again after ack_wait");
        self.health
            .fail(side, Severity::Failing, format!("{task} panicked: {text}"));
    }

    /// Writes a batch on a task of the crew's; a panic there is reported
    /// and ends the loop's run (the first write after the restart clears
    /// it).
    pub(super) fn spawn_writer(
        self: &Arc<Self>,
        crew: &Crew,
        rows: Vec<Row>,
        stop: CancellationToken,
        permit: OwnedSemaphorePermit,
    ) {
        let this = self.clone();
        let run = crew.run.clone();
        crew.writers.spawn(async move {
            let write = AssertUnwindSafe(this.write(rows, stop, permit)).catch_unwind();
            if let Err(panic) = write.await {
                this.panicked(Side::Sink, "a writer", &*panic);
                this.writer_panicked.store(true, Ordering::Relaxed);
                run.cancel();
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restarts_back_off_while_panicking_and_start_over_after_a_healthy_run() {
        let (first, longest) = RESTART_BACKOFF;
        let mut backoff = Backoff::new(RESTART_BACKOFF);
        let quick = Duration::from_millis(10);
        let pauses: Vec<_> = (0..3).map(|_| restart_pause(&mut backoff, quick)).collect();
        assert_eq!(pauses, [first, first * 2, first * 4]);
        assert_eq!(restart_pause(&mut backoff, longest), first);
        assert_eq!(restart_pause(&mut backoff, quick), first * 2);
    }
}
