//! Naming, ports and files: unique ids, the repository and its files,
//! pipeline text rewrites, output locations.

use super::*;

/// The repository root, so that pipelines copied to temp dirs can point at
/// the shipped schemas/ and migrations/ with absolute paths.
pub fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The `ingestd` binary cargo built for this test run.
pub fn ingestd_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_ingestd"))
}

/// An id unique across parallel tests and test processes, usable as a NATS
/// subject token, a stream/consumer name and part of a database name.
pub fn unique_id() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let micros = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_micros();
    format!("t{:x}x{n:x}x{:x}", std::process::id(), micros & 0xff_ffff)
}

/// A free TCP port on 127.0.0.1 (bound, read, released) for the engine's HTTP
/// server. Racy in theory, fine for tests.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind an ephemeral port")
        .port()
}

/// Applies textual `(from, to)` replacements to a pipeline file.
///
/// Panics when a `from` does not occur: if the shipped pipeline changed so
/// that a name is no longer rewritten, tests would silently share a stream or
/// consumer, which is worse than failing loudly.
pub fn adapt_pipeline(yaml: &str, replacements: &[(String, String)]) -> String {
    replacements
        .iter()
        .fold(yaml.to_owned(), |text, (from, to)| {
            assert!(
                text.contains(from.as_str()),
                "pipeline adaptation: {from:?} not found in the pipeline text"
            );
            text.replace(from.as_str(), to)
        })
}

/// The text of a file of the repository (pipelines, examples, ...).
pub fn repo_file(relative: &str) -> String {
    let path = repo_root().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// 1-based number of the first line of `text` that contains `needle`.
pub fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .map(|i| i + 1)
        .unwrap_or_else(|| panic!("{needle:?} not found in text"))
}

/// Whether `output` names `file_name` at `line` as `file:line` (optionally
/// followed by `:column`), without mistaking line 3 for line 35.
pub fn names_location(output: &str, file_name: &str, line: usize) -> bool {
    let needle = format!("{file_name}:{line}");
    output.match_indices(&needle).any(|(at, _)| {
        !output[at + needle.len()..]
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_digit())
    })
}

/// The `source:` block of a test's pipeline file: a stream of every
/// subject under `prefix`, and the durable `durable` reading `filter`
/// under it.
pub fn nats_source(
    stream: &str,
    prefix: &str,
    durable: &str,
    filter: &str,
    ack_wait: &str,
) -> String {
    format!(
        r#"source:
  nats:
    stream:
      name: {stream}
      subjects: ["{prefix}>"]
    consumer:
      durable: {durable}
      filter_subject: "{prefix}{filter}"
      ack_wait: {ack_wait}
"#
    )
}
