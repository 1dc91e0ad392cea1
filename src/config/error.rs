//! Configuration errors located in the file: `file:line:column: message`.

use std::fmt;
use std::path::{Path, PathBuf};

/// A configuration problem, already formatted as `file:line:column: message`
/// (or `file: message` where no location is known).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub message: String,
}

impl ConfigError {
    pub fn new(file: &Path, line: Option<usize>, message: impl Into<String>) -> Self {
        Self {
            file: file.to_path_buf(),
            line,
            column: None,
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(column) = self.column {
                write!(f, ":{column}")?;
            }
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

pub(super) fn yaml_error(path: &Path, text: &str, e: &serde_yaml::Error) -> ConfigError {
    let mut err = ConfigError::new(path, None, strip_location(&e.to_string()));
    if let Some(loc) = e.location() {
        err.line = Some(loc.line());
        err.column = Some(loc.column());
        if let Some(line) = refine_line(text, loc.line(), &err.message) {
            err.line = Some(line);
            err.column = None;
        }
    }
    err
}

/// serde_yaml locates errors raised by our value checks (durations, sizes)
/// at the enclosing mapping; those messages quote the bad value as
/// `value`, so the first line from there on holding it is the real place.
fn refine_line(text: &str, from: usize, message: &str) -> Option<usize> {
    let quoted = message.split('`').nth(1).filter(|v| !v.is_empty())?;
    text.lines()
        .enumerate()
        .skip(from.saturating_sub(1))
        .find(|(_, l)| l.contains(quoted))
        .map(|(i, _)| i + 1)
}

/// serde_yaml appends " at line L column C"; we print the location up front.
fn strip_location(msg: &str) -> String {
    match msg.find(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg.to_string(),
    }
}
