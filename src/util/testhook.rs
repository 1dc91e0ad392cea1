//! A fault the integration tests inject into the release binary: with
//! `INGESTD_TEST_PANIC=<point>` set, the first event whose payload contains
//! [`MARKER`] panics at that point, once per process. It is how the tests
//! show that a panic in any stage surfaces as a failing pipeline and that
//! the pipeline recovers. Unset (as in production), each point is one
//! load of a value read once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

/// The bytes that arm the hook in an event's payload.
pub const MARKER: &[u8] = b"ingestd-test-panic";

static POINT: OnceLock<Option<String>> = OnceLock::new();
static FIRED: AtomicBool = AtomicBool::new(false);

/// Panics at `point` if the hook names it, `payload` carries the marker
/// and the hook has not fired yet.
pub fn panic_point(point: &str, payload: &[u8]) {
    let armed = POINT.get_or_init(|| std::env::var("INGESTD_TEST_PANIC").ok());
    if armed.as_deref() != Some(point) || !contains(payload, MARKER) {
        return;
    }
    if !FIRED.swap(true, Ordering::Relaxed) {
        panic!("INGESTD_TEST_PANIC: injected panic at {point}");
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
