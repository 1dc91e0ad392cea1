//! Waiting without sleeping: every wait polls a condition against a deadline.

use super::*;

/// Default deadline of every wait: generous for a loaded CI machine, short
/// enough that a broken engine fails the suite quickly.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// How often [`wait_for`] probes its condition.
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Polls `probe` until it returns `Ok`, or panics once `timeout` has passed.
///
/// `probe` reports the state it saw as `Err(description)`; the last one goes
/// into the panic message so that a timeout says *why* it timed out.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    wait_for_every(what, timeout, POLL_INTERVAL, probe).await
}

/// As [`wait_for`], probing every `every`: where the moment the condition
/// became true is itself measured, `every` bounds the error.
pub async fn wait_for_every<T, F, Fut>(
    what: &str,
    timeout: Duration,
    every: Duration,
    probe: F,
) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    try_wait_for(timeout, every, probe)
        .await
        .unwrap_or_else(|last| {
            panic!("timed out after {timeout:?} waiting for {what}; last state: {last}")
        })
}

/// Probes `probe` every `every` (a slow probe delays the next one, never
/// doubles it up) until it returns `Ok`; once `timeout` has passed, the last
/// state it reported. For waits whose end is not a failure.
pub async fn try_wait_for<T, F, Fut>(
    timeout: Duration,
    every: Duration,
    mut probe: F,
) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + timeout;
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let last = match probe().await {
            Ok(value) => return Ok(value),
            Err(state) => state,
        };
        if Instant::now() >= deadline {
            return Err(last);
        }
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
