//! `ingestd check`: pipeline files (and their test files) without running
//! them, optionally every statement against the database.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::config::files::{is_test_file, pipeline_files};
use crate::transform::event;

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
                .map_err(|e| format!("{e:#}")),
            None => event::check_file(f)
                .map(|()| println!("{}: ok", f.display()))
                .map_err(|e| e.to_string()),
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

fn check_against_db(file: &Path, url: &str) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    match rt.block_on(super::check_db::check_file(file, url)) {
        Ok(0) => Ok(()),
        Ok(n) => Err(format!("{}: {n} statements cannot work", file.display())),
        Err(e) => Err(e.to_string()),
    }
}
