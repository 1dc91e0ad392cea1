//! Writing a batch: attempts until every row is stored or rejected, held
//! with capped backoff while the database is away or the pipeline is
//! failing, and runs of identical rejections taken for the table's fault.

use super::supervise::stopped_within;
use super::*;
use crate::util::backoff::Backoff;

impl Pipeline {
    /// Writes a batch until every row is stored or rejected, settling rows
    /// as soon as their fate is known. A failed attempt holds the rest:
    /// retried with capped backoff, and reported as retrying (the database
    /// is away) or failing (the pipeline's statement or table is broken).
    /// On stop while held (at once, also in the middle of a pause), the
    /// rest is released for redelivery.
    pub(super) async fn write(
        &self,
        mut rows: Vec<Row>,
        stop: CancellationToken,
        _permit: OwnedSemaphorePermit,
    ) {
        for row in &rows {
            crate::util::testhook::panic_point("write", &row.held.msg.payload);
        }
        let policy = &self.cfg.on_error.transient;
        let mut backoff = Backoff::new((policy.backoff_initial, policy.backoff_max));
        let oldest = rows.iter().map(|r| r.held.received).min();
        let mut next_progress = oldest.unwrap_or_else(Instant::now) + self.keepalive_period();
        loop {
            let result = {
                let (messages, mut writes): (Vec<&Message>, Vec<&mut SinkRow>) =
                    rows.iter_mut().map(|r| (&r.held.msg, &mut r.write)).unzip();
                let attempt = self.sink.write_bounded(&mut writes, Finish::Commit);
                let attempt = self.keeping_alive(attempt, &messages, &mut next_progress);
                unless_stopped_for(attempt, &stop, self.stop_patience).await
            };
            let Some(result) = result else {
                tracing::warn!(pipeline = %self.name, patience = ?self.stop_patience,
                    "stopping: a write attempt did not end in time; its batch is released for redelivery");
                return self.release(rows).await;
            };
            let held = result.err().or_else(|| self.suspect_rejections(&mut rows));
            rows = self.settle(rows).await;
            let Some(problem) = held else { break };
            let pause = backoff.pause();
            self.hold(&problem, pause, &rows);
            let messages: Vec<&Message> = rows.iter().map(|r| &r.held.msg).collect();
            let pause = stopped_within(&stop, pause);
            if self
                .keeping_alive(pause, &messages, &mut next_progress)
                .await
            {
                return self.release(rows).await;
            }
            self.count_received(rows.iter().map(|r| &r.held.msg));
        }
        // A writer's panic is cleared by the restart, not by a batch that
        // was in flight beside it.
        let panicked = self.writer_panicked.load(Ordering::Relaxed);
        if !panicked && self.health.recover(Side::Sink) {
            tracing::info!(pipeline = %self.name, "writing again");
        }
    }

    /// Reports a failed attempt: health, metrics, and a log line. As in the
    /// collector, each failed attempt is a processing error and each retry
    /// a new attempt, so received = processed + failed.
    pub(super) fn hold(&self, problem: &WriteError, backoff: Duration, rows: &[Row]) {
        let severity = match problem {
            WriteError::Transient(_) => Severity::Retrying,
            WriteError::Pipeline(_) => Severity::Failing,
        };
        if self.health.fail(Side::Sink, severity, problem.to_string())
            && severity == Severity::Failing
        {
            tracing::error!(pipeline = %self.name, error = %problem, "the pipeline is failing: nothing is acknowledged until its statement or table is fixed");
        }
        self.health.pausing(Side::Sink, backoff);
        self.engine
            .engine
            .sink_retries
            .with_label_values(&[&self.name])
            .inc();
        tracing::warn!(pipeline = %self.name, error = %problem, retry_in = ?backoff, "write failed; holding the batch");
        rows.iter()
            .for_each(|r| self.count_failure(&r.held, Reason::ProcessingError));
    }

    /// Turns the batch's database rejections back into pending rows when
    /// they continue a run of `failing_after` rows rejected with the same
    /// SQLSTATE: then the table (a new CHECK, a lagging foreign-key
    /// parent), not the events, is the likely cause, and acknowledging
    /// them away would lose them silently.
    pub(super) fn suspect_rejections(&self, rows: &mut [Row]) -> Option<WriteError> {
        let limit = self.cfg.on_error.invalid.failing_after;
        if limit == 0 {
            return None;
        }
        let mut run = self.rejected_run.lock().expect("rejected run lock");
        let mut suspect = None;
        for row in rows.iter() {
            match &row.write.outcome {
                Outcome::Stored => *run = RejectedRun::default(),
                Outcome::Rejected(Rejection {
                    sqlstate: Some(state),
                    error,
                }) => {
                    if run.sqlstate != Some(*state) {
                        *run = RejectedRun {
                            sqlstate: Some(*state),
                            rows: 0,
                        };
                    }
                    run.rows += 1;
                    if run.rows >= limit {
                        suspect = Some((*state, error.clone()));
                    }
                }
                _ => {}
            }
        }
        let (state, error) = suspect?;
        for row in rows.iter_mut() {
            if matches!(&row.write.outcome, Outcome::Rejected(r) if r.sqlstate == Some(state)) {
                row.write.outcome = Outcome::Pending;
            }
        }
        Some(WriteError::Pipeline(format!(
            "{limit} or more events in a row were rejected with SQLSTATE {state} (last: {error}); \
             the table, not the events, is the likely cause, so they are held \
             (raise on_error.invalid.failing_after if these events really are bad)"
        )))
    }
}

/// `fut`'s output, unless `stop` is cancelled and `fut` then takes longer
/// than `patience` (a statement on a database that stopped answering).
async fn unless_stopped_for<T>(
    fut: impl std::future::Future<Output = T>,
    stop: &CancellationToken,
    patience: Duration,
) -> Option<T> {
    tokio::pin!(fut);
    tokio::select! {
        out = &mut fut => return Some(out),
        _ = stop.cancelled() => {}
    }
    tokio::time::timeout(patience, fut).await.ok()
}
