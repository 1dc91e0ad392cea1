//! Phase [2c]: what `sink.postgres.exactly_once` costs. The backlog is
//! drained with the shipped tiktok.yaml and then with `exactly_once: true`
//! (the ledger dropped first: the engine creates it), in turns within each round so that both
//! share the machine's speed; the figure is the median of the rounds'
//! ratios of the two rates.

use super::{drain, median, redeliver_backlog, thousands, Bench};

/// The drain with `exactly_once` as a share of the drain without it.
pub const TARGET_SHARE: f64 = 0.75;

/// The rates of each round, without and with `exactly_once`.
pub struct Cost {
    rounds: Vec<(f64, f64)>,
}

/// Drains the backlog `rounds` times without and with `exactly_once`.
pub async fn cost(b: &Bench, n: u64, rounds: usize) -> Cost {
    let original = b.env.tiktok_pipeline();
    let with = original.replacen("  postgres:\n", "  postgres:\n    exactly_once: true\n", 1);
    assert_ne!(with, original, "tiktok.yaml: no sink.postgres to extend");
    let mut figures = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        redeliver_backlog(b).await;
        let without = drain(b, n).await.rate();
        b.env.write_pipeline("tiktok.yaml", &with);
        redeliver_backlog(b).await;
        b.env.exec("DROP TABLE IF EXISTS ingestd_ledger").await;
        let exactly_once = drain(b, n).await.rate();
        b.env.write_pipeline("tiktok.yaml", &original);
        figures.push((without, exactly_once));
    }
    b.env.exec("DROP TABLE IF EXISTS ingestd_ledger").await;
    Cost { rounds: figures }
}

impl Cost {
    fn share(&self) -> f64 {
        median(self.rounds.iter().map(|(w, e)| e / w).collect())
    }

    pub fn print(&self) {
        for (without, with) in &self.rounds {
            println!(
                "   without: {} rows/s, with exactly_once: {} rows/s ({:.2} ×)",
                thousands(*without as u64),
                thousands(*with as u64),
                with / without
            );
        }
    }

    pub fn print_summary(&self) {
        let share = self.share();
        println!(
            "   [2c] exactly_once drain {share:.2} × the drain without it (target ≥ {TARGET_SHARE}): {}",
            if share >= TARGET_SHARE { "met" } else { "NOT met" }
        );
    }
}
