//! `ingestd test`: pipeline unit tests. A test file (`NAME.test.yaml`
//! beside the pipeline) lists input events and the expected outcome of
//! each: the stored row's columns, or the class of error.
//!
//! The cases run the production path: the file's cases are one batch,
//! written by the engine's own writer (the same plans, the same fast or
//! per-row path, the same isolation of rejected rows) with the engine's
//! message metadata. A case's expected columns are then compared with the
//! row its statement returns, run alone. All of it, the pipeline's
//! migrations first, happens in one dry run (`DryRun`): a transaction that
//! is rolled back, so the database is left as it was found.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value as Json;

use crate::config::files::{is_test_file, SUFFIXES};
use crate::config::reason::Reason;
use crate::config::{ConfigError, PipelineFile};
use crate::sink::postgres::{
    DryRun, DryRunError, Finish, Limits, MigrateError, Outcome, PgSink, SinkRow, Trial, WriteError,
};
use crate::transform::event::Compiled;
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
    #[serde(default, deserialize_with = "event_fault")]
    invalid: Option<Reason>,
}

/// `expect.invalid`: only the classes of events that can never be stored
/// (the other reasons are not an outcome a case can have).
fn event_fault<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Reason>, D::Error> {
    let Some(text) = Option::<String>::deserialize(d)? else {
        return Ok(None);
    };
    match text.parse::<Reason>() {
        Ok(reason) if reason.is_event_fault() => Ok(Some(reason)),
        _ => Err(serde::de::Error::custom(format!(
            "`{text}` is not a class of invalid event: too_large, not_json, schema, template or unstorable"
        ))),
    }
}

/// Why test files could not be run (a failing case is not an error: it
/// is counted).
#[derive(Debug, thiserror::Error)]
pub enum TestError {
    #[error("no pipeline test files (*.test.yaml) found")]
    NoTests,
    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_yaml::Error,
    },
    #[error("{}: its pipeline file {} does not exist", path.display(), pipeline.display())]
    NoPipeline { path: PathBuf, pipeline: PathBuf },
    #[error("{}: case `{case}`: {source}", path.display())]
    Case {
        path: PathBuf,
        case: String,
        #[source]
        source: PayloadError,
    },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0:#}")]
    Connect(anyhow::Error),
    #[error("cannot start the runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error(transparent)]
    Migrate(#[from] MigrateError),
    #[error(transparent)]
    DryRun(#[from] DryRunError),
}

/// Where the pipeline's migrations go during a test run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Migrations {
    /// Inside the run's transaction, rolled back with it (the default).
    RolledBack,
    /// Applied for good first (`--apply-migrations`).
    Applied,
}

/// Runs the test files found in `paths` (files or directories); prints a
/// line per case, a diff per failure and a summary. Returns the number of
/// failed cases.
pub async fn run(
    paths: &[PathBuf],
    database_url: &str,
    migrations: Migrations,
) -> Result<usize, TestError> {
    let files = find(paths)?;
    if files.is_empty() {
        return Err(TestError::NoTests);
    }
    let (mut passed, mut failed) = (0, 0);
    for file in files {
        let (p, f) = run_file(&file, database_url, migrations).await?;
        passed += p;
        failed += f;
    }
    println!("\n{passed} passed, {failed} failed");
    Ok(failed)
}

fn find(paths: &[PathBuf]) -> Result<Vec<PathBuf>, TestError> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(p)
                .map_err(|source| TestError::Read {
                    path: p.clone(),
                    source,
                })?
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
fn load(path: &Path) -> Result<(TestFile, PathBuf), TestError> {
    let text = std::fs::read_to_string(path).map_err(|source| TestError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let tests: TestFile = serde_yaml::from_str(&text).map_err(|source| TestError::Parse {
        path: path.to_path_buf(),
        source,
    })?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let pipeline_path = match &tests.pipeline {
        Some(p) => dir.join(p),
        None => PathBuf::from(path.to_string_lossy().replace(".test.", ".")),
    };
    Ok((tests, pipeline_path))
}

/// Checks a test file offline (for `ingestd check`): it parses, its
/// pipeline file exists, and every case's event can be read.
pub fn check(path: &Path) -> Result<(), TestError> {
    let (tests, pipeline_path) = load(path)?;
    if !pipeline_path.is_file() {
        return Err(TestError::NoPipeline {
            path: path.to_path_buf(),
            pipeline: pipeline_path,
        });
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    for case in &tests.cases {
        payload(case, dir).map_err(|source| TestError::Case {
            path: path.to_path_buf(),
            case: case.name.clone(),
            source,
        })?;
    }
    Ok(())
}

/// Runs one test file in a dry run: its migrations (unless applied for
/// good first), the batch and each case's trial all happen inside one
/// transaction that is rolled back, so the database is left as it was.
async fn run_file(
    path: &Path,
    database_url: &str,
    migrations: Migrations,
) -> Result<(usize, usize), TestError> {
    let (tests, pipeline_path) = load(path)?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let file = PipelineFile::load(&pipeline_path)?;
    let compiled = Compiled::new(&file)?;
    let pg = &file.pipeline.sink.postgres;
    let url = pg.url.as_deref().unwrap_or(database_url);
    let limits = Limits::of(pg);
    if let (Some(m), Migrations::Applied) = (&pg.migrations, migrations) {
        let sink = PgSink::private(url, limits)
            .await
            .map_err(TestError::Connect)?;
        sink.migrate(m).await?;
    }
    let dry = DryRun::begin(url, limits).await?;
    if let (Some(m), Migrations::RolledBack) = (&pg.migrations, migrations) {
        dry.migrate(m).await?;
    }
    println!("{} ({})", path.display(), pipeline_path.display());
    let outcomes = run_batch(&tests.cases, dir, &compiled, &dry).await?;
    let (mut passed, mut failed) = (0, 0);
    for (case, outcome) in tests.cases.iter().zip(outcomes) {
        match check_case(case, outcome, &dry).await? {
            Ok(()) => {
                passed += 1;
                println!("  ok    {}", case.name);
            }
            Err(diff) => {
                failed += 1;
                println!("  FAIL  {}\n{}", case.name, indent(&diff.to_string()));
            }
        }
    }
    dry.rollback().await?;
    Ok((passed, failed))
}

/// What the production path did with one case.
enum CaseOutcome {
    /// Never became a row: its class and error.
    Invalid(Reason, String),
    /// Written in the batch; the rendered statement, for showing its row.
    Stored(crate::transform::template::Rendered),
    /// Could not be run at all (a bad test case, the database).
    Broken(CaseFailure),
}

/// Why a case failed: its expectation against what happened.
#[derive(Debug, thiserror::Error)]
enum CaseFailure {
    #[error(transparent)]
    Payload(#[from] PayloadError),
    #[error("database error: {0}")]
    Database(#[source] WriteError),
    #[error("the batch left the row pending")]
    Pending,
    #[error("expected invalid `{want}`, got invalid `{got}`: {error}")]
    OtherInvalid {
        want: Reason,
        got: Reason,
        error: String,
    },
    #[error("expected invalid `{0}`, but the event was stored")]
    Stored(Reason),
    #[error("expected a row, got invalid `{got}`: {error}")]
    Invalid { got: Reason, error: String },
    #[error("expected a row, but the statement returned none")]
    NoRow,
    #[error("this statement (it has a WITH of its own) cannot show its row: leave out `row` to check that it is stored")]
    Unavailable,
    #[error("the statement alone is rejected: {0}")]
    RejectedAlone(String),
    #[error(transparent)]
    Columns(#[from] ColumnDiffs),
}

/// The message metadata of the cases: a stream `TEST`, the case's
/// position as its sequence, published now, delivered once, built by the
/// engine's own code.
fn case_meta(case: &Case, position: usize, now: time::OffsetDateTime) -> MsgMeta {
    MsgMeta::delivered(
        case.subject.clone(),
        "TEST".into(),
        position as u64 + 1,
        1,
        now,
    )
}

/// Prepares every case as the engine would and writes the rows as one
/// batch, rolled back.
async fn run_batch(
    cases: &[Case],
    dir: &Path,
    compiled: &Compiled,
    dry: &DryRun,
) -> Result<Vec<CaseOutcome>, TestError> {
    let now = time::OffsetDateTime::now_utc();
    let mut outcomes = Vec::with_capacity(cases.len());
    let mut rows = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let meta = case_meta(case, i, now);
        let prepared = payload(case, dir).map(|p| compiled.prepare(&p, &meta, &case.headers));
        outcomes.push(match prepared {
            Err(e) => CaseOutcome::Broken(e.into()),
            Ok(Err(invalid)) => CaseOutcome::Invalid(invalid.kind, invalid.error),
            Ok(Ok(prepared)) => {
                rows.push((
                    i,
                    SinkRow {
                        rendered: prepared.rendered,
                        outcome: Outcome::Pending,
                        seq: None,
                    },
                ));
                CaseOutcome::Broken(CaseFailure::Pending)
            }
        });
    }
    let mut writes: Vec<&mut SinkRow> = rows.iter_mut().map(|(_, r)| r).collect();
    let written = dry
        .isolated(dry.sink().write(&mut writes, Finish::Rollback))
        .await?;
    for (i, row) in rows {
        outcomes[i] = match (&written, row.outcome) {
            (Err(e), _) => CaseOutcome::Broken(CaseFailure::Database(e.clone())),
            (Ok(()), Outcome::Stored) => CaseOutcome::Stored(row.rendered),
            (Ok(()), Outcome::Rejected(r)) => CaseOutcome::Invalid(Reason::Unstorable, r.error),
            // A dry run keeps no ledger, so nothing is a duplicate.
            (Ok(()), Outcome::Pending | Outcome::Duplicate) => {
                CaseOutcome::Broken(CaseFailure::Pending)
            }
        };
    }
    Ok(outcomes)
}

/// Ok, or how the case's expectation differs from what happened.
async fn check_case(
    case: &Case,
    outcome: CaseOutcome,
    dry: &DryRun,
) -> Result<Result<(), CaseFailure>, TestError> {
    let actual = match outcome {
        CaseOutcome::Broken(e) => return Ok(Err(e)),
        CaseOutcome::Invalid(kind, error) => Err((kind, error)),
        CaseOutcome::Stored(rendered) => Ok(rendered),
    };
    Ok(match (&case.expect.invalid, &case.expect.row, actual) {
        (Some(want), _, Err((kind, _))) if *want == kind => Ok(()),
        (Some(want), _, Err((got, error))) => Err(CaseFailure::OtherInvalid {
            want: *want,
            got,
            error,
        }),
        (Some(want), _, Ok(_)) => Err(CaseFailure::Stored(*want)),
        (None, _, Err((got, error))) => Err(CaseFailure::Invalid { got, error }),
        (None, None, Ok(_)) => Ok(()),
        (None, Some(want), Ok(rendered)) => {
            match dry.isolated(dry.sink().trial(&rendered)).await? {
                Ok(Trial::Row(Some(row))) => compare(want, &row).map_err(CaseFailure::from),
                Ok(Trial::Row(None)) => Err(CaseFailure::NoRow),
                Ok(Trial::Unavailable) => Err(CaseFailure::Unavailable),
                Ok(Trial::Rejected(r)) => Err(CaseFailure::RejectedAlone(r.error)),
                Err(e) => Err(CaseFailure::Database(e)),
            }
        }
    })
}

/// Why a case's event cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    #[error("{}: {source}", file.display())]
    Read {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("give exactly one of `event`, `payload`, `event_file`")]
    NotOne,
}

fn payload(case: &Case, dir: &Path) -> Result<Vec<u8>, PayloadError> {
    match (&case.event, &case.payload, &case.event_file) {
        (Some(e), None, None) => Ok(e.to_string().into_bytes()),
        (None, Some(p), None) => Ok(p.clone().into_bytes()),
        (None, None, Some(f)) => std::fs::read(dir.join(f)).map_err(|source| PayloadError::Read {
            file: f.clone(),
            source,
        }),
        _ => Err(PayloadError::NotOne),
    }
}

/// The columns whose values differ from the expected ones.
#[derive(Debug, thiserror::Error)]
#[error("{}", .0.iter().map(ColumnDiff::to_string).collect::<Vec<_>>().join("\n"))]
struct ColumnDiffs(Vec<ColumnDiff>);

#[derive(Debug, thiserror::Error)]
#[error("{column}:\n  expected {expected}\n  actual   {actual}")]
struct ColumnDiff {
    column: String,
    expected: Json,
    actual: Json,
}

/// Compares the expected columns with the stored row; strings compare as
/// text, numbers numerically, everything else as JSON.
fn compare(want: &BTreeMap<String, Json>, row: &Json) -> Result<(), ColumnDiffs> {
    let diffs: Vec<ColumnDiff> = want
        .iter()
        .filter_map(|(col, expected)| {
            let actual = row.get(col).unwrap_or(&Json::Null);
            (!same(expected, actual)).then(|| ColumnDiff {
                column: col.clone(),
                expected: expected.clone(),
                actual: actual.clone(),
            })
        })
        .collect();
    if diffs.is_empty() {
        Ok(())
    } else {
        Err(ColumnDiffs(diffs))
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
pub fn main(
    paths: Vec<PathBuf>,
    database_url: &str,
    migrations: Migrations,
) -> std::process::ExitCode {
    let paths = if paths.is_empty() {
        vec![PathBuf::from("pipelines")]
    } else {
        paths
    };
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(TestError::Runtime)
        .and_then(|rt| rt.block_on(run(&paths, database_url, migrations)));
    match result {
        Ok(0) => std::process::ExitCode::SUCCESS,
        Ok(_) => std::process::ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e}");
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
        let err = compare(&want, &json!({"a": "y", "n": 1}))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("a:") && err.contains("\"y\"") && !err.contains("n:"),
            "{err}"
        );
    }

    #[test]
    fn cases_expect_only_classes_of_invalid_events() {
        let expect = |yaml: &str| serde_yaml::from_str::<Expect>(yaml).map(|e| e.invalid);
        assert_eq!(expect("invalid: schema").unwrap(), Some(Reason::Schema));
        assert_eq!(expect("row: {}").unwrap(), None);
        for refused in [
            "invalid: processing_error",
            "invalid: max_deliver",
            "invalid: nope",
        ] {
            let err = expect(refused).unwrap_err().to_string();
            assert!(err.contains("is not a class of invalid event"), "{err}");
        }
    }

    #[test]
    fn test_files_are_recognised() {
        assert!(is_test_file(Path::new("p/tiktok.test.yaml")));
        assert!(!is_test_file(Path::new("p/tiktok.yaml")));
    }
}
