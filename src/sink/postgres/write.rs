//! The batch writer: runs of one plan, the attempts that isolate rejected
//! rows (in the per-row function, a savepoint per range of good rows), the
//! session functions of the per-row path, all bounded by the engine's
//! clock.

use std::borrow::Cow;

use super::*;

impl PgSink {
    /// One write attempt (see [`Self::write`]) bounded by the engine's own
    /// clock ([`Limits::attempt`]) once its turn at the pool has come: the
    /// wait for a turn is backpressure (the caller keeps the batch alive),
    /// not part of the attempt. Rows committed before the bound passes keep
    /// their outcome.
    pub async fn write_bounded(
        &self,
        rows: &mut [&mut SinkRow],
        finish: Finish,
    ) -> Result<(), WriteError> {
        let turn = self.pool.turn().await;
        let bound = self.limits.attempt();
        tokio::time::timeout(bound, self.write_in(turn, rows, finish))
            .await
            .unwrap_or_else(|_| {
                Err(WriteError::Transient(format!(
                    "the database did not answer within {bound:?}"
                )))
            })
    }

    /// One attempt at writing the rows still `Pending`, in order. Rows that
    /// fail for a reason of their own become `Rejected`, the others
    /// `Stored` (once the transaction is finished as `finish` says). On an
    /// error every pending row stays `Pending`.
    pub async fn write(&self, rows: &mut [&mut SinkRow], finish: Finish) -> Result<(), WriteError> {
        let turn = self.pool.turn().await;
        self.write_in(turn, rows, finish).await
    }

    async fn write_in(
        &self,
        turn: pool::Turn<'_>,
        rows: &mut [&mut SinkRow],
        finish: Finish,
    ) -> Result<(), WriteError> {
        let mut conn = turn
            .connect(self.limits.connect)
            .await
            .map_err(WriteError::from_sqlx)?;
        // Duplicates found by a claim end the attempt (nothing of it is
        // kept); the rest is written again without them.
        loop {
            let (batch, refused) = self.encode_pending(&mut conn, rows).await?;
            let indices: Vec<usize> = batch.iter().map(|e| e.index).collect();
            let result = if batch.is_empty() {
                Ok(Vec::new())
            } else {
                self.attempts(&mut conn, &batch, finish).await
            };
            drop(batch);
            for (index, rejection) in refused {
                rows[index].outcome = Outcome::Rejected(rejection);
            }
            match result {
                Ok(rejected) => {
                    for &index in &indices {
                        rows[index].outcome = Outcome::Stored;
                    }
                    for (k, rejection) in rejected {
                        rows[indices[k]].outcome = Outcome::Rejected(rejection);
                    }
                    return Ok(());
                }
                Err(Failed::Duplicates(found)) => {
                    for k in found {
                        rows[indices[k]].outcome = Outcome::Duplicate;
                    }
                }
                Err(e) => {
                    let err = e.into_write_error();
                    if matches!(err, WriteError::Pipeline(_)) {
                        self.forget_plans();
                    }
                    return Err(err);
                }
            }
        }
    }

    /// The pending rows' values, encoded for their plans (borrowing the
    /// rows' strings), and the rows no plan can take (a NUL in a value).
    async fn encode_pending<'a>(
        &self,
        conn: &mut PgConnection,
        rows: &'a [&mut SinkRow],
    ) -> Result<(Vec<Encoded<'a>>, Vec<(usize, Rejection)>), WriteError> {
        let mut batch = Vec::new();
        let mut refused = Vec::new();
        let mut last: Option<(&Arc<str>, Arc<Plan>)> = None;
        for (index, row) in rows.iter().enumerate() {
            if row.outcome != Outcome::Pending {
                continue;
            }
            let plan = match &last {
                Some((sql, plan)) if Arc::ptr_eq(sql, &row.rendered.sql) => plan.clone(),
                _ => self.plan_on(conn, &row.rendered).await?,
            };
            last = Some((&row.rendered.sql, plan.clone()));
            match plan.encode(&row.rendered.params) {
                Ok(values) => batch.push(Encoded {
                    index,
                    seq: row.seq,
                    plan,
                    values,
                }),
                Err(e) => refused.push((
                    index,
                    Rejection {
                        sqlstate: None,
                        error: e.to_string(),
                    },
                )),
            }
        }
        Ok((batch, refused))
    }

    /// The attempts at a batch on one connection: as fast as its plans
    /// allow (with every plain insert the batch's plans have, when one of
    /// those plans expects no conflict); with `ON CONFLICT` if a plain
    /// insert conflicted; row by row if an UNNEST upsert met one key twice;
    /// with rows isolated if a row is at fault. The error is the last
    /// attempt's.
    async fn attempts(
        &self,
        conn: &mut PgConnection,
        batch: &[Encoded<'_>],
        finish: Finish,
    ) -> Result<Vec<(usize, Rejection)>, Failed> {
        let hopeful = plans_with_plain_insert(batch);
        // Every hopeful plan counts this batch, so each one's wait runs down.
        let tries = hopeful
            .iter()
            .fold(false, |any, p| p.optimism.tries() | any);
        let mut result = if tries {
            let result = self.attempt(conn, batch, Mode::PlainInsert, finish).await;
            let conflicted = result.as_ref().is_err_and(Failed::is_conflict);
            if conflicted || result.is_ok() {
                hopeful.iter().for_each(|p| p.optimism.record(conflicted));
            }
            if conflicted {
                self.attempt(conn, batch, Mode::Batch, finish).await
            } else {
                result
            }
        } else {
            self.attempt(conn, batch, Mode::Batch, finish).await
        };
        if result.as_ref().is_err_and(Failed::is_repeated_key)
            && batch
                .iter()
                .any(|e| matches!(e.plan.path, WritePath::Unnest(_)))
        {
            result = self.attempt(conn, batch, Mode::RowByRow, finish).await;
        }
        if result.as_ref().is_err_and(|e| e.fault() == Fault::Event) {
            result = self.attempt(conn, batch, Mode::Isolate, finish).await;
        }
        result
    }

    /// Runs the batch in one transaction, creating the plans' session
    /// functions first where this connection lacks them (once: an error
    /// that stays is not about them). Returns the rows (indices into
    /// `batch`) rejected in `Isolate` mode.
    async fn attempt(
        &self,
        conn: &mut PgConnection,
        batch: &[Encoded<'_>],
        mode: Mode,
        finish: Finish,
    ) -> Result<Vec<(usize, Rejection)>, Failed> {
        let ledger = self.ledger.as_ref();
        let result = run_batch(conn, &self.session, ledger, batch, mode, finish).await;
        match result {
            Err(Failed::Sql(e)) if may_lack_functions(&e, batch, mode) => {
                create_functions(conn, batch).await?;
                run_batch(conn, &self.session, ledger, batch, mode, finish).await
            }
            other => other,
        }
    }
}

/// How a batch is run: as fast as its plans allow, or through the per-row
/// functions with the rows at fault isolated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// As `Batch`, with each plan's plain insert where it has one.
    PlainInsert,
    Batch,
    /// Every run through its per-row function, without savepoints: for a
    /// batch whose UNNEST statement met one key twice (21000), which the
    /// single-row statements handle one after the other.
    RowByRow,
    Isolate,
}

/// A row's values as text, ready to bind, and the plan they are for.
struct Encoded<'a> {
    index: usize,
    seq: Option<u64>,
    plan: Arc<Plan>,
    values: Vec<Option<Cow<'a, str>>>,
}

/// A failure of the row at this index of a run, as the per-row function
/// reports it in `Isolate` mode.
type RowFailure = (i32, SqlState, String);

/// One transaction over the batch's runs. In `Isolate` mode a row failure
/// that is not the row's own fault (a lock time-out, an undefined column)
/// fails the whole attempt. With a ledger, the batch's sequences are
/// claimed first (duplicates fail the attempt, see [`claim`]) and the
/// claims of rejected rows are given up before the commit.
async fn run_batch(
    conn: &mut PgConnection,
    session: &Session,
    ledger: Option<&LedgerKey>,
    batch: &[Encoded<'_>],
    mode: Mode,
    finish: Finish,
) -> Result<Vec<(usize, Rejection)>, Failed> {
    let mut tx = session.begin(conn).await?;
    if let Some(key) = ledger {
        claim(&mut tx, key, batch).await?;
    }
    let mut rejected = Vec::new();
    let mut start = 0;
    for run in batch.chunk_by(|a, b| Arc::ptr_eq(&a.plan, &b.plan)) {
        let plan = &run[0].plan;
        match (&plan.path, mode) {
            (WritePath::Unnest(unnest), Mode::Batch | Mode::PlainInsert) => {
                let sql = match (&unnest.plain_insert, mode) {
                    (Some(plain), Mode::PlainInsert) => plain,
                    _ => &unnest.sql,
                };
                let mut q = sqlx::query(sql);
                for col in 0..plan.arity() {
                    q = q.bind(column(run, col));
                }
                q.execute(&mut *tx).await?;
            }
            _ => {
                let mut q = sqlx::query_as::<_, RowFailure>(&plan.function.call)
                    .bind(mode == Mode::Isolate)
                    .bind(run.len() as i32);
                for col in 0..plan.arity() {
                    q = q.bind(column(run, col));
                }
                for (row, state, message) in q.fetch_all(&mut *tx).await? {
                    if state.fault() != Fault::Event {
                        return Err(Failed::Caught { state, message });
                    }
                    let k = start + row as usize - 1;
                    let error = sqlstate::line(state, &message);
                    rejected.push((
                        k,
                        Rejection {
                            sqlstate: Some(state),
                            error,
                        },
                    ));
                }
            }
        }
        start += run.len();
    }
    if let Some(key) = ledger.filter(|_| !rejected.is_empty()) {
        let seqs: Vec<i64> = rejected
            .iter()
            .filter_map(|(k, _)| batch[*k].seq)
            .map(|s| s as i64)
            .collect();
        key.unclaim(&mut tx, &seqs).await?;
    }
    match finish {
        Finish::Commit => tx.commit().await?,
        Finish::Rollback => tx.rollback().await?,
    }
    Ok(rejected)
}

/// Claims the batch's sequences (in order, so that two processes claiming
/// overlapping batches lock their keys in the same order). A sequence not
/// claimed, or met a second time in the batch, is a duplicate: the
/// attempt fails with [`Failed::Duplicates`] (indices into `batch`).
async fn claim(
    tx: &mut PgConnection,
    key: &LedgerKey,
    batch: &[Encoded<'_>],
) -> Result<(), Failed> {
    let mut seqs: Vec<i64> = batch
        .iter()
        .filter_map(|e| e.seq)
        .map(|s| s as i64)
        .collect();
    seqs.sort_unstable();
    seqs.dedup();
    let mut claimed: std::collections::HashSet<i64> =
        key.claim(tx, &seqs).await?.into_iter().collect();
    let duplicates: Vec<usize> = batch
        .iter()
        .enumerate()
        .filter(|(_, e)| e.seq.is_some_and(|s| !claimed.remove(&(s as i64))))
        .map(|(k, _)| k)
        .collect();
    match duplicates.is_empty() {
        true => Ok(()),
        false => Err(Failed::Duplicates(duplicates)),
    }
}

/// Creates the session functions of the batch's plans on this connection
/// (once per connection and plan: they live as long as the session).
async fn create_functions(
    conn: &mut PgConnection,
    batch: &[Encoded<'_>],
) -> Result<(), sqlx::Error> {
    let mut done: Vec<&str> = Vec::new();
    for r in batch {
        let f = &r.plan.function;
        if !done.contains(&f.name.as_str()) {
            sqlx::query(&f.create).execute(&mut *conn).await?;
            done.push(&f.name);
        }
    }
    Ok(())
}

/// The batch's plans that have a plain insert, each once.
fn plans_with_plain_insert(batch: &[Encoded<'_>]) -> Vec<Arc<Plan>> {
    let mut plans: Vec<Arc<Plan>> = Vec::new();
    for e in batch {
        let has = matches!(&e.plan.path, WritePath::Unnest(u) if u.plain_insert.is_some());
        if has && !plans.iter().any(|p| Arc::ptr_eq(p, &e.plan)) {
            plans.push(e.plan.clone());
        }
    }
    plans
}

fn column<'a>(run: &'a [Encoded<'_>], col: usize) -> Vec<Option<&'a str>> {
    run.iter().map(|r| r.values[col].as_deref()).collect()
}

/// Why an attempt failed: a statement's error, or a row failure the
/// per-row function caught that is not the row's own fault.
#[derive(Debug)]
pub(super) enum Failed {
    Sql(sqlx::Error),
    Caught {
        state: SqlState,
        message: String,
    },
    /// Rows (indices into the batch) whose sequences the ledger holds
    /// already: the attempt is rolled back and made again without them.
    Duplicates(Vec<usize>),
}

impl From<sqlx::Error> for Failed {
    fn from(e: sqlx::Error) -> Self {
        Failed::Sql(e)
    }
}

impl Failed {
    /// `ON CONFLICT DO UPDATE` met the same key twice in one statement.
    fn is_repeated_key(&self) -> bool {
        self.code() == Some(SqlState::CARDINALITY_VIOLATION)
    }

    /// A unique or exclusion violation: what a plain insert meets where
    /// its `ON CONFLICT … DO NOTHING` would have skipped a row (or where
    /// that would fail too, on another constraint).
    fn is_conflict(&self) -> bool {
        matches!(
            self.code(),
            Some(SqlState::UNIQUE_VIOLATION | SqlState::EXCLUSION_VIOLATION)
        )
    }

    /// The SQLSTATE, of the statement's error or of the caught row failure
    /// (never an event's fault, so never 21000 or class 23).
    fn code(&self) -> Option<SqlState> {
        match self {
            Failed::Sql(e) => SqlState::of(e),
            Failed::Caught { state, .. } => Some(*state),
            Failed::Duplicates(_) => None,
        }
    }

    fn fault(&self) -> Fault {
        match self {
            Failed::Sql(e) => sqlstate::fault(e),
            Failed::Caught { state, .. } => state.fault(),
            Failed::Duplicates(_) => Fault::Transient,
        }
    }

    pub(super) fn into_write_error(self) -> WriteError {
        let text = match &self {
            Failed::Sql(e) => sqlstate::describe(e),
            Failed::Caught { state, message } => sqlstate::line(*state, message),
            Failed::Duplicates(rows) => format!("{} rows were written already", rows.len()),
        };
        let code = self.code();
        match self.fault() {
            Fault::Transient => WriteError::Transient(text),
            _ => match code.and_then(SqlState::meaning) {
                Some(meaning) => WriteError::Pipeline(format!("{text} ({meaning})")),
                None => WriteError::Pipeline(text),
            },
        }
    }
}

/// True when the error may say that a session function the attempt calls
/// is missing on this connection: the function itself (42883), or the
/// session's temporary schema, which exists only once something was
/// created in it (3F000). The codes decide, not the message: creating the
/// functions and trying once more costs a round trip where the error was
/// about something else.
fn may_lack_functions(e: &sqlx::Error, batch: &[Encoded<'_>], mode: Mode) -> bool {
    let missing = matches!(
        SqlState::of(e),
        Some(SqlState::UNDEFINED_FUNCTION | SqlState::INVALID_SCHEMA_NAME)
    );
    missing && calls_functions(batch, mode)
}

/// True when the attempt runs some of the batch through a per-row
/// function (see `run_batch`).
fn calls_functions(batch: &[Encoded<'_>], mode: Mode) -> bool {
    match mode {
        Mode::RowByRow | Mode::Isolate => !batch.is_empty(),
        Mode::Batch | Mode::PlainInsert => batch
            .iter()
            .any(|e| !matches!(e.plan.path, WritePath::Unnest(_))),
    }
}
