//! Text helpers shared by the components.

/// Keeps error messages (and the log lines and dead-letter headers that
/// carry them) bounded whatever the event holds.
pub fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}
