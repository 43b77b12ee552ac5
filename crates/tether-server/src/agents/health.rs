//! The health checker: a registry subscriber that pings every session on an interval, records
//! the round-trip time, marks a session unhealthy after missed pongs (healthy again on a pong),
//! and forgets removed and replaced sessions at once.
//!
//! One task per session sleeps, pings and reports to the checker loop, which owns all state;
//! untracking a session aborts its probe task, so a removed session is never probed again.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use prometheus::IntCounterVec;
use tether_mux::Session;
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::agents::health_metrics::HealthMetrics;
use crate::agents::registry::{RegistryNotice, SessionEntry, SessionEvent, SessionRegistry};
use crate::config::HealthConfig;

/// Probe results waiting for the checker loop; probe tasks wait when it is full.
const RESULT_QUEUE: usize = 1024;

/// What one probe found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// The pong came back after this long.
    Pong(Duration),
    /// No pong within the timeout.
    Missed,
    /// The session ended; its probe task stops.
    Closed,
}

impl ProbeOutcome {
    fn label(self) -> &'static str {
        match self {
            ProbeOutcome::Pong(_) => "ok",
            ProbeOutcome::Missed => "timeout",
            ProbeOutcome::Closed => "closed",
        }
    }
}

/// Pings the registry's sessions; see the module docs. Build with [`HealthChecker::new`], then
/// spawn [`run`](HealthChecker::run) on the server's task tracker.
#[derive(Debug)]
pub struct HealthChecker {
    registry: Arc<SessionRegistry>,
    metrics: HealthMetrics,
    interval: Duration,
    timeout: Duration,
    unhealthy_after: u32,
}

/// One probed session.
#[derive(Debug)]
struct Tracked {
    entry: SessionEntry,
    misses: u32,
    probe: AbortHandle,
}

/// Everything the checker loop owns.
struct State<'a> {
    checker: &'a HealthChecker,
    sessions: HashMap<u64, Tracked>,
    /// Per client: session id -> last RTT, for `tether_session_rtt_seconds{client}`.
    clients: HashMap<String, BTreeMap<u64, Option<Duration>>>,
    probes: JoinSet<()>,
    results: mpsc::Sender<(u64, ProbeOutcome)>,
}

impl HealthChecker {
    /// A checker of `registry`'s sessions with the `health:` settings, reporting into `metrics`.
    pub fn new(
        registry: Arc<SessionRegistry>,
        metrics: HealthMetrics,
        config: &HealthConfig,
    ) -> Self {
        Self {
            registry,
            metrics,
            interval: config.interval.0,
            timeout: config.timeout.0,
            unhealthy_after: config.unhealthy_after.max(1),
        }
    }

    /// Probes until `shutdown` fires; then stops every probe and returns.
    pub async fn run(self, shutdown: CancellationToken) {
        let (snapshot, mut subscriber) = self.registry.subscribe();
        let (results, mut results_rx) = mpsc::channel(RESULT_QUEUE);
        let mut state = State {
            checker: &self,
            sessions: HashMap::new(),
            clients: HashMap::new(),
            probes: JoinSet::new(),
            results,
        };
        state.replace_all(snapshot);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                notice = subscriber.recv() => state.apply(notice),
                Some((id, outcome)) = results_rx.recv() => state.record(id, outcome),
                Some(_) = state.probes.join_next(), if !state.probes.is_empty() => {}
            }
        }
        state.clear();
        debug!("health checker stopped");
    }
}

impl State<'_> {
    fn apply(&mut self, notice: RegistryNotice) {
        match notice {
            RegistryNotice::Event(SessionEvent::SessionAdded(entry)) => self.track(entry),
            RegistryNotice::Event(
                SessionEvent::SessionRemoved { session_id, .. }
                | SessionEvent::StaleSessionRemoved { session_id, .. }
                | SessionEvent::SessionRevoked { session_id, .. },
            ) => self.untrack(session_id),
            RegistryNotice::Lagged { missed, snapshot } => {
                info!(
                    missed,
                    sessions = snapshot.len(),
                    "health checker fell behind the registry; resynchronised from a snapshot"
                );
                self.replace_all(snapshot);
            }
        }
    }

    /// Makes the tracked set exactly `snapshot`.
    fn replace_all(&mut self, snapshot: Vec<SessionEntry>) {
        let live: HashSet<u64> = snapshot.iter().map(|e| e.session_id).collect();
        let gone: Vec<u64> = self
            .sessions
            .keys()
            .filter(|id| !live.contains(id))
            .copied()
            .collect();
        for id in gone {
            self.untrack(id);
        }
        for entry in snapshot {
            self.track(entry);
        }
    }

    fn track(&mut self, entry: SessionEntry) {
        if self.sessions.contains_key(&entry.session_id) {
            return;
        }
        let checker = self.checker;
        // Spread the first probes over one interval so that a burst of reconnects does not
        // become a burst of pings.
        let first = checker.interval.mul_f64(fastrand::f64());
        let probe = self.probes.spawn(probe_loop(
            entry.session.clone(),
            entry.session_id,
            first,
            checker.interval,
            checker.timeout,
            checker.metrics.health_probes.clone(),
            self.results.clone(),
        ));
        self.clients
            .entry(entry.client.clone())
            .or_default()
            .insert(entry.session_id, None);
        self.sessions.insert(
            entry.session_id,
            Tracked {
                entry,
                misses: 0,
                probe,
            },
        );
        self.update_tracked_gauge();
    }

    /// Forgets `id` at once: its probe task is aborted, its RTT no longer reported.
    fn untrack(&mut self, id: u64) {
        let Some(tracked) = self.sessions.remove(&id) else {
            return;
        };
        tracked.probe.abort();
        if !tracked.entry.health.is_healthy() {
            self.checker.metrics.health_unhealthy.dec();
        }
        let client = tracked.entry.client;
        if let Some(sessions) = self.clients.get_mut(&client) {
            sessions.remove(&id);
            if sessions.is_empty() {
                self.clients.remove(&client);
            }
        }
        self.update_rtt_gauge(&client);
        self.update_tracked_gauge();
    }

    fn record(&mut self, id: u64, outcome: ProbeOutcome) {
        let Some(tracked) = self.sessions.get_mut(&id) else {
            // A result that raced with the removal: the session is forgotten already.
            return;
        };
        let metrics = &self.checker.metrics;
        let entry = &tracked.entry;
        match outcome {
            ProbeOutcome::Pong(rtt) => {
                tracked.misses = 0;
                entry.health.record_rtt(rtt);
                if !entry.health.set_healthy(true) {
                    metrics.health_unhealthy.dec();
                    info!(
                        agent.id = %entry.client,
                        session.id = id,
                        rtt_ms = rtt.as_secs_f64() * 1000.0,
                        "session answers health probes again; healthy"
                    );
                }
                let client = entry.client.clone();
                if let Some(slot) = self
                    .clients
                    .get_mut(&client)
                    .and_then(|sessions| sessions.get_mut(&id))
                {
                    *slot = Some(rtt);
                }
                self.update_rtt_gauge(&client);
            }
            ProbeOutcome::Missed => {
                tracked.misses = tracked.misses.saturating_add(1);
                if tracked.misses == self.checker.unhealthy_after && entry.health.set_healthy(false)
                {
                    metrics.health_unhealthy.inc();
                    warn!(
                        agent.id = %entry.client,
                        session.id = id,
                        missed = tracked.misses,
                        timeout = ?self.checker.timeout,
                        "session missed health probes in a row; unhealthy (dials prefer other \
                         sessions of this agent)"
                    );
                }
            }
            ProbeOutcome::Closed => {
                debug!(session.id = id, "session ended while probing");
            }
        }
    }

    fn update_tracked_gauge(&self) {
        self.checker
            .metrics
            .health_tracked
            .set(i64::try_from(self.sessions.len()).unwrap_or(i64::MAX));
    }

    /// Reports the RTT of `client`'s newest session that has one, or drops the series.
    fn update_rtt_gauge(&self, client: &str) {
        let rtt = self
            .clients
            .get(client)
            .and_then(|sessions| sessions.values().rev().find_map(|rtt| *rtt));
        let gauge = &self.checker.metrics.session_rtt;
        match rtt {
            Some(rtt) => gauge.with_label_values(&[client]).set(rtt.as_secs_f64()),
            None => {
                // Absent already is fine.
                let _ = gauge.remove_label_values(&[client]);
            }
        }
    }

    /// Stops every probe and zeroes the gauges (shutdown).
    fn clear(&mut self) {
        let ids: Vec<u64> = self.sessions.keys().copied().collect();
        for id in ids {
            self.untrack(id);
        }
        self.probes.abort_all();
    }
}

/// Pings `session` after `first`, then every `interval` after the previous probe ended, and
/// counts and reports each outcome; stops when the session has ended or the checker is gone.
/// Counting here (not in the checker loop) makes a probe of a forgotten session visible.
async fn probe_loop(
    session: Session,
    id: u64,
    first: Duration,
    interval: Duration,
    timeout: Duration,
    counter: IntCounterVec,
    results: mpsc::Sender<(u64, ProbeOutcome)>,
) {
    tokio::time::sleep(first).await;
    loop {
        let outcome = probe(&session, timeout).await;
        counter.with_label_values(&[outcome.label()]).inc();
        if results.send((id, outcome)).await.is_err() || outcome == ProbeOutcome::Closed {
            return;
        }
        tokio::time::sleep(interval).await;
    }
}

/// One PING with a deadline.
pub async fn probe(session: &Session, timeout: Duration) -> ProbeOutcome {
    match tokio::time::timeout(timeout, session.ping()).await {
        Ok(Ok(rtt)) => ProbeOutcome::Pong(rtt),
        // A ping can also fail because the session dropped the oldest of too many unanswered
        // pings; that is a missed pong, not an ended session.
        Ok(Err(_)) if session.is_closed() => ProbeOutcome::Closed,
        Ok(Err(_)) | Err(_) => ProbeOutcome::Missed,
    }
}
