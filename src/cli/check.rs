//! `ingestd check`: pipeline files (and their test files) without running
//! them, optionally every statement against the database.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::config::files::{is_test_file, pipeline_files};
use crate::config::ConfigError;
use crate::transform::event;

/// Why a file did not pass `check`.
#[derive(Debug, thiserror::Error)]
enum CheckError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Test(#[from] super::test::TestError),
    #[error("{}: {count} statements cannot work", file.display())]
    Statements { file: PathBuf, count: usize },
    #[error("cannot start a runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

/// Checks files offline (everything but the database and NATS), and with
/// a database URL also every statement against the database.
pub fn main(paths: Vec<PathBuf>, database_url: Option<&str>) -> ExitCode {
    let paths = if paths.is_empty() {
        vec![PathBuf::from("pipelines")]
    } else {
        paths
    };
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            match pipeline_files(&p) {
                Ok(f) => files.extend(f),
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::FAILURE;
                }
            }
        } else {
            files.push(p);
        }
    }
    let mut failed = 0;
    for f in &files {
        let checked = match database_url {
            _ if is_test_file(f) => super::test::check(f)
                .map(|()| println!("{}: ok", f.display()))
                .map_err(CheckError::from),
            None => event::check_file(f)
                .map(|()| println!("{}: ok", f.display()))
                .map_err(CheckError::from),
            Some(url) => check_against_db(f, url),
        };
        if let Err(e) = checked {
            eprintln!("{e}");
            failed += 1;
        }
    }
    if failed > 0 {
        eprintln!("{failed} of {} pipeline files have problems", files.len());
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn check_against_db(file: &Path, url: &str) -> Result<(), CheckError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(CheckError::Runtime)?;
    match rt.block_on(super::check_db::check_file(file, url))? {
        0 => Ok(()),
        count => Err(CheckError::Statements {
            file: file.to_path_buf(),
            count,
        }),
    }
}
