//! Optional remotedialer-compatible counters (`session_server_total_*`), so that Rancher
//! dashboards built on remotedialer keep working; enabled by `metrics.remotedialer_compat`.
//!
//! Names and meaning follow remotedialer, except that `add/remove_connections` have no `addr`
//! label (one series per target address is unbounded) and `peer` is always `"false"` (tether
//! servers do not peer).

use prometheus::{IntCounterVec, Opts, Registry};

/// The `proto` label of connections: every tether stream is TCP.
const PROTO_TCP: &str = "tcp";
/// The `peer` label of sessions: sessions always come from agents, never from peer servers.
const NOT_PEER: &str = "false";

/// The compat counters. Cheap to clone; clones share the series.
#[derive(Debug, Clone)]
pub struct RemotedialerMetrics {
    /// `session_server_total_add_websocket_session{clientkey,peer}`.
    pub add_session: IntCounterVec,
    /// `session_server_total_remove_websocket_session{clientkey,peer}`.
    pub remove_session: IntCounterVec,
    /// `session_server_total_add_connections{clientkey,proto}`.
    pub add_connection: IntCounterVec,
    /// `session_server_total_remove_connections{clientkey,proto}`.
    pub remove_connection: IntCounterVec,
}

impl RemotedialerMetrics {
    /// Creates the counters and registers them in `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let counter = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(Opts::new(name, help).subsystem("session_server"), labels)
        };
        let metrics = Self {
            add_session: counter(
                "total_add_websocket_session",
                "Agent sessions added (remotedialer-compatible).",
                &["clientkey", "peer"],
            )?,
            remove_session: counter(
                "total_remove_websocket_session",
                "Agent sessions removed (remotedialer-compatible).",
                &["clientkey", "peer"],
            )?,
            add_connection: counter(
                "total_add_connections",
                "Tunnelled connections created (remotedialer-compatible, without addr).",
                &["clientkey", "proto"],
            )?,
            remove_connection: counter(
                "total_remove_connections",
                "Tunnelled connections removed, once each (remotedialer-compatible, without \
                 addr).",
                &["clientkey", "proto"],
            )?,
        };
        registry.register(Box::new(metrics.add_session.clone()))?;
        registry.register(Box::new(metrics.remove_session.clone()))?;
        registry.register(Box::new(metrics.add_connection.clone()))?;
        registry.register(Box::new(metrics.remove_connection.clone()))?;
        Ok(metrics)
    }

    /// Counts a session of `client` added.
    pub fn session_added(&self, client: &str) {
        self.add_session
            .with_label_values(&[client, NOT_PEER])
            .inc();
    }

    /// Counts a session of `client` removed.
    pub fn session_removed(&self, client: &str) {
        self.remove_session
            .with_label_values(&[client, NOT_PEER])
            .inc();
    }

    /// Counts a connection through `client` created; the returned guard counts its removal
    /// when dropped, so every exit path is counted exactly once.
    pub fn connection(&self, client: &str) -> ConnectionGuard {
        self.add_connection
            .with_label_values(&[client, PROTO_TCP])
            .inc();
        ConnectionGuard {
            remove: self
                .remove_connection
                .with_label_values(&[client, PROTO_TCP]),
        }
    }
}

/// Counts `session_server_total_remove_connections` once, when dropped.
#[derive(Debug)]
#[must_use = "dropping the guard counts the connection as removed at once"]
pub struct ConnectionGuard {
    remove: prometheus::IntCounter,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.remove.inc();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn names_match_remotedialer_and_pairs_balance() {
        let registry = Registry::new();
        let metrics = RemotedialerMetrics::register(&registry).unwrap();
        let guard = metrics.connection("edge-1");
        metrics.session_added("edge-1");
        metrics.session_removed("edge-1");
        let mut names: Vec<String> = registry
            .gather()
            .iter()
            .map(|f| f.name().to_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "session_server_total_add_connections",
                "session_server_total_add_websocket_session",
                "session_server_total_remove_connections",
                "session_server_total_remove_websocket_session",
            ]
        );
        let add = metrics.add_connection.with_label_values(&["edge-1", "tcp"]);
        let remove = metrics
            .remove_connection
            .with_label_values(&["edge-1", "tcp"]);
        assert_eq!((add.get(), remove.get()), (1, 0));
        drop(guard);
        assert_eq!((add.get(), remove.get()), (1, 1));
    }
}
