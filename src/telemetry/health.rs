//! What keeps a running pipeline from making progress, seen from outside:
//! `/ready`, `/pipelines` and the `ingestd_pipeline_*` metrics all read the
//! same [`Health`], so they can never disagree.
//!
//! A problem belongs to one side of the pipeline. The source side is NATS
//! (a consumer or stream that vanished, pulls the server rejects); the sink
//! side is Postgres (unreachable, or refusing the pipeline's statement); the
//! dead-letter side is the stream that takes dead letters (gone, or
//! refusing them), which holds only the letters, never valid events.
//! Each side is either fine, *retrying* (transient: it is expected to pass
//! by itself) or *failing* (the pipeline's own fault: an operator must act,
//! for example with a migration or a GRANT).

use std::sync::Mutex;
use std::time::Duration;

use prometheus::{IntCounterVec, IntGaugeVec};
use serde::{Deserialize, Serialize};

/// The part of a pipeline a problem is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    Source,
    Sink,
    #[serde(rename = "dead_letters")]
    DeadLetters,
}

impl Side {
    const ALL: [Side; 3] = [Side::Source, Side::Sink, Side::DeadLetters];

    pub fn as_str(self) -> &'static str {
        match self {
            Side::Source => "source",
            Side::Sink => "sink",
            Side::DeadLetters => "dead_letters",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// How bad a problem is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Expected to pass by itself (an outage); retried with backoff.
    Retrying,
    /// Will not pass without an operator (a broken statement or consumer);
    /// retried slowly in case it has been fixed.
    Failing,
}

/// One side's current problem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    pub side: Side,
    pub severity: Severity,
    pub error: String,
    /// Failed attempts since the side was last fine: an operator tells a
    /// blip from a side that keeps failing.
    #[serde(default)]
    pub attempts: u64,
    /// The pause the side waits after its latest failed attempt before the
    /// next one, in milliseconds: shows that a side that keeps failing
    /// backs off rather than retrying hot. Absent until the pause is chosen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_in_ms: Option<u64>,
}

/// The problems of one pipeline and the metrics that publish them.
pub struct Health {
    pipeline: String,
    /// One slot per [`Side`], in the order of [`Side::ALL`].
    sides: [Mutex<Option<Problem>>; 3],
    metrics: HealthMetrics,
}

/// The engine-wide families [`Health`] reports to.
#[derive(Clone)]
pub struct HealthMetrics {
    /// 1 while the pipeline's side is failing or retrying (`severity`).
    pub state: IntGaugeVec,
    /// Failed attempts per side and severity.
    pub failures: IntCounterVec,
}

impl HealthMetrics {
    pub fn new() -> prometheus::Result<Self> {
        Ok(Self {
            state: IntGaugeVec::new(
                prometheus::Opts::new(
                    "ingestd_pipeline_problem",
                    "1 while a pipeline's side (source, sink or dead_letters) is failing or retrying",
                ),
                &["pipeline", "side", "severity"],
            )?,
            failures: IntCounterVec::new(
                prometheus::Opts::new(
                    "ingestd_pipeline_failures_total",
                    "Failed attempts to pull or write, by pipeline, side and severity",
                ),
                &["pipeline", "side", "severity"],
            )?,
        })
    }

    pub fn register(&self, registry: &prometheus::Registry) -> prometheus::Result<()> {
        registry.register(Box::new(self.state.clone()))?;
        registry.register(Box::new(self.failures.clone()))
    }
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Severity::Retrying => "retrying",
            Severity::Failing => "failing",
        }
    }
}

impl Health {
    pub fn new(pipeline: &str, metrics: HealthMetrics) -> Self {
        Self {
            pipeline: pipeline.to_string(),
            sides: Default::default(),
            metrics,
        }
    }

    fn slot(&self, side: Side) -> &Mutex<Option<Problem>> {
        &self.sides[side.index()]
    }

    /// Records a failed attempt. Returns true when this changes the side's
    /// state (so callers log once per change, not once per attempt).
    pub fn fail(&self, side: Side, severity: Severity, error: impl Into<String>) -> bool {
        let error = error.into();
        self.metrics
            .failures
            .with_label_values(&[&self.pipeline, side.as_str(), severity.as_str()])
            .inc();
        let mut slot = self.slot(side).lock().expect("health lock");
        let changed = slot.as_ref().map(|p| p.severity) != Some(severity);
        if let Some(old) = slot.as_ref().filter(|_| changed) {
            self.gauge(side, old.severity).set(0);
        }
        self.gauge(side, severity).set(1);
        let attempts = slot.as_ref().map_or(0, |p| p.attempts) + 1;
        *slot = Some(Problem {
            side,
            severity,
            error,
            attempts,
            retry_in_ms: None,
        });
        changed
    }

    /// Records the pause chosen after the side's latest failed attempt
    /// (nothing when the side is fine).
    pub fn pausing(&self, side: Side, pause: Duration) {
        if let Some(problem) = self.slot(side).lock().expect("health lock").as_mut() {
            problem.retry_in_ms = Some(u64::try_from(pause.as_millis()).unwrap_or(u64::MAX));
        }
    }

    /// Records a successful attempt. Returns true when the side had a
    /// problem until now.
    pub fn recover(&self, side: Side) -> bool {
        let old = self.slot(side).lock().expect("health lock").take();
        if let Some(old) = &old {
            self.gauge(side, old.severity).set(0);
        }
        old.is_some()
    }

    fn gauge(&self, side: Side, severity: Severity) -> prometheus::IntGauge {
        self.metrics
            .state
            .with_label_values(&[&self.pipeline, side.as_str(), severity.as_str()])
    }

    /// The side's current problem, if any.
    pub fn problem(&self, side: Side) -> Option<Problem> {
        self.slot(side).lock().expect("health lock").clone()
    }

    /// The worst of the sides' problems (failing before retrying; at equal
    /// severity the sink, then the source, then the dead letters).
    pub fn worst(&self) -> Option<Problem> {
        [Side::Sink, Side::Source, Side::DeadLetters]
            .into_iter()
            .filter_map(|side| self.problem(side))
            .reduce(|worst, p| match p.severity > worst.severity {
                true => p,
                false => worst,
            })
    }

    /// Stops publishing this pipeline's gauges (it is being replaced or
    /// removed; a successor publishes its own).
    pub fn release(&self) {
        for side in Side::ALL {
            self.recover(side);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_changes_are_reported_once_and_published() {
        let metrics = HealthMetrics::new().unwrap();
        let h = Health::new("p", metrics.clone());
        assert!(h.fail(Side::Sink, Severity::Retrying, "down"));
        assert!(!h.fail(Side::Sink, Severity::Retrying, "still down"));
        assert!(h.fail(Side::Sink, Severity::Failing, "no table"));
        let gauge = |sev| metrics.state.with_label_values(&["p", "sink", sev]).get();
        assert_eq!((gauge("retrying"), gauge("failing")), (0, 1));
        assert_eq!(h.worst().unwrap().error, "no table");
        assert!(h.fail(Side::Source, Severity::Retrying, "no consumer"));
        assert_eq!(h.worst().unwrap().side, Side::Sink);
        assert!(h.recover(Side::Sink));
        assert!(!h.recover(Side::Sink));
        assert_eq!(h.worst().unwrap().side, Side::Source);
        assert_eq!(gauge("failing"), 0);
        assert!(h.fail(Side::DeadLetters, Severity::Failing, "refused"));
        assert_eq!(h.worst().unwrap().side, Side::DeadLetters);
        let attempts = metrics
            .failures
            .with_label_values(&["p", "sink", "retrying"])
            .get();
        assert_eq!(attempts, 2);
    }

    #[test]
    fn a_problem_counts_its_attempts_and_shows_its_pause_until_recovered() {
        let h = Health::new("p", HealthMetrics::new().unwrap());
        h.pausing(Side::Source, Duration::from_secs(1));
        assert_eq!(h.problem(Side::Source), None);
        h.fail(Side::Source, Severity::Retrying, "no leader");
        assert_eq!(h.problem(Side::Source).unwrap().retry_in_ms, None);
        h.pausing(Side::Source, Duration::from_millis(200));
        h.fail(Side::Source, Severity::Failing, "foreign stream");
        h.pausing(Side::Source, Duration::from_millis(400));
        let p = h.problem(Side::Source).unwrap();
        assert_eq!((p.attempts, p.retry_in_ms), (2, Some(400)));
        h.recover(Side::Source);
        h.fail(Side::Source, Severity::Retrying, "no leader");
        assert_eq!(h.problem(Side::Source).unwrap().attempts, 1);
    }
}
