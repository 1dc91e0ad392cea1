//! Connection pools: one per database, shared by every pipeline that writes
//! there, so an engine holds `DATABASE_POOL_SIZE` connections (plus one
//! probe) per database however many pipelines it runs.
//!
//! A pool is keyed by what makes its connections interchangeable (the URL
//! without Prisma's `schema=`: server, database, user, password, TLS and
//! the other options). A pipeline's session settings are not part of the
//! key: its transactions set them for themselves ([`Session`]).
//!
//! Connections are taken in turns, first come first served (a fair
//! semaphore with as many permits as the pool has connections): a batch
//! waiting for its turn is backpressure, not an error, and a busy pipeline
//! queues behind the others instead of starving them. Only holders of a
//! turn ask the pool for a connection, so that request never waits for
//! another pipeline and is bounded by the pipeline's `connect_timeout`.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Weak;

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{IntGaugeVec, Opts};
use tokio::sync::{Semaphore, SemaphorePermit};

use super::*;

/// The engine's default number of connections per database: a 2-core host
/// keeps that many busy, and a default Postgres (100 connections) serves
/// several engines and its other clients beside it.
pub const DEFAULT_POOL_SIZE: u32 = 8;

/// The longest sqlx itself waits for a connection: the sink bounds each
/// request by the pipeline's `connect_timeout` once it has its turn, so
/// this only has to outlast that.
const POOL_ACQUIRE_LIMIT: Duration = Duration::from_secs(600);

/// How long a probe's answer stands: probes at any rate cost the database
/// at most one query per database per this period.
const PROBE_FRESH: Duration = Duration::from_millis(500);

/// Where a sink's connections go, and the `search_path` its sessions use
/// (Prisma's `schema=`).
pub(super) struct Target {
    /// The URL without `schema=`, its parameters in order: the pool's key.
    key: String,
    options: PgConnectOptions,
    pub(super) search_path: Option<String>,
}

impl Target {
    pub(super) fn parse(url: &str) -> anyhow::Result<Self> {
        let invalid = |e: &dyn std::fmt::Display| {
            anyhow::anyhow!("invalid database URL {}: {e}", redact_url(url))
        };
        let mut parsed = url::Url::parse(url).map_err(|e| invalid(&e))?;
        let search_path = parsed
            .query_pairs()
            .find(|(k, _)| k == "schema")
            .map(|(_, v)| v.into_owned());
        let mut rest: Vec<(String, String)> = parsed
            .query_pairs()
            .filter(|(k, _)| k != "schema")
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        rest.sort();
        parsed.set_query(None);
        if !rest.is_empty() {
            parsed.query_pairs_mut().extend_pairs(rest);
        }
        let options = PgConnectOptions::from_str(parsed.as_str()).map_err(|e| invalid(&e))?;
        Ok(Self {
            key: parsed.to_string(),
            options: options.application_name("ingestd"),
            search_path,
        })
    }

    /// The connection options with the session settings applied to the
    /// connection itself, for a pool of one sink's own (a dry run).
    pub(super) fn session_options(&self, statement: Option<Duration>) -> PgConnectOptions {
        let mut options = self.options.clone();
        if let Some(path) = &self.search_path {
            options = options.options([("search_path", path.as_str())]);
        }
        if let Some(limit) = statement {
            options = options.options([("statement_timeout", limit.as_millis().to_string())]);
        }
        options
    }

    fn name(&self) -> String {
        redact_url(&self.key)
    }
}

/// Which pool a sink uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolChoice {
    /// The engine's pool for the database.
    Shared,
    /// A pool of the pipeline's own, of this many connections.
    Own(u32),
}

/// Connections to one database.
pub struct Pool {
    /// The redacted URL, for metrics.
    name: String,
    pg: PgPool,
    turns: Semaphore,
    size: u32,
    waiting: AtomicUsize,
    pub(super) probe: Arc<Probe>,
}

/// A turn at one of the pool's connections.
pub(super) struct Turn<'a> {
    pool: &'a Pool,
    permit: SemaphorePermit<'a>,
}

/// A connection, held for the length of a turn.
pub(super) struct Conn<'a> {
    // Declared first: dropped (returned to the pool) before the turn ends.
    conn: PoolConnection<Postgres>,
    _permit: SemaphorePermit<'a>,
}

impl std::ops::Deref for Conn<'_> {
    type Target = PgConnection;
    fn deref(&self) -> &PgConnection {
        &self.conn
    }
}

impl std::ops::DerefMut for Conn<'_> {
    fn deref_mut(&mut self) -> &mut PgConnection {
        &mut self.conn
    }
}

impl Conn<'_> {
    /// Closes the connection instead of returning it (it carries session
    /// settings another sink must not inherit).
    pub(super) async fn close(self) {
        let _ = self.conn.close().await;
    }
}

/// Counts a waiter for as long as it waits (also when its wait is
/// abandoned).
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Pool {
    pub(super) fn new(
        name: String,
        options: PgConnectOptions,
        size: u32,
        probe: Arc<Probe>,
    ) -> Self {
        let size = size.max(1);
        let options = super::session::options(options);
        let pg = super::session::restoring(PgPoolOptions::new(), &options)
            .max_connections(size)
            .acquire_timeout(POOL_ACQUIRE_LIMIT)
            .connect_lazy_with(options);
        Self {
            name,
            pg,
            turns: Semaphore::new(size as usize),
            size,
            waiting: AtomicUsize::new(0),
            probe,
        }
    }

    /// Waits for a turn, in arrival order.
    pub(super) async fn turn(&self) -> Turn<'_> {
        self.waiting.fetch_add(1, Ordering::Relaxed);
        let _waiting = Waiting(&self.waiting);
        let permit = self
            .turns
            .acquire()
            .await
            .expect("the turns are never closed");
        Turn { pool: self, permit }
    }

    /// A turn and its connection.
    pub(super) async fn acquire(&self, connect: Duration) -> Result<Conn<'_>, sqlx::Error> {
        self.turn().await.connect(connect).await
    }

    pub(super) async fn close(&self) {
        self.pg.close().await;
    }
}

impl<'a> Turn<'a> {
    /// The turn's connection: an idle one, or a new one opened within
    /// `connect`.
    pub(super) async fn connect(self, connect: Duration) -> Result<Conn<'a>, sqlx::Error> {
        match tokio::time::timeout(connect, self.pool.pg.acquire()).await {
            Ok(conn) => Ok(Conn {
                conn: conn?,
                _permit: self.permit,
            }),
            Err(_) => Err(sqlx::Error::PoolTimedOut),
        }
    }
}

/// The health probe of one database: a connection of its own, shared by
/// every pipeline that writes there.
pub(super) struct Probe {
    options: PgConnectOptions,
    state: tokio::sync::Mutex<ProbeState>,
    up: AtomicBool,
}

#[derive(Default)]
struct ProbeState {
    conn: Option<PgConnection>,
    checked: Option<std::time::Instant>,
}

impl Probe {
    pub(super) fn new(options: PgConnectOptions) -> Self {
        Self {
            options,
            state: tokio::sync::Mutex::new(ProbeState::default()),
            up: AtomicBool::new(true),
        }
    }

    /// True when the database answers a trivial query within two seconds,
    /// on the probe's own connection: probes never take a connection from
    /// the write pool. Checked at most once per [`PROBE_FRESH`]; probes
    /// arriving meanwhile (or while a check runs) get the last answer.
    pub(super) async fn ping(&self) -> bool {
        let Ok(mut state) = self.state.try_lock() else {
            return self.up.load(Ordering::Relaxed);
        };
        if state.checked.is_some_and(|t| t.elapsed() < PROBE_FRESH) {
            return self.up.load(Ordering::Relaxed);
        }
        let up = tokio::time::timeout(Duration::from_secs(2), state.check(&self.options))
            .await
            .unwrap_or(false);
        if !up {
            state.conn = None;
        }
        state.checked = Some(std::time::Instant::now());
        self.up.store(up, Ordering::Relaxed);
        up
    }
}

impl ProbeState {
    async fn check(&mut self, options: &PgConnectOptions) -> bool {
        use sqlx::Connection as _;
        if self.conn.is_none() {
            self.conn = PgConnection::connect_with(options).await.ok();
        }
        match &mut self.conn {
            Some(conn) => conn.execute("SELECT 1").await.is_ok(),
            None => false,
        }
    }
}

/// The engine's pools and probes, one of each per database (plus the pools
/// pipelines asked to have of their own). Each lives as long as a sink
/// uses it.
pub struct Pools {
    size: u32,
    shared: Mutex<HashMap<String, Weak<Pool>>>,
    own: Mutex<Vec<Weak<Pool>>>,
    probes: Mutex<HashMap<String, Weak<Probe>>>,
    gauges: PoolGauges,
}

impl Pools {
    /// Pools of `size` connections (see [`DEFAULT_POOL_SIZE`]).
    pub fn new(size: u32) -> prometheus::Result<Arc<Self>> {
        Ok(Arc::new(Self {
            size: size.max(1),
            shared: Mutex::new(HashMap::new()),
            own: Mutex::new(Vec::new()),
            probes: Mutex::new(HashMap::new()),
            gauges: PoolGauges::new()?,
        }))
    }

    /// The pool `choice` names for `target`.
    pub(super) fn pool(&self, target: &Target, choice: PoolChoice) -> Arc<Pool> {
        let probe = self.probe(target);
        match choice {
            PoolChoice::Own(size) => {
                let pool = Arc::new(Pool::new(
                    format!("{} (own)", target.name()),
                    target.options.clone(),
                    size,
                    probe,
                ));
                let mut own = self.own.lock().expect("pools lock");
                own.retain(|p| p.strong_count() > 0);
                own.push(Arc::downgrade(&pool));
                pool
            }
            PoolChoice::Shared => {
                let mut shared = self.shared.lock().expect("pools lock");
                shared.retain(|_, p| p.strong_count() > 0);
                if let Some(pool) = shared.get(&target.key).and_then(Weak::upgrade) {
                    return pool;
                }
                let pool = Arc::new(Pool::new(
                    target.name(),
                    target.options.clone(),
                    self.size,
                    probe,
                ));
                shared.insert(target.key.clone(), Arc::downgrade(&pool));
                pool
            }
        }
    }

    fn probe(&self, target: &Target) -> Arc<Probe> {
        let mut probes = self.probes.lock().expect("pools lock");
        probes.retain(|_, p| p.strong_count() > 0);
        if let Some(probe) = probes.get(&target.key).and_then(Weak::upgrade) {
            return probe;
        }
        let probe = Arc::new(Probe::new(target.options.clone()));
        probes.insert(target.key.clone(), Arc::downgrade(&probe));
        probe
    }

    /// Every pool some sink still uses.
    fn live(&self) -> Vec<Arc<Pool>> {
        let shared = self.shared.lock().expect("pools lock");
        let own = self.own.lock().expect("pools lock");
        shared
            .values()
            .chain(own.iter())
            .filter_map(Weak::upgrade)
            .collect()
    }

    /// The pools' gauges, for the engine's metrics registry.
    pub fn collector(self: &Arc<Self>) -> Box<dyn Collector> {
        Box::new(PoolsCollector(self.clone()))
    }
}

/// `ingestd_db_pool_*`, read from the pools when scraped.
struct PoolGauges {
    size: IntGaugeVec,
    open: IntGaugeVec,
    in_use: IntGaugeVec,
    waiting: IntGaugeVec,
}

impl PoolGauges {
    fn new() -> prometheus::Result<Self> {
        let gauge = |name: &str, help: &str| IntGaugeVec::new(Opts::new(name, help), &["pool"]);
        Ok(Self {
            size: gauge(
                "ingestd_db_pool_size",
                "Connections a database pool may open",
            )?,
            open: gauge(
                "ingestd_db_pool_open",
                "Connections a database pool holds open",
            )?,
            in_use: gauge(
                "ingestd_db_pool_in_use",
                "Connections of a database pool taken by a batch, plan or migration",
            )?,
            waiting: gauge(
                "ingestd_db_pool_waiting",
                "Batches, plans and migrations waiting for their turn at a database pool",
            )?,
        })
    }

    fn all(&self) -> [&IntGaugeVec; 4] {
        [&self.size, &self.open, &self.in_use, &self.waiting]
    }
}

struct PoolsCollector(Arc<Pools>);

impl Collector for PoolsCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.0.gauges.all().iter().flat_map(|g| g.desc()).collect()
    }

    /// Pools of one name (pipelines' own pools for one database, or a
    /// version being replaced) are summed.
    fn collect(&self) -> Vec<MetricFamily> {
        let mut sums: BTreeMap<String, [i64; 4]> = BTreeMap::new();
        for pool in self.0.live() {
            let sum = sums.entry(pool.name.clone()).or_default();
            let in_use = pool.size as usize - pool.turns.available_permits();
            let values = [
                pool.size as usize,
                pool.pg.size() as usize,
                in_use,
                pool.waiting.load(Ordering::Relaxed),
            ];
            for (s, v) in sum.iter_mut().zip(values) {
                *s += i64::try_from(v).unwrap_or(i64::MAX);
            }
        }
        let gauges = self.0.gauges.all();
        for g in gauges {
            g.reset();
        }
        for (name, values) in &sums {
            for (g, v) in gauges.iter().zip(values) {
                g.with_label_values(&[name.as_str()]).set(*v);
            }
        }
        gauges.iter().flat_map(|g| g.collect()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Connections are interchangeable when everything but `schema=` is the
    /// same (in any order of parameters); anything else is another pool.
    #[test]
    fn pools_are_keyed_by_the_url_without_its_schema() {
        let key = |url: &str| Target::parse(url).unwrap().key;
        let base = "postgresql://u:pw@h:5432/db?sslmode=disable&connect_timeout=3";
        assert_eq!(
            key(&format!("{base}&schema=a")),
            key("postgresql://u:pw@h:5432/db?schema=b&connect_timeout=3&sslmode=disable")
        );
        for other in [
            "postgresql://u:other@h:5432/db?sslmode=disable&connect_timeout=3",
            "postgresql://v:pw@h:5432/db?sslmode=disable&connect_timeout=3",
            "postgresql://u:pw@h:5433/db?sslmode=disable&connect_timeout=3",
            "postgresql://u:pw@h:5432/other?sslmode=disable&connect_timeout=3",
            "postgresql://u:pw@h:5432/db?sslmode=require&connect_timeout=3",
        ] {
            assert_ne!(key(base), key(other), "{other}");
        }
        let t = Target::parse(&format!("{base}&schema=ingest")).unwrap();
        assert_eq!(t.search_path.as_deref(), Some("ingest"));
        assert!(!t.name().contains("pw"));
    }
}
