//! The session registry: agent id -> live sessions, with event subscriptions. Registration
//! returns a guard whose drop deregisters; a reconnect of the same agent instance replaces (and
//! closes) the stale session.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use tether_mux::Session;
use tether_proto::GoAwayCode;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::agents::registry_metrics::RegistryMetrics;
use crate::rfc3339::rfc3339;

/// Longest agent instance id kept from `X-Tether-Instance`.
pub const MAX_INSTANCE_LEN: usize = 64;

/// Events a subscriber may have queued before it is declared lagging (see [`Subscriber`]).
pub const DEFAULT_SUBSCRIBER_CAPACITY: usize = 1024;

/// No live session for a client: an ordinary state, reported to the consumer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no agent connected for client \"{client}\"{}", on_replica(replica))]
pub struct NoSession {
    /// The agent id that was asked for.
    pub client: String,
    /// The replica (`server_id`) that has no session of it; empty when not known.
    pub replica: String,
}

fn on_replica(replica: &str) -> String {
    if replica.is_empty() {
        String::new()
    } else {
        format!(" on replica \"{replica}\"")
    }
}

/// What an agent's upgrade says about its session, for [`SessionRegistry::insert_labelled`].
#[derive(Debug, Clone, Default)]
pub struct SessionMeta {
    /// `X-Tether-Instance`, sanitized (may be empty).
    pub instance: String,
    /// `X-Tether-Endpoint`, sanitized (may be empty).
    pub endpoint: String,
    /// The wire protocol.
    pub protocol: Protocol,
    /// `X-Tether-Labels`, parsed.
    pub labels: BTreeMap<String, String>,
    /// The certificate chain the agent presented, for [`SessionRegistry::revoke`]; `None` for
    /// certless (token) sessions.
    pub peer_chain: Option<PeerChain>,
}

/// The wire protocol of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Protocol {
    /// The native protocol.
    #[default]
    Tether,
    /// A rancher/remotedialer client.
    Remotedialer,
}

impl Protocol {
    /// Every protocol, for metric labels.
    pub const ALL: [Protocol; 2] = [Protocol::Tether, Protocol::Remotedialer];

    /// The name used in listings and metric labels.
    pub fn label(self) -> &'static str {
        match self {
            Protocol::Tether => "tether.v1",
            Protocol::Remotedialer => "remotedialer",
        }
    }
}

/// One registered session.
#[derive(Debug, Clone)]
pub struct SessionEntry {
    /// The agent id.
    pub client: String,
    /// The session handle.
    pub session: Session,
    /// Unique per server process, increasing.
    pub session_id: u64,
    /// The agent process instance (`X-Tether-Instance`, sanitized); may be empty.
    pub instance: String,
    /// Which of the instance's endpoints (server URL and address) the session came through
    /// (`X-Tether-Endpoint`, sanitized); may be empty. A reconnect replaces an older session
    /// of the same instance and endpoint only: an agent reaching this replica through two
    /// addresses keeps (and itself closes) the second session without losing the first.
    pub endpoint: String,
    /// When the session was registered (monotonic).
    pub connected_at: Instant,
    /// When the session was registered (wall clock, for listings).
    pub connected_wall: SystemTime,
    /// The agent's address as seen by the server.
    pub peer_addr: SocketAddr,
    /// What the health checker last found; shared by every clone of the entry.
    pub health: Arc<SessionHealth>,
    /// The session's wire protocol.
    pub protocol: Protocol,
    /// The agent's labels (`X-Tether-Labels`, sanitized; informational only).
    pub labels: BTreeMap<String, String>,
    /// The certificate chain the agent presented (end entity first), kept to verify it again
    /// after a reload of the CA bundle or CRLs; `None` for certless (token) sessions.
    pub peer_chain: Option<PeerChain>,
}

/// A peer's certificate chain, end entity first.
pub type PeerChain = Arc<[CertificateDer<'static>]>;

/// Why a live session is closed by [`SessionRegistry::revoke`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revocation {
    /// A closed-set label (`revoked`, `unknown_issuer`, `expired`, `bad_certificate`,
    /// `not_allowed`).
    pub reason: &'static str,
    /// The detail sent in the GOAWAY and logged.
    pub detail: String,
}

/// Health of one session as the health checker sees it. A session nobody has probed yet is
/// healthy.
#[derive(Debug)]
pub struct SessionHealth {
    unhealthy: AtomicBool,
    /// Last probe round-trip time in microseconds; `u64::MAX` while none was measured.
    rtt_micros: AtomicU64,
}

impl Default for SessionHealth {
    fn default() -> Self {
        Self {
            unhealthy: AtomicBool::new(false),
            rtt_micros: AtomicU64::new(u64::MAX),
        }
    }
}

impl SessionHealth {
    /// Whether the session answers its health probes (true until probes say otherwise).
    pub fn is_healthy(&self) -> bool {
        !self.unhealthy.load(Ordering::Acquire)
    }

    /// Sets the health; returns the previous value.
    pub fn set_healthy(&self, healthy: bool) -> bool {
        !self.unhealthy.swap(!healthy, Ordering::AcqRel)
    }

    /// The round-trip time of the last answered probe.
    pub fn rtt(&self) -> Option<Duration> {
        match self.rtt_micros.load(Ordering::Acquire) {
            u64::MAX => None,
            micros => Some(Duration::from_micros(micros)),
        }
    }

    /// Records the round-trip time of an answered probe.
    pub fn record_rtt(&self, rtt: Duration) {
        let micros = u64::try_from(rtt.as_micros())
            .unwrap_or(u64::MAX - 1)
            .min(u64::MAX - 1);
        self.rtt_micros.store(micros, Ordering::Release);
    }
}

/// A change of the registry, as delivered to subscribers. Counted in
/// `tether_session_events_total{event}` (`added`, `removed`, `stale_removed`, `revoked`).
#[derive(Debug, Clone)]
pub enum SessionEvent {
    /// A session was registered.
    SessionAdded(SessionEntry),
    /// A session ended and was deregistered.
    SessionRemoved {
        /// Agent id.
        client: String,
        /// Session id.
        session_id: u64,
    },
    /// A newer session of the same agent instance replaced this one, which was deregistered
    /// and closed.
    StaleSessionRemoved {
        /// Agent id.
        client: String,
        /// Session id of the replaced session.
        session_id: u64,
        /// Session id of the session that replaced it.
        replaced_by: u64,
    },
    /// The session's certificate no longer verifies or its id is no longer allowed (after a
    /// reload); it was deregistered, sent GOAWAY(revoked) and closed.
    SessionRevoked {
        /// Agent id.
        client: String,
        /// Session id.
        session_id: u64,
        /// The [`Revocation::reason`] label.
        reason: &'static str,
    },
}

impl SessionEvent {
    /// The `event` label.
    pub fn label(&self) -> &'static str {
        match self {
            SessionEvent::SessionAdded(_) => "added",
            SessionEvent::SessionRemoved { .. } => "removed",
            SessionEvent::StaleSessionRemoved { .. } => "stale_removed",
            SessionEvent::SessionRevoked { .. } => "revoked",
        }
    }

    /// The agent id the event is about.
    pub fn client(&self) -> &str {
        match self {
            SessionEvent::SessionAdded(entry) => &entry.client,
            SessionEvent::SessionRemoved { client, .. }
            | SessionEvent::StaleSessionRemoved { client, .. }
            | SessionEvent::SessionRevoked { client, .. } => client,
        }
    }

    /// The session the event is about.
    pub fn session_id(&self) -> u64 {
        match self {
            SessionEvent::SessionAdded(entry) => entry.session_id,
            SessionEvent::SessionRemoved { session_id, .. }
            | SessionEvent::StaleSessionRemoved { session_id, .. }
            | SessionEvent::SessionRevoked { session_id, .. } => *session_id,
        }
    }
}

/// What [`Subscriber::recv`] hands out.
#[derive(Debug, Clone)]
pub enum RegistryNotice {
    /// The next change, in registry order.
    Event(SessionEvent),
    /// The subscriber fell behind: its queue overflowed and the queued events were dropped.
    /// `snapshot` is every registered session at one instant; the events that follow are
    /// exactly the changes after that instant. Replace all state with the snapshot.
    Lagged {
        /// Events dropped since the previous notice.
        missed: u64,
        /// Every registered session, oldest first per client, clients sorted.
        snapshot: Vec<SessionEntry>,
    },
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
    /// When the session was registered, RFC 3339 UTC (`2026-01-02T03:04:05Z`).
    pub connected_since: String,
    /// Seconds since the session was registered.
    pub connected_seconds: f64,
    /// Last measured round-trip time, seconds (health probe, else the keepalive ping).
    pub rtt_seconds: Option<f64>,
    /// Whether the session answers health probes (dials prefer healthy sessions).
    pub healthy: bool,
    /// Streams open on the session.
    pub streams: usize,
    /// Payload bytes received from the agent.
    pub bytes_rx: u64,
    /// Payload bytes sent to the agent.
    pub bytes_tx: u64,
    /// Wire protocol: `tether.v1` or `remotedialer` (absent in listings of older servers).
    #[serde(default)]
    pub protocol: String,
    /// The agent's labels (`X-Tether-Labels`); informational, identity is the certificate's.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// What the registry lock protects: the sessions and the subscribers that must see every
/// change to them in the same order.
#[derive(Debug, Default)]
struct Inner {
    clients: BTreeMap<String, Vec<SessionEntry>>,
    subscribers: Vec<Arc<SubscriberQueue>>,
}

impl Inner {
    fn all_sessions(&self) -> Vec<SessionEntry> {
        self.clients.values().flatten().cloned().collect()
    }
}

/// Agent id -> live sessions. Synchronous: the lock is never held across an `.await`, nor
/// while closing a session. Publishing to subscribers happens under the lock (so that events
/// and snapshots are consistent) and never waits: a full subscriber queue is dropped and the
/// subscriber is marked lagging instead.
#[derive(Debug)]
pub struct SessionRegistry {
    inner: Mutex<Inner>,
    next_id: AtomicU64,
    metrics: RegistryMetrics,
    replica: String,
    history: Arc<crate::agents::client_history::ClientHistory>,
}

impl SessionRegistry {
    /// An empty registry reporting into `metrics`.
    pub fn new(metrics: RegistryMetrics) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            next_id: AtomicU64::new(1),
            metrics,
            replica: String::new(),
            history: Arc::default(),
        }
    }

    /// Names this replica (`server_id`) in [`NoSession`] errors.
    pub fn with_replica(mut self, server_id: &str) -> Self {
        self.replica = server_id.to_owned();
        self
    }

    /// Per client id, the last refused attempt and the last session end.
    pub fn history(&self) -> &Arc<crate::agents::client_history::ClientHistory> {
        &self.history
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The map stays consistent at every step, so a panic elsewhere does not poison it.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes `client` appear in listings and metrics even before it connects (configured
    /// forwards name their clients).
    pub fn declare_client(&self, client: &str) {
        let mut inner = self.lock();
        if !inner.clients.contains_key(client) {
            inner.clients.insert(client.to_owned(), Vec::new());
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
        self.insert_with_protocol(client, instance, "", peer_addr, session, Protocol::Tether)
    }

    /// [`insert`](Self::insert) for a session of the given wire `protocol`.
    pub fn insert_with_protocol(
        self: &Arc<Self>,
        client: &str,
        instance: &str,
        endpoint: &str,
        peer_addr: SocketAddr,
        session: Session,
        protocol: Protocol,
    ) -> SessionGuard {
        self.insert_labelled(
            client,
            peer_addr,
            session,
            SessionMeta {
                instance: instance.to_owned(),
                endpoint: endpoint.to_owned(),
                protocol,
                labels: BTreeMap::new(),
                peer_chain: None,
            },
        )
    }

    /// [`insert`](Self::insert) with everything the agent's upgrade said about the session.
    pub fn insert_labelled(
        self: &Arc<Self>,
        client: &str,
        peer_addr: SocketAddr,
        session: Session,
        meta: SessionMeta,
    ) -> SessionGuard {
        let SessionMeta {
            instance,
            endpoint,
            protocol,
            labels,
            peer_chain,
        } = meta;
        let instance = instance.as_str();
        let endpoint = endpoint.as_str();
        let session_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let entry = SessionEntry {
            client: client.to_owned(),
            session,
            session_id,
            instance: instance.to_owned(),
            endpoint: endpoint.to_owned(),
            connected_at: Instant::now(),
            connected_wall: SystemTime::now(),
            peer_addr,
            health: Arc::new(SessionHealth::default()),
            protocol,
            labels,
            peer_chain,
        };
        let stale: Vec<SessionEntry> = {
            let mut inner = self.lock();
            let sessions = inner.clients.entry(client.to_owned()).or_default();
            let stale = if instance.is_empty() {
                Vec::new()
            } else {
                let (stale, keep) = std::mem::take(sessions)
                    .into_iter()
                    .partition(|e| e.instance == instance && e.endpoint == endpoint);
                *sessions = keep;
                stale
            };
            sessions.push(entry.clone());
            self.update_gauges(&inner, client);
            self.publish(&inner, SessionEvent::SessionAdded(entry));
            for old in &stale {
                self.publish(
                    &inner,
                    SessionEvent::StaleSessionRemoved {
                        client: client.to_owned(),
                        session_id: old.session_id,
                        replaced_by: session_id,
                    },
                );
            }
            stale
        };
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
        }
        SessionGuard {
            registry: self.clone(),
            client: client.to_owned(),
            session_id,
        }
    }

    /// Closes every live session for which `check` returns a [`Revocation`]: each is
    /// deregistered (event `revoked`), sent GOAWAY(revoked) with the detail, and closed.
    /// `check` runs without the registry lock (it may verify certificate chains). Returns the
    /// revoked sessions' ids.
    pub fn revoke(
        &self,
        check: impl Fn(&SessionEntry) -> Option<Revocation>,
    ) -> Vec<(u64, Revocation)> {
        let all = self.lock().all_sessions();
        let verdicts: Vec<(SessionEntry, Revocation)> = all
            .into_iter()
            .filter_map(|entry| check(&entry).map(|why| (entry, why)))
            .collect();
        let mut closed = Vec::new();
        {
            let mut inner = self.lock();
            for (entry, why) in &verdicts {
                let Some(sessions) = inner.clients.get_mut(&entry.client) else {
                    continue;
                };
                let before = sessions.len();
                sessions.retain(|e| e.session_id != entry.session_id);
                if sessions.len() == before {
                    continue; // ended meanwhile
                }
                self.update_gauges(&inner, &entry.client);
                self.publish(
                    &inner,
                    SessionEvent::SessionRevoked {
                        client: entry.client.clone(),
                        session_id: entry.session_id,
                        reason: why.reason,
                    },
                );
                closed.push((entry.clone(), why.clone()));
            }
        }
        closed
            .into_iter()
            .map(|(entry, why)| {
                tracing::warn!(
                    agent.id = %entry.client,
                    session.id = entry.session_id,
                    reason = why.reason,
                    detail = %why.detail,
                    "session closed: its certificate or identity is no longer accepted"
                );
                entry.session.goaway(GoAwayCode::Revoked, &why.detail);
                entry.session.close();
                (entry.session_id, why)
            })
            .collect()
    }

    fn remove(&self, client: &str, session_id: u64) {
        let mut inner = self.lock();
        let Some(sessions) = inner.clients.get_mut(client) else {
            return;
        };
        let before = sessions.len();
        sessions.retain(|e| e.session_id != session_id);
        if sessions.len() != before {
            self.update_gauges(&inner, client);
            self.publish(
                &inner,
                SessionEvent::SessionRemoved {
                    client: client.to_owned(),
                    session_id,
                },
            );
        }
    }

    fn update_gauges(&self, inner: &Inner, client: &str) {
        let count = inner.clients.get(client).map_or(0, Vec::len);
        self.metrics
            .sessions
            .with_label_values(&[client])
            .set(i64::try_from(count).unwrap_or(i64::MAX));
        let connected = inner.clients.values().filter(|s| !s.is_empty()).count();
        self.metrics
            .agents_connected
            .set(i64::try_from(connected).unwrap_or(i64::MAX));
    }

    /// Counts `event` and queues it for every subscriber. Called with the lock held; never
    /// waits.
    fn publish(&self, inner: &Inner, event: SessionEvent) {
        self.metrics
            .session_events
            .with_label_values(&[event.label()])
            .inc();
        if let Some(compat) = &self.metrics.remotedialer {
            match &event {
                SessionEvent::SessionAdded(_) => compat.session_added(event.client()),
                SessionEvent::SessionRemoved { .. }
                | SessionEvent::StaleSessionRemoved { .. }
                | SessionEvent::SessionRevoked { .. } => compat.session_removed(event.client()),
            }
        }
        for subscriber in &inner.subscribers {
            subscriber.push(&event);
        }
    }

    /// Subscribes to changes with a queue of [`DEFAULT_SUBSCRIBER_CAPACITY`] events. Returns
    /// the sessions registered at this instant and the subscriber that receives every change
    /// after it.
    pub fn subscribe(self: &Arc<Self>) -> (Vec<SessionEntry>, Subscriber) {
        self.subscribe_with_capacity(DEFAULT_SUBSCRIBER_CAPACITY)
    }

    /// [`subscribe`](Self::subscribe) with a queue of `capacity` events (at least 1).
    pub fn subscribe_with_capacity(
        self: &Arc<Self>,
        capacity: usize,
    ) -> (Vec<SessionEntry>, Subscriber) {
        let queue = Arc::new(SubscriberQueue {
            capacity: capacity.max(1),
            state: Mutex::new(QueueState::default()),
            notify: Notify::new(),
        });
        let mut inner = self.lock();
        inner.subscribers.push(queue.clone());
        let snapshot = inner.all_sessions();
        drop(inner);
        (
            snapshot,
            Subscriber {
                registry: self.clone(),
                queue,
            },
        )
    }

    /// How many subscribers are registered.
    pub fn subscriber_count(&self) -> usize {
        self.lock().subscribers.len()
    }

    /// The newest healthy session of `client` that is open and not draining; when none is
    /// healthy, the newest open one (an unhealthy session may still work, failing the dial
    /// outright would not).
    pub fn pick(&self, client: &str) -> Result<Session, NoSession> {
        self.pick_entry(client).map(|e| e.session)
    }

    /// [`pick`](Self::pick), with the registration details.
    pub fn pick_entry(&self, client: &str) -> Result<SessionEntry, NoSession> {
        let inner = self.lock();
        let usable =
            |e: &&SessionEntry| !e.session.is_closed() && e.session.peer_goaway().is_none();
        inner
            .clients
            .get(client)
            .and_then(|sessions| {
                sessions
                    .iter()
                    .rev()
                    .filter(usable)
                    .find(|e| e.health.is_healthy())
                    .or_else(|| sessions.iter().rev().find(usable))
            })
            .cloned()
            .ok_or_else(|| NoSession {
                client: client.to_owned(),
                replica: self.replica.clone(),
            })
    }

    /// Registered sessions of `client`, oldest first.
    pub fn sessions(&self, client: &str) -> Vec<SessionEntry> {
        self.lock().clients.get(client).cloned().unwrap_or_default()
    }

    /// Every registered session.
    pub fn all_sessions(&self) -> Vec<SessionEntry> {
        self.lock().all_sessions()
    }

    /// How many sessions are registered.
    pub fn session_count(&self) -> usize {
        self.lock().clients.values().map(Vec::len).sum()
    }

    /// Known clients and their sessions, sorted by agent id.
    pub fn snapshot(&self) -> Vec<ClientSnapshot> {
        // Copy the handles out first: session stats take the session's own lock.
        let clients: Vec<(String, Vec<SessionEntry>)> = self
            .lock()
            .clients
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
        connected_since: rfc3339(entry.connected_wall),
        connected_seconds: entry.connected_at.elapsed().as_secs_f64(),
        rtt_seconds: entry.health.rtt().or(stats.rtt).map(|d| d.as_secs_f64()),
        healthy: entry.health.is_healthy(),
        streams: stats.streams,
        bytes_rx: stats.bytes_rx,
        bytes_tx: stats.bytes_tx,
        protocol: entry.protocol.label().to_owned(),
        labels: entry.labels.clone(),
    }
}

/// One subscriber's queue, shared between the registry (pushes) and the [`Subscriber`].
#[derive(Debug)]
struct SubscriberQueue {
    capacity: usize,
    state: Mutex<QueueState>,
    notify: Notify,
}

#[derive(Debug, Default)]
struct QueueState {
    events: VecDeque<SessionEvent>,
    /// The queue overflowed: the next notice is a snapshot.
    lagged: bool,
    /// Events dropped since the last notice.
    missed: u64,
}

impl SubscriberQueue {
    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `event`, or on overflow drops the queue and marks the subscriber lagging.
    fn push(&self, event: &SessionEvent) {
        let mut state = self.lock();
        if state.lagged {
            state.missed += 1;
        } else if state.events.len() >= self.capacity {
            state.missed += state.events.len() as u64 + 1;
            state.events.clear();
            state.lagged = true;
        } else {
            state.events.push_back(event.clone());
        }
        drop(state);
        self.notify.notify_one();
    }
}

/// Receives the registry's changes in order. Its queue is bounded: a subscriber that falls
/// behind gets [`RegistryNotice::Lagged`] with a fresh snapshot instead of the events it
/// missed, so it never silently misses a removal. Dropping it unsubscribes.
#[derive(Debug)]
pub struct Subscriber {
    registry: Arc<SessionRegistry>,
    queue: Arc<SubscriberQueue>,
}

impl Subscriber {
    /// Waits for the next notice.
    pub async fn recv(&mut self) -> RegistryNotice {
        loop {
            if let Some(notice) = self.try_recv() {
                return notice;
            }
            self.queue.notify.notified().await;
        }
    }

    /// The next notice, if one is ready.
    pub fn try_recv(&mut self) -> Option<RegistryNotice> {
        {
            let mut state = self.queue.lock();
            if !state.lagged {
                return state.events.pop_front().map(RegistryNotice::Event);
            }
        }
        // Lagging: take the snapshot under the registry lock, which also stops publishing, so
        // that the snapshot and the events after it fit together exactly.
        let inner = self.registry.lock();
        let snapshot = inner.all_sessions();
        let mut state = self.queue.lock();
        let missed = state.missed + state.events.len() as u64;
        state.events.clear();
        state.lagged = false;
        state.missed = 0;
        drop(state);
        drop(inner);
        Some(RegistryNotice::Lagged { missed, snapshot })
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.registry
            .lock()
            .subscribers
            .retain(|q| !Arc::ptr_eq(q, &self.queue));
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

/// Most labels kept from one `X-Tether-Labels` header (the agent sends at most 32).
pub const MAX_LABELS: usize = 32;
/// Longest label key or value kept.
pub const MAX_LABEL_LEN: usize = 63;

/// Parses a peer-supplied `X-Tether-Labels` value (`key=value,key=value`): keeps at most
/// [`MAX_LABELS`] pairs whose key and value are 1..=[`MAX_LABEL_LEN`] characters of
/// `[A-Za-z0-9._/-]` (the agent's own rule); drops every other pair.
pub fn parse_labels(raw: &str) -> BTreeMap<String, String> {
    let valid = |s: &str| {
        !s.is_empty()
            && s.len() <= MAX_LABEL_LEN
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
    };
    raw.split(',')
        .filter_map(|pair| pair.trim().split_once('='))
        .filter(|(k, v)| valid(k) && valid(v))
        .take(MAX_LABELS)
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_parsed_and_sanitized() {
        let labels = parse_labels("site=eu-west, role=db,bad key=x,empty=,=v,k=v\u{1b}[31m");
        assert_eq!(
            labels.into_iter().collect::<Vec<_>>(),
            [
                ("role".to_owned(), "db".to_owned()),
                ("site".to_owned(), "eu-west".to_owned())
            ]
        );
        let many: Vec<String> = (0..40).map(|i| format!("k{i}=v")).collect();
        assert_eq!(parse_labels(&many.join(",")).len(), MAX_LABELS);
        assert!(parse_labels(&format!("k={}", "v".repeat(64))).is_empty());
    }

    #[test]
    fn instance_ids_are_sanitized() {
        assert_eq!(sanitize_instance("abc-123"), "abc-123");
        assert_eq!(sanitize_instance("a b\n<c>/é"), "abc");
        assert_eq!(sanitize_instance(&"x".repeat(200)).len(), MAX_INSTANCE_LEN);
        assert_eq!(sanitize_instance(""), "");
    }

    #[test]
    fn no_session_message() {
        let err = NoSession {
            client: "x".into(),
            replica: String::new(),
        };
        assert_eq!(err.to_string(), "no agent connected for client \"x\"");
        let err = NoSession {
            client: "x".into(),
            replica: "replica-2".into(),
        };
        assert_eq!(
            err.to_string(),
            "no agent connected for client \"x\" on replica \"replica-2\""
        );
    }
}
