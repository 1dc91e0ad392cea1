//! Waiting without sleeping: every wait polls a condition against a deadline.

use super::*;

/// Default deadline of every wait: generous for a loaded CI machine, short
/// enough that a broken engine fails the suite quickly.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// How often [`wait_for`] probes its condition.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Polls `probe` until it returns `Ok`, or panics once `timeout` has passed.
///
/// `probe` reports the state it saw as `Err(description)`; the last one goes
/// into the panic message so that a timeout says *why* it timed out.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let last = match probe().await {
            Ok(value) => return value,
            Err(state) => state,
        };
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}; last state: {last}");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// `Ok(())` when `actual == expected`, else the mismatch as the probe state.
pub fn expect_eq<T: PartialEq + std::fmt::Debug>(actual: T, expected: T) -> Result<(), String> {
    if actual == expected {
        Ok(())
    } else {
        Err(format!("got {actual:?}, want {expected:?}"))
    }
}

/// Turns any error into a probe state, for `?` inside [`wait_for`] probes.
pub fn state<E: Display>(context: &str) -> impl FnOnce(E) -> String + '_ {
    move |e| format!("{context}: {e}")
}
