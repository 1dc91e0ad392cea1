//! `ingestd check --db`: every statement each pipeline can render, planned
//! against the live database without writing (only the session's
//! temporary per-row functions are created). It says which path each
//! statement takes and reports at `file:line` what cannot work.

use std::path::Path;

use crate::config::{ConfigError, PipelineFile};
use crate::sink::postgres::plan::WritePath;
use crate::sink::postgres::PgSink;
use crate::transform::event::Compiled;

/// Checks one file against its database; prints a line per statement.
/// Returns the number of statements that cannot work.
pub async fn check_file(path: &Path, database_url: &str) -> Result<usize, ConfigError> {
    let file = PipelineFile::load(path)?;
    let compiled = Compiled::new(&file)?;
    let pg = &file.pipeline.sink.postgres;
    let url = pg.url.as_deref().unwrap_or(database_url);
    let sink = PgSink::connect(url, 1)
        .await
        .map_err(|e| file.error("sink.postgres", e.to_string()))?;
    let mut broken = 0;
    println!("{}:", path.display());
    for (n, variant) in compiled.templates.variants().iter().enumerate() {
        let first_line = variant.sql.trim().lines().next().unwrap_or_default();
        match sink.verify(variant).await {
            Ok(plan) => {
                let why = match &plan.path {
                    WritePath::Unnest(_) => String::new(),
                    WritePath::PerRow(reason) => format!(" ({reason})"),
                };
                println!(
                    "  statement {}: {}{why}: {first_line}",
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
    Ok(broken)
}
