//! The end of [`Server::run`]: GOAWAY to every agent, drain the streams up to
//! `drain_timeout`, close the sessions, then wait (bounded) for the tasks and the audit log.

use std::time::Duration;

use tether_proto::GoAwayCode;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::agents::registry::SessionRegistry;
use crate::server::Server;
use crate::server::lifecycle::Lifecycle;

/// How long the tasks get to finish once the sessions are closed.
const TASK_GRACE: Duration = Duration::from_secs(5);
/// How often the drain checks whether streams are left.
const DRAIN_POLL: Duration = Duration::from_millis(50);

impl Server {
    /// Shuts down in order once `life.shutdown` is cancelled (listeners stop accepting on
    /// their own): GOAWAY, drain, hard stop, close, wait for the tasks.
    pub(crate) async fn drain(&self, life: Lifecycle) {
        let drain = self.config.drain_timeout.0;
        info!(
            sessions = self.registry.session_count(),
            drain_timeout = ?drain,
            "shutting down: GOAWAY to agents, draining streams"
        );
        // `restart`: this replica goes away, the fleet does not; agents keep their sessions to
        // the other replicas and come back here when it is up again.
        self.registry
            .goaway_all(GoAwayCode::Restart, "server shutting down");
        let left = drain_streams(&self.registry, drain).await;
        if left > 0 {
            warn!(
                streams = left,
                "drain timeout passed; resetting the streams left"
            );
        }
        life.hard_stop.cancel();
        self.registry.close_all();
        life.admin_stop.cancel();
        life.tracker.close();
        if tokio::time::timeout(TASK_GRACE, life.tracker.wait())
            .await
            .is_err()
        {
            warn!(
                tasks = life.tracker.len(),
                "tasks still running after the shutdown grace period; abandoning them"
            );
        }
        // The connections' last audit lines are queued by now; let the writer catch up.
        self.audit.flush(TASK_GRACE).await;
    }
}

/// Waits until no stream is open or `limit` has passed; returns the streams left.
async fn drain_streams(registry: &SessionRegistry, limit: Duration) -> usize {
    let deadline = Instant::now() + limit;
    loop {
        let left = registry.active_streams();
        if left == 0 || Instant::now() >= deadline {
            return left;
        }
        tokio::time::sleep_until(deadline.min(Instant::now() + DRAIN_POLL)).await;
    }
}
