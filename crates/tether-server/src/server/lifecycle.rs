//! `Lifecycle`: the cancellation tree and the task tracker of one run of the server.

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The cancellation tree and the tracker of one run.
pub(crate) struct Lifecycle {
    /// Cancelled when shutdown starts: stop accepting, GOAWAY.
    pub(crate) shutdown: CancellationToken,
    /// Cancelled when the drain deadline has passed: close every session and splice.
    pub(crate) hard_stop: CancellationToken,
    /// Cancelled last: the admin listener stays up while draining.
    pub(crate) admin_stop: CancellationToken,
    /// Owns every task of the run.
    pub(crate) tracker: TaskTracker,
}

impl Lifecycle {
    pub(crate) fn new(shutdown: CancellationToken) -> Self {
        Self {
            shutdown,
            hard_stop: CancellationToken::new(),
            admin_stop: CancellationToken::new(),
            tracker: TaskTracker::new(),
        }
    }
}
