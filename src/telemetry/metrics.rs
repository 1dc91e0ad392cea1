//! Prometheus metrics: one family set per metric prefix, shared by the
//! pipelines that use it, plus the engine's own `ingestd_*` families.
//!
//! Family names and label names are declared by pipeline files (tiktok.yaml
//! reproduces the collector's `collector_*` families exactly), so families
//! are created on demand and checked for consistency instead of being
//! statics.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use prometheus::core::{Collector, Desc, MetricVec, MetricVecBuilder};
use prometheus::proto::{LabelPair, MetricFamily};
use prometheus::{
    Counter, CounterVec, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounterVec, Opts,
    Registry,
};

use crate::config::reason::Reason;
use crate::config::MetricsConfig;
use crate::telemetry::health::HealthMetrics;
use crate::telemetry::lag::LagMetrics;

/// Label value for duration labels of failed events that the pipeline's
/// `failed_labels` do not fix (the event is not trusted).
const UNKNOWN: &str = "unknown";

/// The engine's registry and the pipelines' family sets.
pub struct Metrics {
    pub registry: Registry,
    sets: Mutex<HashMap<String, SetEntry>>,
    pub engine: EngineMetrics,
    /// The NATS connection state, for family sets created later.
    nats_connected: std::sync::atomic::AtomicBool,
}

/// A family set and the pipeline files using it: the set disappears when
/// the last one goes, and is replaced when its only user changes labels.
struct SetEntry {
    set: Arc<FamilySet>,
    owners: BTreeSet<PathBuf>,
}

/// Families about the engine itself, not about events.
pub struct EngineMetrics {
    /// Write attempts that failed transiently, per pipeline.
    pub sink_retries: IntCounterVec,
    /// Events published to a dead-letter subject, per pipeline.
    pub dead_letters: IntCounterVec,
    /// Pipeline (re)loads by file and result (`success`, `failure`).
    pub reloads: IntCounterVec,
    /// Deliveries acknowledged without a write because the exactly-once
    /// ledger held their sequence already, per pipeline.
    pub duplicates: IntCounterVec,
    /// Pipelines' lag and freshness (see [`crate::telemetry::lag`]).
    pub lag: LagMetrics,
    /// Pipelines' problems (see [`crate::telemetry::health`]).
    pub health: HealthMetrics,
    /// Label sets folded into `other` by a family's cap, per family.
    pub label_folds: IntCounterVec,
}

/// The per-event families of one prefix.
pub struct FamilySet {
    key: String,
    /// The set's own registry: a prometheus registry never accepts a name
    /// again with other label names, so a set whose labels change is
    /// replaced whole, registry and all.
    registry: Registry,
    pub received: Guarded<CounterVec, Counter>,
    pub processed: Guarded<CounterVec, Counter>,
    pub failed: Guarded<CounterVec, Counter>,
    pub duration: Guarded<HistogramVec, Histogram>,
    pub nats_up: Gauge,
}

impl Metrics {
    pub fn new() -> anyhow::Result<Self> {
        let registry = Registry::new();
        let engine = EngineMetrics {
            sink_retries: IntCounterVec::new(
                Opts::new(
                    "ingestd_sink_retries_total",
                    "Batch writes that failed transiently and were retried",
                ),
                &["pipeline"],
            )?,
            dead_letters: IntCounterVec::new(
                Opts::new(
                    "ingestd_dead_letters_total",
                    "Events published to a dead-letter subject",
                ),
                &["pipeline", "reason"],
            )?,
            reloads: IntCounterVec::new(
                Opts::new(
                    "ingestd_reloads_total",
                    "Pipeline file loads, by file and result",
                ),
                &["file", "result"],
            )?,
            duplicates: IntCounterVec::new(
                Opts::new(
                    "ingestd_duplicates_total",
                    "Deliveries acknowledged without running their statement: the exactly-once ledger held their sequence",
                ),
                &["pipeline"],
            )?,
            lag: LagMetrics::new()?,
            health: HealthMetrics::new()?,
            label_folds: IntCounterVec::new(
                Opts::new(
                    "ingestd_metric_label_folds_total",
                    "Observations recorded under label value `other` because their family reached max_label_sets",
                ),
                &["family"],
            )?,
        };
        registry.register(Box::new(engine.label_folds.clone()))?;
        registry.register(Box::new(engine.sink_retries.clone()))?;
        registry.register(Box::new(engine.dead_letters.clone()))?;
        registry.register(Box::new(engine.reloads.clone()))?;
        registry.register(Box::new(engine.duplicates.clone()))?;
        engine.lag.register(&registry)?;
        engine.health.register(&registry)?;
        Ok(Self {
            registry,
            sets: Mutex::new(HashMap::new()),
            engine,
            nats_connected: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// The family set for a pipeline's metrics section: created on first
    /// use, shared when another pipeline declares the same names and labels,
    /// replaced when its only user (`owner`) changes them, refused when
    /// another pipeline uses the prefix with other labels.
    pub fn family_set(&self, cfg: &MetricsConfig, owner: &Path) -> anyhow::Result<Arc<FamilySet>> {
        let key = format!("{cfg:?}");
        let mut sets = self.sets.lock().expect("metrics lock");
        if let Some(entry) = sets.get_mut(&cfg.prefix) {
            if entry.set.key == key {
                entry.owners.insert(owner.to_path_buf());
                return Ok(entry.set.clone());
            }
            anyhow::ensure!(
                entry.owners.iter().all(|o| o == owner),
                "metrics prefix `{}` is already used by {} with different labels",
                cfg.prefix,
                entry
                    .owners
                    .iter()
                    .next()
                    .map_or(String::new(), |o| o.display().to_string())
            );
        }
        let set = Arc::new(FamilySet::new(cfg, key, &self.engine.label_folds)?);
        let up = self
            .nats_connected
            .load(std::sync::atomic::Ordering::Relaxed);
        set.nats_up.set(if up { 1.0 } else { 0.0 });
        let entry = SetEntry {
            set: set.clone(),
            owners: BTreeSet::from([owner.to_path_buf()]),
        };
        sets.insert(cfg.prefix.clone(), entry);
        Ok(set)
    }

    /// Forgets `owner`; a family set nobody uses any more disappears from
    /// /metrics.
    pub fn release(&self, owner: &Path) {
        let mut sets = self.sets.lock().expect("metrics lock");
        sets.retain(|_, entry| {
            entry.owners.remove(owner);
            !entry.owners.is_empty()
        });
    }

    /// Every family of the engine and of the pipelines' family sets, for
    /// /metrics.
    pub fn gather(&self) -> Vec<MetricFamily> {
        let mut families = self.registry.gather();
        for set in self.sets() {
            families.extend(set.registry.gather());
        }
        families.sort_by(|a, b| a.name().cmp(b.name()));
        families
    }

    /// Every family set, for connection-status updates.
    pub fn sets(&self) -> Vec<Arc<FamilySet>> {
        self.sets
            .lock()
            .expect("metrics lock")
            .values()
            .map(|e| e.set.clone())
            .collect()
    }

    /// Sets the NATS connection gauge of every family set.
    pub fn set_nats_connected(&self, up: bool) {
        self.nats_connected
            .store(up, std::sync::atomic::Ordering::Relaxed);
        for set in self.sets() {
            set.nats_up.set(if up { 1.0 } else { 0.0 });
        }
    }
}

impl FamilySet {
    fn new(cfg: &MetricsConfig, key: String, folds: &IntCounterVec) -> anyhow::Result<Self> {
        let cap = cfg.max_label_sets;
        let p = &cfg.prefix;
        let opts = |name: &str, help: &str| {
            Opts::new(format!("{p}_{name}"), help)
                .const_labels(cfg.const_labels.clone().into_iter().collect())
        };
        let labels: Vec<&str> = cfg.labels.keys().map(String::as_str).collect();
        let mut failed: Vec<&str> = cfg.failed_labels.keys().map(String::as_str).collect();
        failed.push("reason");
        let duration: Vec<&str> = cfg.duration_labels.iter().map(String::as_str).collect();
        let hist = HistogramOpts::from(opts(
            "event_processing_duration_seconds",
            "Time from receipt to acknowledgement of an event",
        ))
        .buckets(cfg.buckets.clone());
        let set = Self {
            key,
            registry: Registry::new(),
            received: Guarded::new(
                CounterVec::new(
                    opts(
                        "events_received_total",
                        "Deliveries received from NATS, redeliveries included",
                    ),
                    &["subject"],
                )?,
                cap,
                folds,
            ),
            processed: Guarded::new(
                CounterVec::new(
                    opts(
                        "events_processed_total",
                        "Events stored (or already stored) and acknowledged",
                    ),
                    &labels,
                )?,
                cap,
                folds,
            ),
            failed: Guarded::new(
                CounterVec::new(
                    opts("events_failed_total", "Events that failed, by reason"),
                    &failed,
                )?,
                cap,
                folds,
            ),
            duration: Guarded::new(HistogramVec::new(hist, &duration)?, cap, folds),
            nats_up: Gauge::with_opts(opts(
                "nats_connection_status",
                "1 when connected to NATS, 0 when not",
            ))?,
        };
        set.register(cfg)?;
        Ok(set)
    }

    fn register(&self, cfg: &MetricsConfig) -> prometheus::Result<()> {
        let r = &self.registry;
        r.register(Box::new(self.received.vec.clone()))?;
        r.register(Box::new(self.processed.vec.clone()))?;
        r.register(Box::new(self.failed.vec.clone()))?;
        r.register(Box::new(self.duration.vec.clone()))?;
        r.register(Box::new(self.nats_up.clone()))?;
        if cfg.process_metrics {
            r.register(Box::new(Labelled::process(cfg)))?;
        }
        Ok(())
    }
}

/// Label value of every label of the observations a full family folds.
const OTHER: &str = "other";

/// A metric family that holds at most `cap` label sets: labels taken from
/// events (subjects, fields) are chosen by whoever publishes, and each new
/// set costs memory forever. Observations with a new set beyond the cap are
/// recorded under `other` for every label, counted, and warned about once.
///
/// Each admitted set's series is kept here, found by a fast hash of the
/// values: every event observes several families, and the prometheus
/// crate's own lookup hashes, locks and compares the labels again.
pub struct Guarded<V, M> {
    vec: V,
    cap: usize,
    series: Mutex<Series<M>>,
    /// The engine's fold counter; its series for this family appears with
    /// the first fold (an idle family leaves no trace once removed).
    folds: IntCounterVec,
    family: String,
    warned: std::sync::atomic::AtomicBool,
}

/// The admitted label sets' series, by the hash of their values (sets
/// whose hashes collide share a bucket, told apart by their values).
struct Series<M> {
    by_hash: HashMap<u64, Vec<LabelledSeries<M>>, foldhash::fast::FixedState>,
    sets: usize,
}

/// A label set's values and its series.
type LabelledSeries<M> = (Box<[String]>, M);

impl<M: Clone> Series<M> {
    fn find<V: AsRef<str>>(&self, hash: u64, values: &[V]) -> Option<M> {
        let bucket = self.by_hash.get(&hash)?;
        let same = |k: &[String]| {
            k.iter()
                .map(String::as_str)
                .eq(values.iter().map(AsRef::as_ref))
        };
        bucket.iter().find(|(k, _)| same(k)).map(|(_, m)| m.clone())
    }

    fn add<V: AsRef<str>>(&mut self, hash: u64, values: &[V], m: M) {
        let key = values.iter().map(|v| v.as_ref().to_string()).collect();
        self.by_hash.entry(hash).or_default().push((key, m));
        self.sets += 1;
    }
}

fn label_hash<V: AsRef<str>>(values: &[V]) -> u64 {
    use std::hash::{BuildHasher, Hash, Hasher};
    let mut h = foldhash::fast::FixedState::default().build_hasher();
    values.iter().for_each(|v| v.as_ref().hash(&mut h));
    h.finish()
}

impl<T: MetricVecBuilder> Guarded<MetricVec<T>, T::M> {
    fn new(vec: MetricVec<T>, cap: usize, folds: &IntCounterVec) -> Self {
        let family = vec
            .desc()
            .first()
            .map(|d| d.fq_name.clone())
            .unwrap_or_default();
        Self {
            cap,
            series: Mutex::new(Series {
                by_hash: HashMap::default(),
                sets: 0,
            }),
            folds: folds.clone(),
            family,
            warned: std::sync::atomic::AtomicBool::new(false),
            vec,
        }
    }

    /// The series of `values`, or the `other` series when the family is
    /// full and `values` is a new set.
    pub fn with_label_values<V: AsRef<str> + std::fmt::Debug>(&self, values: &[V]) -> T::M {
        let hash = label_hash(values);
        let mut series = self.series.lock().expect("label set lock");
        if let Some(m) = series.find(hash, values) {
            return m;
        }
        if series.sets < self.cap {
            let m = self.vec.with_label_values(values);
            series.add(hash, values, m.clone());
            return m;
        }
        drop(series);
        self.folds.with_label_values(&[&self.family]).inc();
        if !self.warned.swap(true, std::sync::atomic::Ordering::Relaxed) {
            tracing::warn!(
                family = %self.family,
                cap = self.cap,
                "metric family reached max_label_sets: new label sets are recorded as `other`"
            );
        }
        self.vec.with_label_values(&vec![OTHER; values.len()])
    }
}

/// A collector whose series all get extra constant labels: the process
/// collector has no const-label option, and the collector's default labels
/// apply to process metrics too.
struct Labelled {
    inner: Box<dyn Collector>,
    labels: Vec<LabelPair>,
}

impl Labelled {
    fn process(cfg: &MetricsConfig) -> Self {
        let inner = prometheus::process_collector::ProcessCollector::new(
            std::process::id() as i32,
            cfg.prefix.clone(),
        );
        Self {
            inner: Box::new(inner),
            labels: label_pairs(&cfg.const_labels),
        }
    }
}

fn label_pairs(labels: &BTreeMap<String, String>) -> Vec<LabelPair> {
    labels
        .iter()
        .map(|(k, v)| {
            let mut pair = LabelPair::default();
            pair.set_name(k.clone());
            pair.set_value(v.clone());
            pair
        })
        .collect()
}

impl Collector for Labelled {
    fn desc(&self) -> Vec<&Desc> {
        self.inner.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let mut families = self.inner.collect();
        for family in &mut families {
            for metric in family.mut_metric() {
                let mut labels = metric.take_label();
                labels.extend(self.labels.iter().cloned());
                labels.sort_by(|a, b| a.name().cmp(b.name()));
                metric.set_label(labels);
            }
        }
        families
    }
}

/// Label values of one pipeline's failed events, computed once.
pub struct FailureLabels {
    /// failed_labels values, in name order, before `reason`.
    pub failed: Vec<String>,
    /// duration_labels values for a failed event.
    pub duration: Vec<String>,
}

impl FailureLabels {
    pub fn new(cfg: &MetricsConfig) -> Self {
        Self {
            failed: cfg.failed_labels.values().cloned().collect(),
            duration: cfg
                .duration_labels
                .iter()
                .map(|l| {
                    cfg.failed_labels
                        .get(l)
                        .cloned()
                        .unwrap_or_else(|| UNKNOWN.to_string())
                })
                .collect(),
        }
    }

    /// failed_labels values followed by the reason.
    pub fn with_reason(&self, reason: Reason) -> Vec<&str> {
        let mut v: Vec<&str> = self.failed.iter().map(String::as_str).collect();
        v.push(reason.as_str());
        v
    }
}

/// Picks the duration label values out of a processed event's labels.
pub fn duration_values<'a>(cfg: &MetricsConfig, labels: &'a [String]) -> Vec<&'a str> {
    cfg.duration_labels
        .iter()
        .filter_map(|d| cfg.labels.keys().position(|k| k == d))
        .map(|i| labels[i].as_str())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Label sets up to the cap get series of their own, found again by
    /// their values; later new sets go to `other` and are counted.
    #[test]
    fn a_guarded_family_keeps_its_sets_and_folds_the_rest() {
        let vec = CounterVec::new(Opts::new("t_total", "t"), &["a", "b"]).expect("family");
        let folds = IntCounterVec::new(Opts::new("folds", "f"), &["family"]).expect("folds");
        let g = Guarded::new(vec.clone(), 2, &folds);
        for values in [["x", "1"], ["y", "2"], ["x", "1"], ["z", "3"], ["y", "2"]] {
            g.with_label_values(&values).inc();
        }
        let count = |values: [&str; 2]| vec.with_label_values(&values).get();
        assert_eq!(
            [
                count(["x", "1"]),
                count(["y", "2"]),
                count(["other", "other"])
            ],
            [2.0, 2.0, 1.0]
        );
        assert_eq!(folds.with_label_values(&["t_total"]).get(), 1);
    }
}
