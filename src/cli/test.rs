//! `ingestd test`: pipeline unit tests. A test file (`NAME.test.yaml`
//! beside the pipeline) lists input events and the expected outcome of
//! each: the stored row's columns, or the class of error.
//!
//! The cases run the production path: the file's cases are one batch,
//! written by the engine's own writer (the same plans, the same fast or
//! per-row path, the same isolation of rejected rows) in a transaction
//! that is rolled back. A case's expected columns are then compared with
//! the row its statement returns, run alone in a rolled-back transaction.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value as Json;

use crate::config::files::{is_test_file, SUFFIXES};
use crate::config::PipelineFile;
use crate::sink::postgres::{Finish, Outcome, PgSink, SinkRow, Trial};
use crate::transform::event::{Compiled, InvalidKind};
use crate::transform::template::MsgMeta;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TestFile {
    /// The pipeline file, relative to the test file (default: the test
    /// file's name without `.test`).
    #[serde(default)]
    pipeline: Option<PathBuf>,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    subject: String,
    /// The event as YAML/JSON; or `payload` for raw text; or `event_file`.
    #[serde(default)]
    event: Option<Json>,
    #[serde(default)]
    payload: Option<String>,
    #[serde(default)]
    event_file: Option<PathBuf>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    expect: Expect,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Expect {
    /// Expected column values of the stored row (a subset of its columns).
    #[serde(default)]
    row: Option<BTreeMap<String, Json>>,
    /// Expected error class: too_large, not_json, schema, template, unstorable.
    #[serde(default)]
    invalid: Option<InvalidKind>,
}

/// Runs the test files found in `paths` (files or directories); prints a
/// line per case, a diff per failure and a summary. Returns the number of
/// failed cases.
pub async fn run(paths: &[PathBuf], database_url: &str) -> anyhow::Result<usize> {
    let files = find(paths)?;
    anyhow::ensure!(
        !files.is_empty(),
        "no pipeline test files (*.test.yaml) found"
    );
    let (mut passed, mut failed) = (0, 0);
    for file in files {
        let (p, f) = run_file(&file, database_url).await?;
        passed += p;
        failed += f;
    }
    println!("\n{passed} passed, {failed} failed");
    Ok(failed)
}

fn find(paths: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(p)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| is_test_file(f))
                .collect();
            found.sort();
            out.extend(found);
        } else if is_test_file(p) {
            out.push(p.clone());
        } else {
            let stem = p.with_extension("");
            out.push(PathBuf::from(format!("{}{}", stem.display(), SUFFIXES[0])));
        }
    }
    Ok(out)
}

/// Reads a test file; returns it with the path of its pipeline file.
fn load(path: &Path) -> anyhow::Result<(TestFile, PathBuf)> {
    let text =
        std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let tests: TestFile =
        serde_yaml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let pipeline_path = match &tests.pipeline {
        Some(p) => dir.join(p),
        None => PathBuf::from(path.to_string_lossy().replace(".test.", ".")),
    };
    Ok((tests, pipeline_path))
}

/// Checks a test file offline (for `ingestd check`): it parses, its
/// pipeline file exists, and every case's event can be read.
pub fn check(path: &Path) -> anyhow::Result<()> {
    let (tests, pipeline_path) = load(path)?;
    anyhow::ensure!(
        pipeline_path.is_file(),
        "{}: its pipeline file {} does not exist",
        path.display(),
        pipeline_path.display()
    );
    let dir = path.parent().unwrap_or(Path::new("."));
    for case in &tests.cases {
        payload(case, dir)
            .map_err(|e| anyhow::anyhow!("{}: case `{}`: {e}", path.display(), case.name))?;
    }
    Ok(())
}

async fn run_file(path: &Path, database_url: &str) -> anyhow::Result<(usize, usize)> {
    let (tests, pipeline_path) = load(path)?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let file = PipelineFile::load(&pipeline_path)?;
    let compiled = Compiled::new(&file)?;
    let pg = &file.pipeline.sink.postgres;
    let sink = PgSink::connect(pg.url.as_deref().unwrap_or(database_url), 1).await?;
    if let Some(m) = &pg.migrations {
        sink.migrate(m).await?;
    }
    println!("{} ({})", path.display(), pipeline_path.display());
    let outcomes = run_batch(&tests.cases, dir, &compiled, &sink).await;
    let (mut passed, mut failed) = (0, 0);
    for (case, outcome) in tests.cases.iter().zip(outcomes) {
        match check_case(case, outcome, &sink).await {
            Ok(()) => {
                passed += 1;
                println!("  ok    {}", case.name);
            }
            Err(diff) => {
                failed += 1;
                println!("  FAIL  {}\n{}", case.name, indent(&diff));
            }
        }
    }
    Ok((passed, failed))
}

/// What the production path did with one case.
enum CaseOutcome {
    /// Never became a row: its class and error.
    Invalid(InvalidKind, String),
    /// Written in the batch; the rendered statement, for showing its row.
    Stored(crate::transform::template::Rendered),
    /// Could not be run at all (a bad test case, the database).
    Broken(String),
}

/// Prepares every case as the engine would (the message metadata is a
/// stream `TEST` with the case's position as its sequence) and writes the
/// rows as one batch, rolled back.
async fn run_batch(
    cases: &[Case],
    dir: &Path,
    compiled: &Compiled,
    sink: &PgSink,
) -> Vec<CaseOutcome> {
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let mut outcomes = Vec::with_capacity(cases.len());
    let mut rows = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let meta = MsgMeta {
            subject: case.subject.clone(),
            stream: Some("TEST".into()),
            seq: Some(i as u64 + 1),
            time: Some(now.clone()),
            delivered: Some(1),
        };
        let prepared = payload(case, dir).map(|p| compiled.prepare(&p, &meta, &case.headers));
        outcomes.push(match prepared {
            Err(e) => CaseOutcome::Broken(e),
            Ok(Err(invalid)) => CaseOutcome::Invalid(invalid.kind, invalid.error),
            Ok(Ok(prepared)) => {
                rows.push((
                    i,
                    SinkRow {
                        rendered: prepared.rendered,
                        outcome: Outcome::Pending,
                    },
                ));
                CaseOutcome::Broken("not written".into())
            }
        });
    }
    let mut writes: Vec<&mut SinkRow> = rows.iter_mut().map(|(_, r)| r).collect();
    let written = sink.write(&mut writes, Finish::Rollback).await;
    for (i, row) in rows {
        outcomes[i] = match (&written, row.outcome) {
            (Err(e), _) => CaseOutcome::Broken(format!("database error: {e}")),
            (Ok(()), Outcome::Stored) => CaseOutcome::Stored(row.rendered),
            (Ok(()), Outcome::Rejected(r)) => {
                CaseOutcome::Invalid(InvalidKind::Unstorable, r.error)
            }
            (Ok(()), Outcome::Pending) => {
                CaseOutcome::Broken("the batch left the row pending".into())
            }
        };
    }
    outcomes
}

/// Ok, or the readable difference between expected and actual.
async fn check_case(case: &Case, outcome: CaseOutcome, sink: &PgSink) -> Result<(), String> {
    let actual = match outcome {
        CaseOutcome::Broken(e) => return Err(e),
        CaseOutcome::Invalid(kind, error) => Err((kind, error)),
        CaseOutcome::Stored(rendered) => Ok(rendered),
    };
    match (&case.expect.invalid, &case.expect.row, actual) {
        (Some(want), _, Err((kind, _))) if *want == kind => Ok(()),
        (Some(want), _, Err((kind, error))) => Err(format!(
            "expected invalid `{want}`, got invalid `{kind}`: {error}"
        )),
        (Some(want), _, Ok(_)) => Err(format!(
            "expected invalid `{want}`, but the event was stored"
        )),
        (None, _, Err((kind, error))) => {
            Err(format!("expected a row, got invalid `{kind}`: {error}"))
        }
        (None, None, Ok(_)) => Ok(()),
        (None, Some(want), Ok(rendered)) => match sink.trial(&rendered).await {
            Ok(Trial::Row(Some(row))) => compare(want, &row),
            Ok(Trial::Row(None)) => Err("expected a row, but the statement returned none".into()),
            Ok(Trial::Unavailable) => Err("this statement (it has a WITH of its own) cannot show its row: leave out `row` to check that it is stored".into()),
            Ok(Trial::Rejected(r)) => Err(format!("the statement alone is rejected: {}", r.error)),
            Err(e) => Err(format!("database error: {e}")),
        },
    }
}

fn payload(case: &Case, dir: &Path) -> Result<Vec<u8>, String> {
    match (&case.event, &case.payload, &case.event_file) {
        (Some(e), None, None) => Ok(e.to_string().into_bytes()),
        (None, Some(p), None) => Ok(p.clone().into_bytes()),
        (None, None, Some(f)) => {
            std::fs::read(dir.join(f)).map_err(|e| format!("{}: {e}", f.display()))
        }
        _ => Err("give exactly one of `event`, `payload`, `event_file`".into()),
    }
}

/// Compares the expected columns with the stored row; strings compare as
/// text, numbers numerically, everything else as JSON.
fn compare(want: &BTreeMap<String, Json>, row: &Json) -> Result<(), String> {
    let diffs: Vec<String> = want
        .iter()
        .filter_map(|(col, expected)| {
            let actual = row.get(col).unwrap_or(&Json::Null);
            (!same(expected, actual))
                .then(|| format!("{col}:\n  expected {expected}\n  actual   {actual}"))
        })
        .collect();
    if diffs.is_empty() {
        Ok(())
    } else {
        Err(diffs.join("\n"))
    }
}

fn same(expected: &Json, actual: &Json) -> bool {
    match (expected, actual) {
        (Json::Number(a), Json::Number(b)) => a.as_f64() == b.as_f64(),
        _ => expected == actual,
    }
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("        {l}\n")).collect()
}

/// `ingestd test`: runs the test files of `paths`; fails when a case fails.
pub fn main(paths: Vec<PathBuf>, database_url: &str) -> std::process::ExitCode {
    let paths = if paths.is_empty() {
        vec![PathBuf::from("pipelines")]
    } else {
        paths
    };
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(run(&paths, database_url)));
    match result {
        Ok(0) => std::process::ExitCode::SUCCESS,
        Ok(_) => std::process::ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn compare_reports_each_differing_column() {
        let want = BTreeMap::from([("a".to_string(), json!("x")), ("n".to_string(), json!(1))]);
        assert!(compare(&want, &json!({"a": "x", "n": 1.0, "other": 3})).is_ok());
        let err = compare(&want, &json!({"a": "y", "n": 1})).unwrap_err();
        assert!(
            err.contains("a:") && err.contains("\"y\"") && !err.contains("n:"),
            "{err}"
        );
    }

    #[test]
    fn test_files_are_recognised() {
        assert!(is_test_file(Path::new("p/tiktok.test.yaml")));
        assert!(!is_test_file(Path::new("p/tiktok.yaml")));
    }
}
