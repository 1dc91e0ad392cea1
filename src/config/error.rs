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

/// serde_yaml's error, located where serde_yaml found it: the value
/// checks run in visitors (see `units`), so that is the value itself, and
/// the message starts with the value's full key path.
pub(super) fn yaml_error(path: &Path, e: &serde_yaml::Error) -> ConfigError {
    let mut err = ConfigError::new(path, None, strip_location(&e.to_string()));
    if let Some(loc) = e.location() {
        err.line = Some(loc.line());
        err.column = Some(loc.column());
    }
    err
}

/// serde_yaml appends " at line L column C"; we print the location up front.
fn strip_location(msg: &str) -> String {
    match msg.find(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg.to_string(),
    }
}
