//! The session registry: agent id -> live sessions. Registration returns a guard whose drop
//! deregisters; a reconnect of the same agent instance replaces (and closes) the stale session.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use tether_mux::Session;
use tether_proto::GoAwayCode;
use tokio::time::Instant;

use crate::metrics::ServerMetrics;

/// Longest agent instance id kept from `X-Tether-Instance`.
pub const MAX_INSTANCE_LEN: usize = 64;

/// No live session for a client: an ordinary state, reported to the consumer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no agent connected for client \"{client}\"")]
pub struct NoSession {
    /// The agent id that was asked for.
    pub client: String,
}

/// One registered session.
#[derive(Debug, Clone)]
pub struct SessionEntry {
    /// The session handle.
    pub session: Session,
    /// Unique per server process, increasing.
    pub session_id: u64,
    /// The agent process instance (`X-Tether-Instance`, sanitized); may be empty.
    pub instance: String,
    /// When the session was registered.
    pub connected_at: Instant,
    /// The agent's address as seen by the server.
    pub peer_addr: SocketAddr,
}

/// A change of the registry. Counted in `tether_session_events_total{event}`; a later
/// subscription API will hand these to listeners (the health checker).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEvent {
    /// A session was registered.
    Added {
        /// Agent id.
        client: String,
        /// Session id.
        session_id: u64,
    },
    /// A session ended and was deregistered.
    Removed {
        /// Agent id.
        client: String,
        /// Session id.
        session_id: u64,
    },
    /// A newer session of the same agent instance replaced this one, which was closed.
    StaleRemoved {
        /// Agent id.
        client: String,
        /// Session id of the replaced session.
        session_id: u64,
    },
}

impl SessionEvent {
    /// The `event` label.
    pub fn label(&self) -> &'static str {
        match self {
            SessionEvent::Added { .. } => "added",
            SessionEvent::Removed { .. } => "removed",
            SessionEvent::StaleRemoved { .. } => "stale_removed",
        }
    }
}

/// A client and its sessions, for listings (`GET /v1/clients`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientSnapshot {
    /// Agent id.
    pub client: String,
    /// Live sessions, oldest first; empty when the agent is known but not connected.
    pub sessions: Vec<SessionSnapshot>,
}

/// One session, for listings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionSnapshot {
    /// Session id.
    pub session_id: u64,
    /// Agent instance id (may be empty).
    pub instance: String,
    /// Agent address as seen by the server.
    pub peer_addr: String,
    /// Seconds since the session was registered.
    pub connected_seconds: f64,
    /// Streams open on the session.
    pub streams: usize,
    /// Payload bytes received from the agent.
    pub bytes_rx: u64,
    /// Payload bytes sent to the agent.
    pub bytes_tx: u64,
    /// Last measured round-trip time, seconds.
    pub rtt_seconds: Option<f64>,
}

/// Agent id -> live sessions. Synchronous: the lock is never held across an `.await`, nor
/// while closing a session.
#[derive(Debug)]
pub struct SessionRegistry {
    clients: Mutex<BTreeMap<String, Vec<SessionEntry>>>,
    next_id: AtomicU64,
    metrics: ServerMetrics,
}

impl SessionRegistry {
    /// An empty registry reporting into `metrics`.
    pub fn new(metrics: ServerMetrics) -> Self {
        Self {
            clients: Mutex::new(BTreeMap::new()),
            next_id: AtomicU64::new(1),
            metrics,
        }
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Vec<SessionEntry>>> {
        // The map stays consistent at every step, so a panic elsewhere does not poison it.
        self.clients.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes `client` appear in listings and metrics even before it connects (configured
    /// forwards name their clients).
    pub fn declare_client(&self, client: &str) {
        let mut clients = self.lock();
        if !clients.contains_key(client) {
            clients.insert(client.to_owned(), Vec::new());
            self.metrics.sessions.with_label_values(&[client]).set(0);
        }
    }

    /// Registers `session` of agent `client`. If a session of the same client and the same
    /// non-empty `instance` exists, it is removed, sent GOAWAY(Replaced) and closed.
    /// Dropping the returned guard deregisters the session.
    pub fn insert(
        self: &Arc<Self>,
        client: &str,
        instance: &str,
        peer_addr: SocketAddr,
        session: Session,
    ) -> SessionGuard {
        let session_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let entry = SessionEntry {
            session,
            session_id,
            instance: instance.to_owned(),
            connected_at: Instant::now(),
            peer_addr,
        };
        let stale: Vec<SessionEntry> = {
            let mut clients = self.lock();
            let sessions = clients.entry(client.to_owned()).or_default();
            let stale = if instance.is_empty() {
                Vec::new()
            } else {
                let (stale, keep) = std::mem::take(sessions)
                    .into_iter()
                    .partition(|e| e.instance == instance);
                *sessions = keep;
                stale
            };
            sessions.push(entry);
            self.update_gauges(&clients, client);
            stale
        };
        self.publish(SessionEvent::Added {
            client: client.to_owned(),
            session_id,
        });
        for old in stale {
            tracing::info!(
                agent.id = %client,
                session.id = old.session_id,
                replaced_by = session_id,
                instance = %instance,
                "session replaced by a reconnect of the same agent instance"
            );
            old.session
                .goaway(GoAwayCode::Replaced, "replaced by a newer session");
            old.session.close();
            self.publish(SessionEvent::StaleRemoved {
                client: client.to_owned(),
                session_id: old.session_id,
            });
        }
        SessionGuard {
            registry: self.clone(),
            client: client.to_owned(),
            session_id,
        }
    }

    fn remove(&self, client: &str, session_id: u64) {
        let removed = {
            let mut clients = self.lock();
            let Some(sessions) = clients.get_mut(client) else {
                return;
            };
            let before = sessions.len();
            sessions.retain(|e| e.session_id != session_id);
            let removed = sessions.len() != before;
            if removed {
                self.update_gauges(&clients, client);
            }
            removed
        };
        if removed {
            self.publish(SessionEvent::Removed {
                client: client.to_owned(),
                session_id,
            });
        }
    }

    fn update_gauges(&self, clients: &BTreeMap<String, Vec<SessionEntry>>, client: &str) {
        let count = clients.get(client).map_or(0, Vec::len);
        self.metrics
            .sessions
            .with_label_values(&[client])
            .set(i64::try_from(count).unwrap_or(i64::MAX));
        let connected = clients.values().filter(|s| !s.is_empty()).count();
        self.metrics
            .agents_connected
            .set(i64::try_from(connected).unwrap_or(i64::MAX));
    }

    fn publish(&self, event: SessionEvent) {
        self.metrics
            .session_events
            .with_label_values(&[event.label()])
            .inc();
    }

    /// The newest session of `client` that is open and not draining.
    pub fn pick(&self, client: &str) -> Result<Session, NoSession> {
        self.pick_entry(client).map(|e| e.session)
    }

    /// [`pick`](Self::pick), with the registration details.
    pub fn pick_entry(&self, client: &str) -> Result<SessionEntry, NoSession> {
        let clients = self.lock();
        clients
            .get(client)
            .and_then(|sessions| {
                sessions
                    .iter()
                    .rev()
                    .find(|e| !e.session.is_closed() && e.session.peer_goaway().is_none())
            })
            .cloned()
            .ok_or_else(|| NoSession {
                client: client.to_owned(),
            })
    }

    /// Registered sessions of `client`, oldest first.
    pub fn sessions(&self, client: &str) -> Vec<SessionEntry> {
        self.lock().get(client).cloned().unwrap_or_default()
    }

    /// Every registered session.
    pub fn all_sessions(&self) -> Vec<SessionEntry> {
        self.lock().values().flatten().cloned().collect()
    }

    /// How many sessions are registered.
    pub fn session_count(&self) -> usize {
        self.lock().values().map(Vec::len).sum()
    }

    /// Known clients and their sessions, sorted by agent id.
    pub fn snapshot(&self) -> Vec<ClientSnapshot> {
        // Copy the handles out first: session stats take the session's own lock.
        let clients: Vec<(String, Vec<SessionEntry>)> = self
            .lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        clients
            .into_iter()
            .map(|(client, sessions)| ClientSnapshot {
                client,
                sessions: sessions.iter().map(snapshot_session).collect(),
            })
            .collect()
    }

    /// Sends GOAWAY with `code` to every registered session.
    pub fn goaway_all(&self, code: GoAwayCode, message: &str) {
        for entry in self.all_sessions() {
            entry.session.goaway(code, message);
        }
    }

    /// Closes every registered session (they deregister when their tasks end).
    pub fn close_all(&self) {
        for entry in self.all_sessions() {
            entry.session.close();
        }
    }

    /// Streams open on all registered sessions.
    pub fn active_streams(&self) -> usize {
        self.all_sessions()
            .iter()
            .map(|e| e.session.stats().streams)
            .sum()
    }
}

fn snapshot_session(entry: &SessionEntry) -> SessionSnapshot {
    let stats = entry.session.stats();
    SessionSnapshot {
        session_id: entry.session_id,
        instance: entry.instance.clone(),
        peer_addr: entry.peer_addr.to_string(),
        connected_seconds: entry.connected_at.elapsed().as_secs_f64(),
        streams: stats.streams,
        bytes_rx: stats.bytes_rx,
        bytes_tx: stats.bytes_tx,
        rtt_seconds: stats.rtt.map(|d| d.as_secs_f64()),
    }
}

/// Deregisters its session when dropped, so every exit path of a connection cleans up.
#[derive(Debug)]
#[must_use = "dropping the guard deregisters the session at once"]
pub struct SessionGuard {
    registry: Arc<SessionRegistry>,
    client: String,
    session_id: u64,
}

impl SessionGuard {
    /// The id given to the session.
    pub fn session_id(&self) -> u64 {
        self.session_id
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.registry.remove(&self.client, self.session_id);
    }
}

/// Keeps at most [`MAX_INSTANCE_LEN`] characters of `[A-Za-z0-9-]` from a peer-supplied
/// instance id; everything else is dropped.
pub fn sanitize_instance(raw: &str) -> String {
    raw.chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .take(MAX_INSTANCE_LEN)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_ids_are_sanitized() {
        assert_eq!(sanitize_instance("abc-123"), "abc-123");
        assert_eq!(sanitize_instance("a b\n<c>/é"), "abc");
        assert_eq!(sanitize_instance(&"x".repeat(200)).len(), MAX_INSTANCE_LEN);
        assert_eq!(sanitize_instance(""), "");
    }

    #[test]
    fn no_session_message() {
        let err = NoSession { client: "x".into() };
        assert_eq!(err.to_string(), "no agent connected for client \"x\"");
    }
}
