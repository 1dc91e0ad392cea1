//! Event builders: the example events of `examples/events/`.

use super::*;

/// One of the example events of `examples/events/`, parsed.
pub fn example_event(file_name: &str) -> Value {
    let text = repo_file(&format!("examples/events/{file_name}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parse example {file_name}: {e}"))
}
