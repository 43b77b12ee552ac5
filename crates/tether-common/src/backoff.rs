//! Capped exponential backoff with jitter, for the agent's reconnect loop.
//!
//! The ceiling doubles on every attempt (`min`, `2·min`, `4·min`, ... up to `max`) and each delay
//! is drawn uniformly from `[min, ceiling]`, so that a fleet of agents that lost the same server
//! does not come back in lockstep, while no agent retries faster than `min`.

use std::time::Duration;

/// Growth base when `min` is zero, so that the ceiling still grows towards `max`.
const ZERO_MIN_BASE: Duration = Duration::from_millis(1);

/// Reconnect delays: capped exponential growth (factor 2) with jitter in `[min, ceiling]`.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
    rng: fastrand::Rng,
}

impl Backoff {
    /// A backoff whose delays lie in `[min, max]`. If `max < min`, `max` is raised to `min`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max: max.max(min),
            attempt: 0,
            rng: fastrand::Rng::new(),
        }
    }

    /// The same backoff with a seeded random generator, for reproducible tests.
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.rng = fastrand::Rng::with_seed(seed);
        self
    }

    /// The delay to wait before the next attempt; counts the attempt.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let spread = ceiling.saturating_sub(self.min);
        let spread_nanos = u64::try_from(spread.as_nanos()).unwrap_or(u64::MAX);
        self.min + Duration::from_nanos(self.rng.u64(0..=spread_nanos))
    }

    /// The current upper bound of the next delay: `min · 2^attempt`, capped at `max`.
    pub fn ceiling(&self) -> Duration {
        let base = if self.min.is_zero() {
            ZERO_MIN_BASE
        } else {
            self.min
        };
        1u32.checked_shl(self.attempt)
            .and_then(|factor| base.checked_mul(factor))
            .map_or(self.max, |c| c.clamp(self.min, self.max))
    }

    /// How many delays were handed out since creation or the last [`reset`](Self::reset).
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Starts over from `min` (after a session that lived long enough).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// The lower bound of every delay.
    pub fn min(&self) -> Duration {
        self.min
    }

    /// The upper bound of every delay.
    pub fn max(&self) -> Duration {
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    const MIN: Duration = Duration::from_millis(500);
    const MAX: Duration = Duration::from_secs(60);

    #[test]
    fn delays_stay_within_the_growing_ceiling() {
        let mut b = Backoff::new(MIN, MAX);
        for attempt in 0..40u32 {
            let expected_ceiling = MIN
                .checked_mul(1u32.checked_shl(attempt).unwrap_or(u32::MAX))
                .map_or(MAX, |c| c.min(MAX));
            assert_eq!(b.ceiling(), expected_ceiling, "attempt {attempt}");
            assert_eq!(b.attempt(), attempt);
            let d = b.next_delay();
            assert!(
                d >= MIN && d <= expected_ceiling,
                "attempt {attempt}: {d:?}"
            );
        }
        assert_eq!(b.attempt(), 40);
        assert_eq!(b.ceiling(), MAX);
    }

    #[test]
    fn first_delay_is_min_and_ceiling_caps() {
        let mut b = Backoff::new(MIN, MAX);
        assert_eq!(b.next_delay(), MIN);
        assert_eq!(b.ceiling(), 2 * MIN);
        for _ in 0..7 {
            b.next_delay();
        }
        // 500ms · 2^8 = 128s > 60s.
        assert_eq!(b.ceiling(), MAX);
        for _ in 0..1000 {
            assert!(b.next_delay() <= MAX);
        }
        // The attempt counter never overflows.
        b.attempt = u32::MAX;
        assert!(b.next_delay() <= MAX);
        assert_eq!(b.attempt(), u32::MAX);
    }

    #[test]
    fn delays_grow_on_average() {
        let mut b = Backoff::new(MIN, MAX).with_seed(7);
        let mut means = Vec::new();
        for n in 0..6 {
            let total: Duration = (0..200)
                .map(|_| {
                    b.attempt = n;
                    b.next_delay()
                })
                .sum();
            means.push(total / 200);
        }
        // Expected means: 0.5, 0.75, 1.25, 2.25, 4.25, 8.25 s.
        for pair in means.windows(2) {
            assert!(pair[1] > pair[0], "{means:?}");
        }
    }

    #[test]
    fn jitter_varies() {
        let mut b = Backoff::new(MIN, MAX);
        for _ in 0..10 {
            b.next_delay();
        }
        let distinct: HashSet<Duration> = (0..50).map(|_| b.next_delay()).collect();
        assert!(distinct.len() > 40, "{distinct:?}");
        let lowest = distinct.iter().min().unwrap();
        let highest = distinct.iter().max().unwrap();
        assert!(
            *highest - *lowest > Duration::from_secs(20),
            "{lowest:?}..{highest:?}"
        );
    }

    #[test]
    fn seeded_backoffs_repeat() {
        let mut a = Backoff::new(MIN, MAX).with_seed(42);
        let mut b = Backoff::new(MIN, MAX).with_seed(42);
        for _ in 0..20 {
            assert_eq!(a.next_delay(), b.next_delay());
        }
    }

    #[test]
    fn reset_starts_over() {
        let mut b = Backoff::new(MIN, MAX);
        for _ in 0..10 {
            b.next_delay();
        }
        b.reset();
        assert_eq!(b.attempt(), 0);
        assert_eq!(b.ceiling(), MIN);
        assert_eq!(b.next_delay(), MIN);
        assert_eq!(b.attempt(), 1);
    }

    #[test]
    fn degenerate_bounds() {
        let mut b = Backoff::new(Duration::from_secs(5), Duration::from_secs(1));
        assert_eq!(b.max(), Duration::from_secs(5));
        for _ in 0..5 {
            assert_eq!(b.next_delay(), Duration::from_secs(5));
        }
        let mut z = Backoff::new(Duration::ZERO, Duration::from_secs(1));
        for _ in 0..20 {
            z.next_delay();
        }
        assert_eq!(z.ceiling(), Duration::from_secs(1));
        assert!(z.next_delay() <= Duration::from_secs(1));
    }
}
