//! Waiting for a condition in a test: poll it with a deadline, never sleep a fixed time.

use std::time::Duration;

/// How long [`eventually`] waits before the test fails.
pub const WAIT: Duration = Duration::from_secs(15);

/// How often a condition is polled.
const TICK: Duration = Duration::from_millis(10);

/// Polls `check` until it returns true; panics naming `what` after [`WAIT`].
pub async fn eventually(what: &str, check: impl FnMut() -> bool) {
    eventually_within(what, WAIT, check).await;
}

/// Polls `check` until it returns true; panics naming `what` after `within` (tokio time, so
/// a paused clock advances through the polls).
pub async fn eventually_within(what: &str, within: Duration, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(TICK).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn returns_once_the_condition_holds() {
        let mut polls = 0;
        eventually("the third poll", || {
            polls += 1;
            polls == 3
        })
        .await;
        assert_eq!(polls, 3);
    }

    #[tokio::test]
    #[should_panic(expected = "timed out waiting for: never")]
    async fn fails_after_the_deadline() {
        eventually_within("never", Duration::from_millis(50), || false).await;
    }
}
