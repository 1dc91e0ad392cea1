//! Locating pipeline files and their test files in a directory.

use std::path::{Path, PathBuf};

/// The suffixes of pipeline test files (`NAME.test.yaml` beside `NAME.yaml`).
pub const SUFFIXES: [&str; 2] = [".test.yaml", ".test.yml"];

/// True for pipeline test files, which the engine does not load.
pub fn is_test_file(path: &Path) -> bool {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    SUFFIXES.iter().any(|s| name.ends_with(s))
}

/// A pipelines directory that cannot be read.
#[derive(Debug, thiserror::Error)]
#[error("cannot read pipelines directory {}: {source}", dir.display())]
pub struct DirError {
    pub dir: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// The pipeline files of a directory (`*.yaml`, `*.yml`, but not hidden
/// files or pipeline test files), sorted by name.
pub fn pipeline_files(dir: &Path) -> Result<Vec<PathBuf>, DirError> {
    let entries = std::fs::read_dir(dir).map_err(|source| DirError {
        dir: dir.to_path_buf(),
        source,
    })?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .filter(|p| {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default();
            !name.starts_with('.') && !is_test_file(p)
        })
        .collect();
    files.sort();
    Ok(files)
}
