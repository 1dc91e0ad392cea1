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

/// A stretch of events, in publish order, that each took longer than a
/// threshold, with no event published more than a gap apart: where a tail
/// percentile comes from, a slow moment of one process or a steady cost.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SlowMoment {
    /// Publish time of its first event, in ms after the first event of all.
    pub at_ms: f64,
    pub events: usize,
    pub worst_ms: f64,
}

/// The slow moments among `(publish time in µs, latency in ms)` samples,
/// worst first: events over `over_ms`, grouped while each is published
/// within `gap_us` of the previous one over it.
pub fn slow_moments(samples: &[(i64, f64)], over_ms: f64, gap_us: i64) -> Vec<SlowMoment> {
    let Some(first) = samples.iter().map(|&(t, _)| t).min() else {
        return Vec::new();
    };
    let mut slow: Vec<(i64, f64)> = samples
        .iter()
        .copied()
        .filter(|&(_, l)| l > over_ms)
        .collect();
    slow.sort_by_key(|&(t, _)| t);
    let mut moments: Vec<SlowMoment> = Vec::new();
    let mut last = i64::MIN;
    for (t, latency) in slow {
        match moments.last_mut() {
            Some(m) if t - last <= gap_us => {
                m.events += 1;
                m.worst_ms = m.worst_ms.max(latency);
            }
            _ => moments.push(SlowMoment {
                at_ms: (t - first) as f64 / 1000.0,
                events: 1,
                worst_ms: latency,
            }),
        }
        last = t;
    }
    moments.sort_by(|a, b| b.worst_ms.total_cmp(&a.worst_ms));
    moments
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
    fn slow_moments_group_by_gap_and_sort_worst_first() {
        let ms = |t: i64| t * 1000;
        let samples = [
            (ms(0), 1.0),
            (ms(100), 30.0),
            (ms(120), 12.0),
            (ms(150), 2.0), // fast: does not end the moment, the gap does
            (ms(190), 20.0),
            (ms(500), 50.0),
            (ms(900), 11.0),
        ];
        let moments = super::slow_moments(&samples, 10.0, ms(100));
        let m = |at_ms: f64, events: usize, worst_ms: f64| super::SlowMoment {
            at_ms,
            events,
            worst_ms,
        };
        assert_eq!(
            moments,
            vec![m(500.0, 1, 50.0), m(100.0, 3, 30.0), m(900.0, 1, 11.0)]
        );
        assert!(super::slow_moments(&samples, 60.0, ms(100)).is_empty());
        assert!(super::slow_moments(&[], 1.0, 1).is_empty());
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
