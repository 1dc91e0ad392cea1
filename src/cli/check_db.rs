//! `ingestd check --db`: every statement each pipeline can render, planned
//! against the database as the pipeline's migrations leave it, in a dry
//! run (the migrations, the plans and the session's per-row functions all
//! inside one transaction that is rolled back). It says which path each
//! statement takes and reports at `file:line` what cannot work.

use std::path::Path;

use crate::config::{ConfigError, PipelineFile};
use crate::sink::postgres::ledger::TABLE as LEDGER;
use crate::sink::postgres::plan::WritePath;
use crate::sink::postgres::{DryRun, Limits, WriteError};
use crate::transform::event::Compiled;

/// Why a statement takes the unnest path (`plan::unnest_blocker` found
/// nothing against it).
const UNNEST_REASON: &str = "one VALUES tuple into a table without statement-level or AFTER ROW \
triggers, rules, foreign keys to itself or deferrable constraints, and no user-defined function";

/// Checks one file against its database; prints a line per statement.
/// Returns the number of statements that cannot work.
pub async fn check_file(path: &Path, database_url: &str) -> Result<usize, ConfigError> {
    let file = PipelineFile::load(path)?;
    let compiled = Compiled::new(&file)?;
    let pg = &file.pipeline.sink.postgres;
    let url = pg.url.as_deref().unwrap_or(database_url);
    let dry = DryRun::begin(url, Limits::of(pg))
        .await
        .map_err(|e| file.error("sink.postgres", e))?;
    if let Some(dir) = &pg.migrations {
        dry.migrate(dir)
            .await
            .map_err(|e| file.error("sink.postgres.migrations", e))?;
    }
    let mut broken = 0;
    println!("{}:", path.display());
    if pg.exactly_once {
        broken += check_ledger(&dry, &file).await?;
    }
    for (n, variant) in compiled.templates.variants().iter().enumerate() {
        let first_line = variant.sql.trim().lines().next().unwrap_or_default();
        let verified = dry
            .isolated(dry.sink().verify(variant))
            .await
            .map_err(|e| file.error("sink.postgres", e))?;
        match verified {
            Ok(plan) => {
                let why = match &plan.path {
                    WritePath::Unnest(_) => UNNEST_REASON,
                    WritePath::PerRow(reason) => reason,
                };
                println!(
                    "  statement {}: {} ({why}): {first_line}",
                    n + 1,
                    plan.path.name()
                );
            }
            Err(e) => {
                broken += 1;
                let at = file.error(
                    "sink.postgres.insert",
                    format!("statement {} cannot work: {e}\n    {first_line}", n + 1),
                );
                eprintln!("{at}");
            }
        }
    }
    dry.rollback()
        .await
        .map_err(|e| file.error("sink.postgres", e))?;
    Ok(broken)
}

/// Creates the exactly-once ledger (or finds it) and writes and deletes an
/// entry, inside the dry run: 1 when the role cannot (a missing privilege).
async fn check_ledger(dry: &DryRun, file: &PipelineFile) -> Result<usize, ConfigError> {
    let ensured = dry
        .isolated(async {
            dry.sink()
                .ensure_ledger()
                .await
                .map_err(|e| WriteError::Pipeline(e.to_string()))
        })
        .await
        .map_err(|e| file.error("sink.postgres", e))?;
    match ensured {
        Ok(()) => {
            println!("  exactly once: the ledger {LEDGER} can be created and written");
            Ok(0)
        }
        Err(e) => {
            eprintln!("{}", file.error("sink.postgres.exactly_once", e));
            Ok(1)
        }
    }
}
