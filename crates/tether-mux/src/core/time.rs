//! The core's notion of time: a span since an epoch the shell owns. The core never reads a
//! clock; every method that needs the time takes it as an argument.

use std::ops::Add;
use std::time::Duration;

/// A point in time, as the time elapsed since the shell's epoch (its session start).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Time(Duration);

impl Time {
    /// The epoch itself.
    pub(crate) const ZERO: Time = Time(Duration::ZERO);

    /// The point `elapsed` after the epoch.
    pub(crate) fn from_epoch(elapsed: Duration) -> Self {
        Self(elapsed)
    }

    /// The time elapsed since the epoch.
    pub(crate) fn since_epoch(self) -> Duration {
        self.0
    }

    /// The time from `earlier` to `self`, zero if `earlier` is later.
    pub(crate) fn since(self, earlier: Time) -> Duration {
        self.0.saturating_sub(earlier.0)
    }
}

impl Add<Duration> for Time {
    type Output = Time;

    fn add(self, rhs: Duration) -> Time {
        Time(self.0.saturating_add(rhs))
    }
}
