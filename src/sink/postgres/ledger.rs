//! The exactly-once ledger (`sink.postgres.exactly_once`): one row per
//! stream message a pipeline settled, keyed by (stream, durable, sequence),
//! in the pipeline's own database.
//!
//! A batch claims its sequences first, in its own transaction: a sequence
//! already claimed (committed by an earlier delivery, or by another process
//! on the same durable, whose transaction the claim waits for on the key's
//! row lock) is a duplicate, and its statement is not run. So the effect of
//! a statement in Postgres happens once per stream message, whatever the
//! redeliveries. Events settled without a write (invalid, rejected,
//! dead-lettered) are recorded after the fact, so that `ingestd audit` can
//! tell "settled" from "never seen".

use super::*;

/// The ledger's table, created where the pipeline's `search_path` puts
/// unqualified names (its first schema).
pub const TABLE: &str = "ingestd_ledger";

/// Entries removed per transaction when the ledger is pruned: small, so a
/// pruning never holds many row locks or a long transaction.
const PRUNE_CHUNK: i64 = 1000;

const CREATE: &str = "CREATE TABLE IF NOT EXISTS ingestd_ledger (\
    stream text NOT NULL, \
    durable text NOT NULL, \
    seq bigint NOT NULL, \
    outcome text NOT NULL, \
    settled_at timestamptz NOT NULL DEFAULT now(), \
    PRIMARY KEY (stream, durable, seq))";

const EXISTS: &str = "SELECT pg_catalog.to_regclass('ingestd_ledger') IS NOT NULL";

const CLAIM: &str = "INSERT INTO ingestd_ledger (stream, durable, seq, outcome) \
    SELECT $1, $2, s, 'stored' FROM pg_catalog.unnest($3::bigint[]) AS s \
    ON CONFLICT DO NOTHING RETURNING seq";

const UNCLAIM: &str =
    "DELETE FROM ingestd_ledger WHERE stream = $1 AND durable = $2 AND seq = ANY($3::bigint[])";

const RECORD: &str = "INSERT INTO ingestd_ledger (stream, durable, seq, outcome) \
    VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING";

const PRUNE: &str = "DELETE FROM ingestd_ledger WHERE ctid = ANY(ARRAY(\
    SELECT ctid FROM ingestd_ledger WHERE stream = $1 AND durable = $2 AND seq < $3 LIMIT $4))";

const ENTRIES: &str = "SELECT seq, outcome FROM ingestd_ledger \
    WHERE stream = $1 AND durable = $2 AND seq BETWEEN $3 AND $4";

/// Whose entries a sink claims: the stream and the durable whose
/// deliveries they settle (a backfill claims its live pipeline's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerKey {
    pub stream: String,
    pub durable: String,
}

/// How a message was settled, as the ledger records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Entry {
    /// Its statement committed.
    Stored,
    /// The database refused its row (the invalid policy applied).
    Rejected,
    /// It went to the dead-letter subject.
    DeadLettered,
    /// It failed decoding or the schema (the invalid policy applied).
    Invalid,
}

impl Entry {
    pub const ALL: [Entry; 4] = [
        Entry::Stored,
        Entry::Rejected,
        Entry::DeadLettered,
        Entry::Invalid,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Entry::Stored => "stored",
            Entry::Rejected => "rejected",
            Entry::DeadLettered => "dead_lettered",
            Entry::Invalid => "invalid",
        }
    }

    /// The entry a recorded text names; an unknown text (written by a
    /// newer version) reads as stored, the one outcome with an effect.
    fn parse(text: &str) -> Self {
        Self::ALL
            .into_iter()
            .find(|e| e.as_str() == text)
            .unwrap_or(Entry::Stored)
    }
}

/// Why the ledger could not be created or checked.
#[derive(Debug, thiserror::Error)]
#[error(
    "the exactly-once ledger ({TABLE}) cannot be used: {0} (the pipeline's role needs CREATE on \
     the first schema of its search_path once, then SELECT, INSERT and DELETE on {TABLE})"
)]
pub struct LedgerError(String, bool);

impl LedgerError {
    fn of(e: sqlx::Error) -> Self {
        let transient = sqlstate::fault(&e) == Fault::Transient;
        LedgerError(sqlstate::describe(&e), transient)
    }

    /// The database could not be reached: a later load may succeed.
    pub fn is_transient(&self) -> bool {
        self.1
    }
}

impl LedgerKey {
    /// The sequences of `seqs` the transaction could claim (the others are
    /// duplicates). Waits for a concurrent transaction holding one of them.
    pub(super) async fn claim(
        &self,
        conn: &mut PgConnection,
        seqs: &[i64],
    ) -> Result<Vec<i64>, sqlx::Error> {
        sqlx::query_scalar(CLAIM)
            .bind(&self.stream)
            .bind(&self.durable)
            .bind(seqs)
            .fetch_all(conn)
            .await
    }

    /// Gives up the claims of rows that were rejected in the transaction:
    /// they are recorded once their invalid policy is applied (which may
    /// hold them, or leave them for redelivery).
    pub(super) async fn unclaim(
        &self,
        conn: &mut PgConnection,
        seqs: &[i64],
    ) -> Result<(), sqlx::Error> {
        sqlx::query(UNCLAIM)
            .bind(&self.stream)
            .bind(&self.durable)
            .bind(seqs)
            .execute(conn)
            .await
            .map(drop)
    }
}

impl PgSink {
    /// Makes every write of this sink claim its sequences under `key`.
    pub fn keep_ledger(&mut self, key: LedgerKey) {
        self.ledger = Some(key);
    }

    /// The key of the ledger this sink keeps, if it keeps one.
    pub fn ledger(&self) -> Option<&LedgerKey> {
        self.ledger.as_ref()
    }

    /// Creates the ledger's table where it is missing, and proves the role
    /// can write and delete its entries (inside a transaction rolled back).
    pub async fn ensure_ledger(&self) -> Result<(), LedgerError> {
        let fail = LedgerError::of;
        let mut conn = self
            .acquire()
            .await
            .map_err(|e| LedgerError(e.to_string(), true))?;
        let mut tx = self.begin(&mut conn).await.map_err(fail)?;
        // Created by someone else (an administrator, another process), it
        // is used as it is: CREATE IF NOT EXISTS would still want CREATE.
        let exists: bool = sqlx::query_scalar(EXISTS)
            .fetch_one(&mut *tx)
            .await
            .map_err(fail)?;
        let created = match exists {
            true => Ok(()),
            false => sqlx::query(CREATE).execute(&mut *tx).await.map(drop),
        };
        match created {
            Ok(()) => tx.commit().await.map_err(fail)?,
            // Two processes created it at the same moment: it exists.
            Err(e) if SqlState::of(&e).is_some_and(created_meanwhile) => {
                tx.rollback().await.map_err(fail)?
            }
            Err(e) => return Err(fail(e)),
        }
        let mut tx = self.begin(&mut conn).await.map_err(fail)?;
        let probe = LedgerKey {
            stream: String::new(),
            durable: String::new(),
        };
        probe.claim(&mut tx, &[0]).await.map_err(fail)?;
        probe.unclaim(&mut tx, &[0]).await.map_err(fail)?;
        tx.rollback().await.map_err(fail)
    }

    /// Records how a message was settled without a write of its own. A
    /// sink without a ledger records nothing.
    pub async fn record(&self, seq: u64, entry: Entry) -> Result<(), WriteError> {
        let Some(key) = &self.ledger else {
            return Ok(());
        };
        let mut conn = self.acquire().await?;
        let mut tx = self.begin(&mut conn).await.map_err(WriteError::from_sqlx)?;
        sqlx::query(RECORD)
            .bind(&key.stream)
            .bind(&key.durable)
            .bind(seq as i64)
            .bind(entry.as_str())
            .execute(&mut *tx)
            .await
            .map_err(WriteError::from_sqlx)?;
        tx.commit().await.map_err(WriteError::from_sqlx)
    }

    /// Removes the entries below `first` (the stream's first sequence: no
    /// message below it can be delivered again), in small transactions.
    /// Returns how many were removed.
    pub async fn prune_ledger(&self, first: u64) -> Result<u64, WriteError> {
        let Some(key) = &self.ledger else {
            return Ok(0);
        };
        let mut removed = 0;
        loop {
            let mut conn = self.acquire().await?;
            let mut tx = self.begin(&mut conn).await.map_err(WriteError::from_sqlx)?;
            let done = sqlx::query(PRUNE)
                .bind(&key.stream)
                .bind(&key.durable)
                .bind(first as i64)
                .bind(PRUNE_CHUNK)
                .execute(&mut *tx)
                .await
                .map_err(WriteError::from_sqlx)?
                .rows_affected();
            tx.commit().await.map_err(WriteError::from_sqlx)?;
            removed += done;
            if done < PRUNE_CHUNK as u64 {
                return Ok(removed);
            }
        }
    }

    /// The entries from `from` to `to` (inclusive), by sequence.
    pub async fn ledger_entries(
        &self,
        from: u64,
        to: u64,
    ) -> Result<BTreeMap<u64, Entry>, WriteError> {
        let Some(key) = &self.ledger else {
            return Ok(BTreeMap::new());
        };
        let mut conn = self.acquire().await?;
        let mut tx = self.begin(&mut conn).await.map_err(WriteError::from_sqlx)?;
        let rows: Vec<(i64, String)> = sqlx::query_as(ENTRIES)
            .bind(&key.stream)
            .bind(&key.durable)
            .bind(from as i64)
            .bind(to as i64)
            .fetch_all(&mut *tx)
            .await
            .map_err(WriteError::from_sqlx)?;
        tx.rollback().await.map_err(WriteError::from_sqlx)?;
        Ok(rows
            .into_iter()
            .map(|(seq, outcome)| (seq as u64, Entry::parse(&outcome)))
            .collect())
    }
}

/// The errors of a `CREATE TABLE` that another session ran at the same
/// moment: the table exists.
fn created_meanwhile(state: SqlState) -> bool {
    state == SqlState::UNIQUE_VIOLATION || state == SqlState::DUPLICATE_TABLE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_read_back_as_written() {
        for e in Entry::ALL {
            assert_eq!(Entry::parse(e.as_str()), e);
        }
    }
}
