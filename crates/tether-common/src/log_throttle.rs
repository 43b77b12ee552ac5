//! `LogThrottle`: lets a repeated failure be logged once per time window per reason, with a
//! count of what was suppressed, instead of once per attempt.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Per-reason rate limit for log lines. Reasons are a closed set of `&'static str`.
#[derive(Debug)]
pub struct LogThrottle {
    window: Duration,
    state: Mutex<HashMap<&'static str, Slot>>,
}

#[derive(Debug)]
struct Slot {
    last_logged: Instant,
    suppressed: u64,
}

impl LogThrottle {
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            state: Mutex::new(HashMap::new()),
        }
    }

    /// `Some(suppressed)` if a line for `reason` should be logged now (`suppressed` lines were
    /// skipped since the last one); `None` if this occurrence should go to debug only.
    pub fn check(&self, reason: &'static str) -> Option<u64> {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match state.get_mut(reason) {
            Some(slot) if now.duration_since(slot.last_logged) < self.window => {
                slot.suppressed += 1;
                None
            }
            Some(slot) => {
                let suppressed = std::mem::take(&mut slot.suppressed);
                slot.last_logged = now;
                Some(suppressed)
            }
            None => {
                state.insert(
                    reason,
                    Slot {
                        last_logged: now,
                        suppressed: 0,
                    },
                );
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn logs_once_per_window_with_a_count() {
        let t = LogThrottle::new(Duration::from_secs(60));
        assert_eq!(t.check("a"), Some(0));
        assert_eq!(t.check("a"), None);
        assert_eq!(t.check("a"), None);
        assert_eq!(t.check("b"), Some(0));
        tokio::time::advance(Duration::from_secs(61)).await;
        assert_eq!(t.check("a"), Some(2));
        assert_eq!(t.check("a"), None);
    }
}
