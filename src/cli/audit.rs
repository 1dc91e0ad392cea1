//! `ingestd audit`: compares a stream with a pipeline's exactly-once ledger.
//!
//! Every message the pipeline's filter selects, from a sequence or a time
//! up to the durable's ack floor (what the server counts as acknowledged),
//! must have a ledger entry: stored, rejected, dead-lettered or invalid.
//! One without is missing: acknowledged but never settled by the engine
//! (an ack floor that jumped, a write lost with the server that held it).
//! The stream is read by an ordered consumer of the audit's own, headers
//! only, so the pipeline's durable is never touched; `--repair` runs
//! `backfill` over the missing ranges, which the ledger makes safe to
//! repeat. Exit status 1 when something is (still) missing.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use time::OffsetDateTime;

use crate::cli::backfill;
use crate::config::{self, PipelineFile};
use crate::sink::postgres::{Entry, LedgerKey, Limits, PgSink};
use crate::source::nats::{self, NatsOptions};
use crate::telemetry::metrics::Metrics;

/// Missing sequences closer than this are repaired by one backfill: the
/// ones between are skipped as duplicates, cheaper than another consumer.
const REPAIR_GAP: u64 = 1000;

/// How long the audit's consumer may stay silent before the stream is
/// taken as read (it says how many messages are left with each one).
const SILENCE: Duration = Duration::from_secs(10);

#[derive(clap::Args)]
pub struct Args {
    /// The pipeline file (with `sink.postgres.exactly_once: true`).
    pub file: PathBuf,
    /// First stream sequence to audit (default: the stream's first).
    #[arg(long, conflicts_with = "since")]
    pub from_seq: Option<u64>,
    /// Last stream sequence to audit (default: the durable's ack floor).
    #[arg(long, conflicts_with = "until")]
    pub to_seq: Option<u64>,
    /// Audit messages published at or after this time (RFC 3339).
    #[arg(long, value_parser = config::parse_time)]
    pub since: Option<OffsetDateTime>,
    /// Audit messages published before this time (RFC 3339).
    #[arg(long, value_parser = config::parse_time)]
    pub until: Option<OffsetDateTime>,
    /// Feed the missing messages through the pipeline (as `backfill`).
    #[arg(long)]
    pub repair: bool,
    /// Write the result in the Prometheus text format to this file (for
    /// node_exporter's textfile collector); replaced atomically.
    #[arg(long)]
    pub metrics_file: Option<PathBuf>,
    #[arg(long, env = "DATABASE_URL", default_value = crate::cli::compat::DATABASE_URL, hide_env_values = true)]
    pub database_url: String,
    #[command(flatten)]
    pub nats: NatsOptions,
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("{0}: the pipeline keeps no ledger to audit (set sink.postgres.exactly_once: true)")]
    NoLedger(String),
    #[error("{0:#}")]
    Setup(anyhow::Error),
    #[error("NATS: {0}")]
    Nats(String),
    #[error("the ledger: {0}")]
    Ledger(String),
    #[error("repair: {0}")]
    Repair(#[from] backfill::BackfillError),
    #[error("the metrics file: {0}")]
    MetricsFile(std::io::Error),
}

fn nats_error(e: impl std::fmt::Display) -> AuditError {
    AuditError::Nats(e.to_string())
}

/// What an audit found.
#[derive(Debug, Default)]
pub struct Report {
    pub from: u64,
    pub to: u64,
    /// Messages of the range with each entry.
    pub settled: BTreeMap<Entry, u64>,
    /// Messages of the range without an entry.
    pub missing: Vec<u64>,
    /// Missing messages a repair found settled afterwards.
    pub repaired: u64,
}

pub fn main(args: Args) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let metrics_file = args.metrics_file.clone();
    let (name, report) = rt.block_on(run(args))?;
    print!("{}", report.text());
    if let Some(path) = metrics_file {
        write_metrics(&path, &name, &report).map_err(AuditError::MetricsFile)?;
    }
    let still_missing = report.missing.len() as u64 > report.repaired;
    Ok(match still_missing {
        true => ExitCode::FAILURE,
        false => ExitCode::SUCCESS,
    })
}

/// Audits the range the arguments name, and repairs it when asked.
/// Returns the pipeline's name and the report.
pub async fn run(args: Args) -> Result<(String, Report), AuditError> {
    let file = PipelineFile::load(&args.file)?;
    let pipeline = &file.pipeline;
    let pg = &pipeline.sink.postgres;
    if !pg.exactly_once {
        return Err(AuditError::NoLedger(args.file.display().to_string()));
    }
    let nats_cfg = &pipeline.source.nats;
    let metrics = Arc::new(Metrics::new().map_err(AuditError::Setup)?);
    let client = nats::connect(
        &args.nats,
        &format!("ingestd-audit-{}", pipeline.name),
        metrics,
    )
    .await
    .map_err(AuditError::Setup)?;
    let js = jetstream::new(client);
    let stream = js
        .get_stream(&nats_cfg.stream.name)
        .await
        .map_err(nats_error)?;
    let floor = stream
        .consumer_info(&nats_cfg.consumer.durable)
        .await
        .map_err(nats_error)?
        .ack_floor
        .stream_sequence;
    let range = Range {
        from: args.from_seq,
        to: args.to_seq.unwrap_or(u64::MAX).min(floor),
        since: args.since,
        until: args.until,
    };
    let seqs = read_stream(&stream, &nats_cfg.consumer.filter_subject, &range).await?;
    let url = pg.url.clone().unwrap_or_else(|| args.database_url.clone());
    let mut sink = PgSink::private(&url, Limits::of(pg))
        .await
        .map_err(AuditError::Setup)?;
    sink.keep_ledger(LedgerKey {
        stream: nats_cfg.stream.name.clone(),
        durable: nats_cfg.consumer.durable.clone(),
    });
    let mut report = compare(&sink, &seqs).await?;
    if args.repair && !report.missing.is_empty() {
        repair(&args, &report.missing).await?;
        let again = compare(&sink, &report.missing).await?;
        report.repaired = (report.missing.len() - again.missing.len()) as u64;
    }
    Ok((pipeline.name.clone(), report))
}

/// The part of the stream an audit reads: sequences or times, never past
/// `to` (the durable's ack floor, or less).
struct Range {
    from: Option<u64>,
    to: u64,
    since: Option<OffsetDateTime>,
    until: Option<OffsetDateTime>,
}

/// The sequences of the messages `filter` selects in `range`, read with an
/// ordered consumer of the audit's own (headers only).
async fn read_stream(
    stream: &jetstream::stream::Stream,
    filter: &str,
    range: &Range,
) -> Result<Vec<u64>, AuditError> {
    let deliver_policy = match (range.from, range.since) {
        (Some(start_sequence), _) => consumer::DeliverPolicy::ByStartSequence { start_sequence },
        (None, Some(start_time)) => consumer::DeliverPolicy::ByStartTime { start_time },
        (None, None) => consumer::DeliverPolicy::All,
    };
    let mut reader = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: filter.to_string(),
            deliver_policy,
            headers_only: true,
            ..Default::default()
        })
        .await
        .map_err(nats_error)?;
    let mut seqs = Vec::new();
    let pending = reader.info().await.map_err(nats_error)?.num_pending;
    if pending == 0 || range.to == 0 {
        return Ok(seqs);
    }
    let mut messages = reader.messages().await.map_err(nats_error)?;
    loop {
        let next = tokio::time::timeout(SILENCE, messages.next()).await;
        let Ok(Some(message)) = next else {
            return Ok(seqs);
        };
        let message = message.map_err(nats_error)?;
        let info = message.info().map_err(nats_error)?;
        let past_time = range.until.is_some_and(|until| info.published >= until);
        if info.stream_sequence > range.to || past_time {
            return Ok(seqs);
        }
        seqs.push(info.stream_sequence);
        if info.pending == 0 {
            return Ok(seqs);
        }
    }
}

/// Each sequence's ledger entry, counted; the ones without are missing.
async fn compare(sink: &PgSink, seqs: &[u64]) -> Result<Report, AuditError> {
    let (Some(&from), Some(&to)) = (seqs.first(), seqs.last()) else {
        return Ok(Report::default());
    };
    let entries = sink
        .ledger_entries(from, to)
        .await
        .map_err(|e| AuditError::Ledger(e.to_string()))?;
    let mut report = Report {
        from,
        to,
        ..Report::default()
    };
    for seq in seqs {
        match entries.get(seq) {
            Some(entry) => *report.settled.entry(*entry).or_default() += 1,
            None => report.missing.push(*seq),
        }
    }
    Ok(report)
}

/// Backfills each run of missing sequences (runs closer than
/// [`REPAIR_GAP`] as one).
async fn repair(args: &Args, missing: &[u64]) -> Result<(), AuditError> {
    for (from, to) in runs(missing, REPAIR_GAP) {
        let summary = backfill::run(backfill::Args {
            file: args.file.clone(),
            from_sequence: Some(from),
            from_time: None,
            to_sequence: Some(to),
            database_url: args.database_url.clone(),
            nats: args.nats.clone(),
        })
        .await?;
        tracing::info!(from, to, stored = summary.stored, "repaired");
    }
    Ok(())
}

/// The sorted sequences as inclusive ranges, joining ranges less than
/// `gap` apart.
fn runs(seqs: &[u64], gap: u64) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for &seq in seqs {
        match runs.last_mut() {
            Some((_, to)) if seq - *to <= gap => *to = seq,
            _ => runs.push((seq, seq)),
        }
    }
    runs
}

impl Report {
    /// The report as printed: counts, then the missing sequences as ranges.
    pub fn text(&self) -> String {
        let mut out = format!("sequences {}-{}\n", self.from, self.to);
        for entry in Entry::ALL {
            let n = self.settled.get(&entry).copied().unwrap_or(0);
            out.push_str(&format!("{}: {n}\n", entry.as_str()));
        }
        out.push_str(&format!("missing: {}\n", self.missing.len()));
        if !self.missing.is_empty() {
            let ranges: Vec<String> = runs(&self.missing, 1)
                .into_iter()
                .map(|(a, b)| match a == b {
                    true => a.to_string(),
                    false => format!("{a}-{b}"),
                })
                .collect();
            out.push_str(&format!("missing sequences: {}\n", ranges.join(",")));
        }
        if self.repaired > 0 || !self.missing.is_empty() {
            out.push_str(&format!("repaired: {}\n", self.repaired));
        }
        out
    }

    /// The report in the Prometheus text format.
    fn metrics(&self, pipeline: &str, now: f64) -> String {
        let label = pipeline.replace('\\', "\\\\").replace('"', "\\\"");
        let mut out = String::new();
        let mut gauge = |name: &str, help: &str, value: f64| {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{{pipeline=\"{label}\"}} {value}\n"
            ));
        };
        gauge(
            "ingestd_audit_missing",
            "Messages the last audit found acknowledged but not settled in the ledger",
            self.missing.len() as f64,
        );
        gauge(
            "ingestd_audit_unrepaired",
            "Missing messages the last audit left missing (no repair, or a repair that failed)",
            (self.missing.len() as u64 - self.repaired) as f64,
        );
        gauge(
            "ingestd_audit_last_run_timestamp_seconds",
            "When the last audit ended",
            now,
        );
        out
    }
}

/// Writes the report's metrics to `path`, through a temporary file renamed
/// over it, so a collector never reads half a file.
fn write_metrics(path: &std::path::Path, pipeline: &str, report: &Report) -> std::io::Result<()> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default();
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, report.metrics(pipeline, now))?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_sequences_become_ranges() {
        assert_eq!(runs(&[3, 4, 5, 9, 11, 12], 1), [(3, 5), (9, 9), (11, 12)]);
        assert_eq!(runs(&[3, 9, 2000], 1000), [(3, 9), (2000, 2000)]);
    }

    #[test]
    fn the_report_names_each_missing_range() {
        let report = Report {
            from: 1,
            to: 20,
            settled: BTreeMap::from([(Entry::Stored, 15)]),
            missing: vec![4, 5, 6, 10, 17],
            repaired: 0,
        };
        let text = report.text();
        assert!(text.contains("stored: 15\n"), "{text}");
        assert!(text.contains("missing: 5\n"), "{text}");
        assert!(text.contains("missing sequences: 4-6,10,17\n"), "{text}");
    }
}
