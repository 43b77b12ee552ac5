//! `ConsumerContext`: what every consumer listener (forwards, the HTTP CONNECT and SOCKS5
//! proxies) shares, built once by the server.

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::consumers::audit::AuditLog;
use crate::consumers::dial::AgentDialer;

/// The dialer, the audit log and the lifecycle every consumer connection runs under. Cheap to
/// clone.
#[derive(Debug, Clone)]
pub(crate) struct ConsumerContext {
    /// How connections dial (registry, metrics, timeout, relay).
    pub(crate) dialer: AgentDialer,
    /// Where each connection's audit line goes (a no-op when `audit_log` is off).
    pub(crate) audit: AuditLog,
    /// Cancelled when shutdown starts: stop accepting.
    pub(crate) shutdown: CancellationToken,
    /// Cancelled when the drain deadline has passed: abort handshakes and pipes still running.
    pub(crate) hard_stop: CancellationToken,
    /// Owns every connection task.
    pub(crate) tracker: TaskTracker,
}
