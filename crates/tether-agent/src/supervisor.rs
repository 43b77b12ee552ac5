//! The reconnect loop of one endpoint of the replica set: wait for the activation gate,
//! connect, run the session and its stream handlers until it ends (or the gate closes, or a
//! reload changes the connection settings), wait a jittered backoff delay, repeat; publishes
//! the endpoint's state and logs a failure streak once per backoff step, never per attempt.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use tether_common::backoff::Backoff;
use tether_mux::{Role, Session, SessionEnd};
use tether_proto::GoAwayCode;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::config::AgentProtocol;
use crate::config::ReconnectConfig;
use crate::connector::{Connection, Endpoint};
use crate::gate::GateState;
use crate::handler::Handler;
use crate::reload::ConnectSettings;
use crate::remotedialer_ws::RdWsClient;
use crate::replica_claims::ReplicaClaims;
use crate::status::{AgentStatus, ReplicaStatus};
use tether_mux::remotedialer::{self, RdTransport};
use tether_proto::remotedialer::RdLimits;

/// How long a closing session may take to flush its GOAWAY and close the WebSocket.
const SESSION_CLOSE_GRACE: Duration = Duration::from_secs(3);

/// Runs sessions to one endpoint one after the other, while the activation gate allows it.
pub(crate) struct Supervisor {
    /// What sessions are built from; a new value (a reload) makes the live session reconnect.
    pub(crate) connect: watch::Receiver<Arc<ConnectSettings>>,
    pub(crate) handler: Handler,
    /// Backoff settings, swapped in place by reloads.
    pub(crate) reconnect: Arc<ArcSwap<ReconnectConfig>>,
    pub(crate) gate: watch::Receiver<GateState>,
    pub(crate) status: watch::Sender<AgentStatus>,
    pub(crate) instance_id: String,
    /// Where this supervisor's sessions go.
    pub(crate) endpoint: Endpoint,
    /// Which endpoint holds the session to each replica id.
    pub(crate) claims: Arc<ReplicaClaims>,
    /// Notified when a session ends, so the replica set is resolved again at once.
    pub(crate) session_ended: Arc<Notify>,
    /// Sessions established by every endpoint (session ids are `<instance>.<n>`).
    pub(crate) sessions: Arc<AtomicU64>,
}

/// Why a live session was closed by the agent itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// The agent is shutting down.
    Shutdown,
    /// The activation gate closed.
    GateClosed,
    /// A reload changed the connection settings.
    Reconfigured,
}

/// How a session ended.
enum SessionResult {
    /// On its own (with the server's GOAWAY, if it sent one).
    Ended(SessionEnd, Option<(GoAwayCode, String)>),
    /// Closed by the agent (GOAWAY sent).
    Stopped(Stop),
}

/// How loudly to log one failure of a streak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Loudness {
    Warn,
    Info,
    Debug,
}

/// Failure streak bookkeeping: the first failure is a warning; later ones are logged at info
/// only when the kind of failure changes or the attempt count reaches a power of two (once per
/// doubling of the backoff), and at debug otherwise.
#[derive(Debug, Default)]
struct RetryLog {
    streak: u32,
    last_kind: Option<&'static str>,
    /// The streak follows a replica's announced restart: its first failure is news, not a
    /// warning.
    planned: bool,
}

impl RetryLog {
    fn failure(&mut self, kind: &'static str) -> Loudness {
        self.streak = self.streak.saturating_add(1);
        let changed = self.last_kind.replace(kind) != Some(kind);
        if self.streak == 1 && !self.planned {
            Loudness::Warn
        } else if self.streak == 1 || changed || self.streak.is_power_of_two() {
            Loudness::Info
        } else {
            Loudness::Debug
        }
    }

    /// Ends the streak; returns how many failures it had.
    fn reset(&mut self) -> u32 {
        self.last_kind = None;
        self.planned = false;
        std::mem::take(&mut self.streak)
    }
}

/// Logs one event at a level chosen at runtime, with the same fields at every level.
macro_rules! log_at {
    ($loudness:expr, $($rest:tt)+) => {
        match $loudness {
            Loudness::Warn => warn!($($rest)+),
            Loudness::Info => info!($($rest)+),
            Loudness::Debug => debug!($($rest)+),
        }
    };
}

/// A closed-set label for a session end, in `AgentStatus::last_error_kind` and logs.
fn session_end_kind(end: &SessionEnd) -> &'static str {
    match end {
        SessionEnd::Local => "session_local",
        SessionEnd::PeerClosed => "session_peer_closed",
        SessionEnd::IdleTimeout => "session_idle_timeout",
        SessionEnd::Protocol(_) => "session_protocol",
        SessionEnd::Transport(_) => "session_transport",
    }
}

impl Supervisor {
    /// Connects and reconnects until `shutdown` fires, while the gate is enabled. On shutdown
    /// or when the gate closes, the live session gets a GOAWAY and is closed.
    pub(crate) async fn run(mut self, shutdown: CancellationToken) {
        let mut reconnect = self.reconnect.load_full();
        let mut backoff = Backoff::new(reconnect.min_delay.0, reconnect.max_delay.0);
        let mut retry_log = RetryLog::default();
        let mut own_sessions: u64 = 0;
        let metrics = self.handler.metrics.clone();
        loop {
            let latest = self.reconnect.load_full();
            if latest != reconnect {
                reconnect = latest;
                backoff = Backoff::new(reconnect.min_delay.0, reconnect.max_delay.0);
            }
            match self.wait_for_gate(&shutdown).await {
                None => break,
                // A gate that opens again starts a fresh streak.
                Some(true) => {
                    backoff.reset();
                    retry_log.reset();
                }
                Some(false) => {}
            }
            let settings = self.connect.borrow_and_update().clone();
            let mut gate = self.gate.clone();
            let attempt = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                _ = gate_closes(&mut gate) => continue,
                attempt = settings.connector.connect_to(&self.endpoint) => attempt,
            };
            // What went wrong this round, for the log line after the delay is known.
            let (kind, error) = match attempt {
                Err(err) => {
                    metrics.connect_failure(&err);
                    let kind = err.label();
                    let error = err.to_string();
                    self.update(|s, r| {
                        s.attempts = s.attempts.saturating_add(1);
                        s.last_error = Some(error.clone());
                        s.last_error_kind = Some(kind);
                        r.attempts = r.attempts.saturating_add(1);
                        r.last_error = Some(error.clone());
                    });
                    (kind, error)
                }
                Ok(connection) => {
                    if let Some(server_id) = connection.server_id.clone()
                        && let Err(holder) = self.claims.claim(&server_id, &self.endpoint)
                    {
                        // Another address reaches the same replica: one session per replica.
                        drop(connection);
                        if !self.idle_as_duplicate(&server_id, &holder, &shutdown).await {
                            break;
                        }
                        backoff.reset();
                        retry_log.reset();
                        continue;
                    }
                    own_sessions += 1;
                    if own_sessions > 1 {
                        metrics.reconnects.inc();
                    }
                    let n = self.sessions.fetch_add(1, Ordering::Relaxed) + 1;
                    let session_id = format!("{}.{n}", self.instance_id);
                    let streak = retry_log.streak;
                    // A recovery is news; a flapping server (sessions that die young) is logged
                    // once per backoff step like any other failure streak.
                    let flapping = retry_log
                        .last_kind
                        .is_some_and(|kind| kind.starts_with("session_"));
                    let loudness = if !flapping || streak.is_power_of_two() {
                        Loudness::Info
                    } else {
                        Loudness::Debug
                    };
                    log_at!(
                        loudness,
                        session.id = %session_id,
                        peer.addr = %connection.peer,
                        server.id = connection.server_id.as_deref().unwrap_or(""),
                        failed_attempts = streak,
                        "connected to the server"
                    );
                    let server_id = connection.server_id.clone();
                    self.update(|s, r| {
                        r.connected = true;
                        r.server_id = server_id.clone();
                        r.duplicate_of = None;
                        r.attempts = 0;
                        s.session_id = Some(session_id.clone());
                        s.server_id = server_id.clone();
                        s.attempts = 0;
                        s.sessions = n;
                    });
                    let (result, lived) = self
                        .run_session(connection, &settings, &session_id, &shutdown)
                        .await;
                    if let Some(id) = &server_id {
                        self.claims.release(id, &self.endpoint);
                    }
                    self.update(|_, r| r.connected = false);
                    self.session_ended.notify_one();
                    let (end, peer_goaway) = match result {
                        SessionResult::Stopped(stop) => {
                            match stop {
                                Stop::Shutdown => {
                                    info!(session.id = %session_id, "session closed for shutdown");
                                    break;
                                }
                                Stop::GateClosed => {
                                    info!(
                                        session.id = %session_id,
                                        "session closed: the activation gate is disabled"
                                    );
                                }
                                Stop::Reconfigured => {
                                    info!(
                                        session.id = %session_id,
                                        "session closed: connection settings changed; reconnecting"
                                    );
                                    backoff.reset();
                                    retry_log.reset();
                                }
                            }
                            continue;
                        }
                        SessionResult::Ended(end, peer_goaway) => (end, peer_goaway),
                    };
                    let kind = session_end_kind(&end);
                    let restarting = peer_goaway
                        .as_ref()
                        .is_some_and(|(code, _)| *code == GoAwayCode::Restart);
                    let peer_goaway =
                        peer_goaway.map(|(code, message)| format!("{}: {message}", code.label()));
                    let error = match &peer_goaway {
                        Some(message) => {
                            format!("session ended after the server's GOAWAY ({message}): {end}")
                        }
                        None => format!("session ended: {end}"),
                    };
                    self.update(|s, r| {
                        s.last_error = Some(error.clone());
                        s.last_error_kind = Some(kind);
                        r.last_error = Some(error.clone());
                    });
                    if restarting {
                        // The replica announced it is going away: not a failure. Come back
                        // when it is up again; until then failures are expected news.
                        backoff.reset();
                        retry_log.reset();
                        retry_log.planned = true;
                        let delay = backoff.next_delay();
                        info!(
                            session.id = %session_id,
                            lived = ?lived,
                            next_delay = ?delay,
                            "server replica is restarting; keeping the other replicas, \
                             reconnecting to this one when it is back"
                        );
                        if !self.pause(delay, &shutdown).await {
                            break;
                        }
                        continue;
                    }
                    if lived >= reconnect.reset_after.0 {
                        // A session that lived long enough ends any streak: start over.
                        backoff.reset();
                        retry_log.reset();
                        let delay = backoff.next_delay();
                        let loudness = if peer_goaway.is_some() {
                            Loudness::Info
                        } else {
                            Loudness::Warn
                        };
                        log_at!(
                            loudness,
                            session.id = %session_id,
                            reason = kind,
                            error = %end,
                            lived = ?lived,
                            next_delay = ?delay,
                            "session to the server ended; reconnecting"
                        );
                        if !self.pause(delay, &shutdown).await {
                            break;
                        }
                        continue;
                    }
                    // A short session counts as one more failure of the streak.
                    (kind, error)
                }
            };
            let loudness = retry_log.failure(kind);
            let delay = backoff.next_delay();
            log_at!(
                loudness,
                attempt = retry_log.streak,
                reason = kind,
                error = %error,
                next_delay = ?delay,
                endpoint = %self.endpoint,
                "cannot keep a session to the server; retrying"
            );
            if !self.pause(delay, &shutdown).await {
                break;
            }
        }
        self.update(|_, r| r.connected = false);
    }

    /// Changes the agent's status and this endpoint's entry in it, then the metrics.
    fn update(&self, change: impl FnOnce(&mut AgentStatus, &mut ReplicaStatus)) {
        let key = self.endpoint.to_string();
        self.status.send_modify(|s| {
            let mut replica = s.replicas.remove(&key).unwrap_or_default();
            change(s, &mut replica);
            s.replicas.insert(key, replica);
            s.recount();
        });
        self.handler.metrics.replica_state(&self.status.borrow());
    }

    /// This endpoint reached replica `server_id`, which `holder` already has a session to:
    /// stays idle until that session ends (or the endpoint is stopped: `false`).
    async fn idle_as_duplicate(
        &self,
        server_id: &str,
        holder: &Endpoint,
        shutdown: &CancellationToken,
    ) -> bool {
        info!(
            server.id = %server_id,
            holder = %holder,
            "this address reaches a replica that is already connected; idle while that \
             session lasts"
        );
        let holder_text = holder.to_string();
        self.update(|_, r| {
            r.server_id = Some(server_id.to_owned());
            r.duplicate_of = Some(holder_text);
        });
        let mut connect = self.connect.clone();
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => false,
            () = self.claims.wait_released(server_id, &self.endpoint) => true,
            _ = connect.changed() => true,
        }
    }

    /// Returns at once when the gate is enabled (`Some(false)`); otherwise publishes why the
    /// agent is idle and waits until it opens (`Some(true)`) or shutdown (`None`).
    async fn wait_for_gate(&mut self, shutdown: &CancellationToken) -> Option<bool> {
        let mut waited = false;
        loop {
            let state = self.gate.borrow_and_update().clone();
            let reason = match state {
                GateState::Enabled => None,
                GateState::Disabled(reason) => Some(reason),
            };
            let enabled = reason.is_none();
            self.status.send_if_modified(|s| {
                let modified = s.gate_disabled != reason;
                s.gate_disabled = reason;
                modified
            });
            if enabled {
                return Some(waited);
            }
            waited = true;
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return None,
                changed = self.gate.changed() => if changed.is_err() {
                    return None;
                },
            }
        }
    }

    /// Sleeps for `delay`: `false` if `shutdown` fired first. New connection settings or a
    /// closing gate end the sleep early (the loop then reconnects or idles at once).
    async fn pause(&self, delay: Duration, shutdown: &CancellationToken) -> bool {
        let mut connect = self.connect.clone();
        let mut gate = self.gate.clone();
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => false,
            _ = tokio::time::sleep(delay) => true,
            _ = connect.changed() => true,
            _ = gate_closes(&mut gate) => true,
        }
    }

    /// Runs one session until it ends on its own, or the agent stops it (shutdown, gate,
    /// reload); also returns how long it lived.
    async fn run_session(
        &self,
        connection: Connection,
        settings: &ConnectSettings,
        session_id: &str,
        shutdown: &CancellationToken,
    ) -> (SessionResult, Duration) {
        let started = Instant::now();
        let span = info_span!(
            "session",
            session.id = %session_id,
            peer.addr = %connection.peer,
            server.id = connection.server_id.as_deref().unwrap_or(""),
        );
        let (session, incoming, driver) = match connection.protocol {
            AgentProtocol::Tether => Session::new(
                connection.transport,
                Role::Agent,
                // Capabilities (issue 27).
                settings.mux_config.clone().negotiate(&connection.peer_caps),
                self.handler.metrics.mux.clone(),
            ),
            AgentProtocol::Remotedialer => {
                let config = remotedialer::mux_config(Role::Agent, &settings.mux_config);
                let transport = RdTransport::new(
                    RdWsClient::new(connection.transport.into_inner()),
                    Role::Agent,
                    remotedialer::settings_for(&config),
                    RdLimits::default(),
                );
                Session::new(
                    transport,
                    Role::Agent,
                    config,
                    self.handler.metrics.mux.clone(),
                )
            }
        };
        // Cancelled when this function returns, however it returns: the session's dials and
        // streams end with it.
        let streams = shutdown.child_token();
        let _streams_guard = streams.clone().drop_guard();
        let tracker = &self.handler.tracker;
        let mut driver = tracker.spawn(driver.run().instrument(span.clone()));
        tracker.spawn(
            self.handler
                .clone()
                .serve(incoming, streams.clone())
                .instrument(span.clone()),
        );
        let mut gate = self.gate.clone();
        let mut connect = self.connect.clone();
        let stop = tokio::select! {
            end = &mut driver => {
                let end = end.unwrap_or_else(|err| {
                    SessionEnd::Transport(format!("session task failed: {err}"))
                });
                let goaway = session.peer_goaway();
                streams.cancel();
                return (SessionResult::Ended(end, goaway), started.elapsed());
            }
            _ = shutdown.cancelled() => Stop::Shutdown,
            _ = gate_closes(&mut gate) => Stop::GateClosed,
            changed = connect.changed() => match changed {
                Ok(()) => Stop::Reconfigured,
                // The agent is being dropped: treat it as shutdown.
                Err(_) => Stop::Shutdown,
            },
        };
        let message = match stop {
            Stop::Shutdown => "agent shutting down",
            Stop::GateClosed => "agent activation gate disabled",
            Stop::Reconfigured => "agent reconnecting with new settings",
        };
        session.goaway(GoAwayCode::Shutdown, message);
        session.close();
        if tokio::time::timeout(SESSION_CLOSE_GRACE, &mut driver)
            .await
            .is_err()
        {
            debug!(parent: &span, "session did not close in time");
        }
        streams.cancel();
        (SessionResult::Stopped(stop), started.elapsed())
    }
}

/// Resolves when the gate is (or becomes) disabled; never if the gate is gone.
async fn gate_closes(gate: &mut watch::Receiver<GateState>) {
    if gate.wait_for(|s| !s.is_enabled()).await.is_err() {
        std::future::pending::<()>().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_streak_warns_once_then_logs_per_doubling_or_change() {
        let mut log = RetryLog::default();
        let levels: Vec<Loudness> = (0..9).map(|_| log.failure("tcp")).collect();
        use Loudness::*;
        assert_eq!(
            levels,
            [Warn, Info, Debug, Info, Debug, Debug, Debug, Info, Debug]
        );
        // A new kind of failure is worth a line, but never another warning.
        assert_eq!(log.failure("tls"), Info);
        assert_eq!(log.failure("tls"), Debug);
        assert_eq!(log.reset(), 11);
        assert_eq!(log.failure("tls"), Warn);
    }

    #[test]
    fn a_streak_after_an_announced_restart_starts_at_info() {
        let mut log = RetryLog {
            planned: true,
            ..RetryLog::default()
        };
        use Loudness::*;
        assert_eq!(log.failure("tcp"), Info);
        assert_eq!(log.failure("tcp"), Info);
        assert_eq!(log.failure("tcp"), Debug);
        log.reset();
        assert_eq!(log.failure("tcp"), Warn, "reset forgets the restart");
    }

    #[test]
    fn session_end_kinds_are_prefixed() {
        for end in [
            SessionEnd::Local,
            SessionEnd::PeerClosed,
            SessionEnd::IdleTimeout,
            SessionEnd::Protocol("x".into()),
            SessionEnd::Transport("x".into()),
        ] {
            assert_eq!(session_end_kind(&end), format!("session_{}", end.label()));
        }
    }
}
