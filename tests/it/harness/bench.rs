//! Harness additions for the benchmark (`benches/bench.rs`): how its
//! figures are computed and printed. Here rather than in the benchmark so
//! that their unit tests run with the integration tests: a benchmark built
//! without the test harness runs no `#[test]`.

/// Nearest-rank percentiles of latencies in milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct Percentiles {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    /// `None` for no values.
    pub fn of(mut values: Vec<f64>) -> Option<Self> {
        if values.is_empty() {
            return None;
        }
        values.sort_by(f64::total_cmp);
        let rank =
            |p: f64| values[((p * values.len() as f64).ceil() as usize).clamp(1, values.len()) - 1];
        Some(Self {
            p50: rank(0.50),
            p99: rank(0.99),
            max: values[values.len() - 1],
        })
    }
}

/// The stream sequence a JetStream ack subject of `stream`/`durable`
/// acknowledges. Handles both `$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>...`
/// and the newer form with domain and account hash before the stream.
pub fn acked_sequence(subject: &str, stream: &str, durable: &str) -> Option<u64> {
    let tokens: Vec<&str> = subject.split('.').collect();
    let at = tokens
        .windows(2)
        .position(|w| w[0] == stream && w[1] == durable)?;
    tokens.get(at + 3)?.parse().ok()
}

/// `1234567` as `1,234,567`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

// Paths, not `use super::*`: the benchmark is compiled with `cfg(test)` but
// without its `#[test]`s, which would leave the import unused.
#[cfg(test)]
mod tests {
    #[test]
    fn ack_subjects_of_both_formats() {
        assert_eq!(
            super::acked_sequence("$JS.ACK.S.d.1.42.40.1700000000.0", "S", "d"),
            Some(42)
        );
        assert_eq!(
            super::acked_sequence("$JS.ACK.dom.hash.S.d.2.7.5.1700000000.0.tok", "S", "d"),
            Some(7)
        );
        assert_eq!(
            super::acked_sequence("$JS.ACK.T.d.1.42.40.1.0", "S", "d"),
            None
        );
    }

    #[test]
    fn percentiles_use_nearest_rank() {
        let p = super::Percentiles::of((1..=100).map(f64::from).collect()).unwrap();
        assert_eq!((p.p50, p.p99, p.max), (50.0, 99.0, 100.0));
        assert!(super::Percentiles::of(Vec::new()).is_none());
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(super::thousands(1_234_567), "1,234,567");
        assert_eq!(super::thousands(999), "999");
        assert_eq!(super::thousands(0), "0");
    }
}
