//! [9] A hundred pipelines on one stream and one database: a backlog of
//! events for each, on a Postgres of the phase's own (`max_connections =
//! 100`, so the connections the engine holds are counted exactly).

use std::path::Path;
use std::time::{Duration, Instant};

use super::harness::scale::{states, ManyPipelines};
use super::harness::{wait_for_every, DEADLINE};
use super::{secs, thousands};

/// Pipelines of the phase.
pub const PIPELINES: usize = 100;

/// How often the phase samples connections, states and rows.
const POLL: Duration = Duration::from_millis(50);

pub struct ManyFigures {
    pub events: usize,
    pub all_running: Duration,
    pub all_stored: Duration,
    pub peak_connections: i64,
    pub peak_rss_kib: u64,
    /// The earliest and the latest moment a pipeline had stored its last
    /// event.
    pub finish_spread: (Duration, Duration),
}

impl ManyFigures {
    pub fn print(&self) {
        println!(
            "   {PIPELINES} pipelines × {} events: all running after {}, all stored after {}",
            thousands(self.events as u64),
            secs(self.all_running),
            secs(self.all_stored)
        );
        println!(
            "   peak connections held {}, peak RSS {:.1} MiB, pipelines finished between {} and {}",
            self.peak_connections,
            self.peak_rss_kib as f64 / 1024.0,
            secs(self.finish_spread.0),
            secs(self.finish_spread.1)
        );
    }
}

/// What the phase has seen so far.
#[derive(Default)]
struct Progress {
    peak: i64,
    all_running: Option<Duration>,
    finished: Vec<Duration>,
    done: std::collections::BTreeSet<String>,
}

/// Runs the phase with `events` per pipeline.
pub async fn many_pipelines(program: &Path, events: usize) -> ManyFigures {
    let ManyPipelines {
        env,
        server,
        admin,
        names,
    } = ManyPipelines::set_up(PIPELINES, events).await;
    let start = Instant::now();
    let engine = env.engine().program(program).spawn();
    let progress = std::cell::RefCell::new(Progress::default());
    wait_for_every("every event stored", DEADLINE * 6, POLL, || {
        let (server, admin, engine, names, progress) =
            (&server, &admin, &engine, &names, &progress);
        async move {
            let connections = server.engine_connections(admin).await.unwrap_or(0);
            let known = progress.borrow().all_running.is_some();
            let running = match known {
                true => None,
                // Not serving HTTP yet is not running yet; rows are counted
                // meanwhile.
                false => Some(states(engine).await.unwrap_or_default()),
            };
            let counts: Vec<(String, i64)> =
                sqlx::query_as("SELECT pipeline, count(*) FROM events GROUP BY pipeline")
                    .fetch_all(admin)
                    .await
                    .map_err(|e| e.to_string())?;
            let mut p = progress.borrow_mut();
            p.peak = p.peak.max(connections);
            let all = running.is_some_and(|states| {
                states.values().filter(|s| *s == "running").count() == names.len()
            });
            if all {
                p.all_running = Some(start.elapsed());
            }
            for (pipeline, count) in counts {
                if count as usize == events && p.done.insert(pipeline) {
                    p.finished.push(start.elapsed());
                }
            }
            match p.done.len() {
                n if n == names.len() && p.all_running.is_some() => Ok(()),
                n => Err(format!("{n} pipelines done")),
            }
        }
    })
    .await;
    let Progress {
        peak,
        all_running,
        finished,
        ..
    } = progress.into_inner();
    let all_stored = start.elapsed();
    let peak_rss_kib = engine.memory_kib("VmHWM").unwrap_or(0);
    drop(engine);
    ManyFigures {
        events,
        all_running: all_running.expect("all running"),
        all_stored,
        peak_connections: peak,
        peak_rss_kib,
        finish_spread: (
            finished.iter().min().copied().unwrap_or_default(),
            finished.iter().max().copied().unwrap_or_default(),
        ),
    }
}
