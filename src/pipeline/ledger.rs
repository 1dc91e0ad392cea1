//! The pipeline's side of the exactly-once ledger (`sink.postgres.
//! exactly_once`, see `sink::postgres::ledger`): the sequences its rows
//! claim, what it records of events settled without a write, and the
//! pruning stage that keeps the ledger as long as the stream.

use super::*;
use crate::sink::postgres::{Entry, LedgerKey};

/// How often the ledger is pruned (first when a version starts).
const PRUNE_EVERY: Duration = Duration::from_secs(60);

impl Pipeline {
    /// The ledger key of a pipeline file with `exactly_once`: its stream
    /// and durable (or the durable it settles for, a backfill's).
    pub(super) fn ledger_key(cfg: &config::Pipeline) -> Option<LedgerKey> {
        let pg = &cfg.sink.postgres;
        let nats = &cfg.source.nats;
        pg.exactly_once.then(|| LedgerKey {
            stream: nats.stream.name.clone(),
            durable: pg
                .ledger_durable
                .clone()
                .unwrap_or_else(|| nats.consumer.durable.clone()),
        })
    }

    /// The sequence a row claims: only with a ledger (reading a message's
    /// metadata is not free).
    pub(super) fn ledger_seq(&self, msg: &Message) -> Option<u64> {
        self.sink.ledger()?;
        msg.info().ok().map(|i| i.stream_sequence)
    }

    /// Records an event settled without a write (before it is settled).
    /// A failure is logged, not held: the event then shows as missing in
    /// `ingestd audit`, whose repair settles it again.
    pub(super) async fn record(&self, msg: &Message, entry: Entry) {
        let Some(seq) = self.ledger_seq(msg) else {
            return;
        };
        if let Err(error) = self.sink.record(seq, entry).await {
            tracing::warn!(pipeline = %self.name, seq, entry = entry.as_str(), %error,
                "could not record the event in the exactly-once ledger; `ingestd audit` will report it missing");
        }
    }

    /// What the ledger records of an event the invalid policy settles:
    /// nothing when it is left for redelivery (`nak`).
    pub(super) fn invalid_entry(&self, kind: Reason) -> Option<Entry> {
        match (self.cfg.on_error.invalid.action, kind) {
            (InvalidAction::Nak, _) => None,
            (InvalidAction::DeadLetter, _) => Some(Entry::DeadLettered),
            (_, Reason::Unstorable) => Some(Entry::Rejected),
            _ => Some(Entry::Invalid),
        }
    }

    /// Counts the rows the ledger found written already.
    pub(super) fn count_duplicate(&self) {
        self.engine
            .engine
            .duplicates
            .with_label_values(&[&self.name])
            .inc();
    }
}

/// Removes the entries below the stream's first sequence, now and every
/// [`PRUNE_EVERY`], until `stop` (a stage of the run's crew: a pruning cut
/// short rolls its transaction back).
pub(super) async fn prune(pipeline: Arc<Pipeline>, stop: CancellationToken) {
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = prune_every(&pipeline) => {}
    }
}

async fn prune_every(pipeline: &Pipeline) {
    let mut tick = tokio::time::interval(PRUNE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stream = pipeline.stream.clone();
    loop {
        tick.tick().await;
        let first = match stream.info().await {
            Ok(info) => info.state.first_sequence,
            Err(error) => {
                tracing::debug!(pipeline = %pipeline.name, %error, "cannot read the stream's first sequence");
                continue;
            }
        };
        match pipeline.sink.prune_ledger(first).await {
            Ok(0) => {}
            Ok(removed) => {
                tracing::debug!(pipeline = %pipeline.name, removed, first, "ledger pruned")
            }
            Err(error) => {
                tracing::warn!(pipeline = %pipeline.name, %error, "could not prune the ledger")
            }
        }
    }
}
