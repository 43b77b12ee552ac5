//! The reconnect loop of one endpoint of the replica set: wait for the activation gate,
//! connect, run the session and its stream handlers until it ends (or the gate closes, or a
//! reload changes the connection settings), wait a jittered backoff delay, repeat; publishes
//! the endpoint's state and logs a failure streak once per backoff step, never per attempt.
//! The decisions (which delay, which level, when a streak starts over) are `retry_policy`'s;
//! this file does the I/O they ask for.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use tether_mux::{Incoming, Role, Session, SessionDriver, SessionEnd};
use tether_proto::GoAwayCode;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::config::AgentProtocol;
use crate::config::ReconnectConfig;
use crate::connector::{ConnectError, Connection, Endpoint};
use crate::gate::GateState;
use crate::handler::Handler;
use crate::reload::ConnectSettings;
use crate::remotedialer_ws::RdWsClient;
use crate::replica_claims::ReplicaClaims;
use crate::retry_policy::{AfterSession, Loudness, Retry, RetryPolicy};
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
    /// or when the gate closes, the live session gets a GOAWAY and is closed. What to do after
    /// each attempt is [`RetryPolicy`]'s decision.
    pub(crate) async fn run(mut self, shutdown: CancellationToken) {
        let mut policy = RetryPolicy::new(self.reconnect.load_full());
        loop {
            policy.reconfigure(self.reconnect.load_full());
            match self.wait_for_gate(&shutdown).await {
                None => break,
                // A gate that opens again starts a fresh streak.
                Some(true) => policy.start_over(),
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
            let next = match attempt {
                Err(err) => Round::After(self.connect_failed(&mut policy, &err)),
                Ok(connection) => {
                    self.session_round(connection, &settings, &mut policy, &shutdown)
                        .await
                }
            };
            match next {
                Round::Stop => break,
                Round::Now => {}
                Round::After(delay) => {
                    if !self.pause(delay, &shutdown).await {
                        break;
                    }
                }
            }
        }
        self.update(|_, r| r.connected = false);
    }

    /// Records a failed connection attempt; returns the delay before the next one.
    fn connect_failed(&self, policy: &mut RetryPolicy, err: &ConnectError) -> Duration {
        self.handler.metrics.connect_failure(err);
        let kind = err.label();
        let error = err.to_string();
        self.update(|s, r| {
            s.attempts = s.attempts.saturating_add(1);
            s.last_error = Some(error.clone());
            s.last_error_kind = Some(kind);
            r.attempts = r.attempts.saturating_add(1);
            r.last_error = Some(error.clone());
        });
        self.log_retry(policy.connect_failed(kind), kind, &error)
    }

    /// Logs one failure of the streak as `policy` decided; returns its delay.
    fn log_retry(&self, retry: Retry, kind: &'static str, error: &str) -> Duration {
        log_at!(
            retry.loudness,
            attempt = retry.attempt,
            reason = kind,
            error = %error,
            next_delay = ?retry.delay,
            endpoint = %self.endpoint,
            "cannot keep a session to the server; retrying"
        );
        retry.delay
    }

    /// Claims the replica, runs one session on `connection` and decides what comes after it.
    async fn session_round(
        &self,
        connection: Connection,
        settings: &ConnectSettings,
        policy: &mut RetryPolicy,
        shutdown: &CancellationToken,
    ) -> Round {
        let server_id = connection.server_id.clone();
        if let Some(id) = &server_id
            && let Err(holder) = self.claims.claim(id, &self.endpoint)
        {
            // Another address reaches the same replica: one session per replica.
            drop(connection);
            if !self.idle_as_duplicate(id, &holder, shutdown).await {
                return Round::Stop;
            }
            policy.start_over();
            return Round::Now;
        }
        let session_id = self.session_started(&connection, policy);
        let (result, lived) = self
            .run_session(connection, settings, &session_id, shutdown)
            .await;
        if let Some(id) = &server_id {
            self.claims.release(id, &self.endpoint);
        }
        self.update(|_, r| r.connected = false);
        self.session_ended.notify_one();
        match result {
            SessionResult::Stopped(stop) => stopped(stop, &session_id, policy),
            SessionResult::Ended(end, goaway) => {
                Round::After(self.ended(policy, &session_id, &end, goaway, lived))
            }
        }
    }

    /// Counts, logs and publishes a new session on `connection`; returns its id.
    fn session_started(&self, connection: &Connection, policy: &mut RetryPolicy) -> String {
        let connected = policy.connected();
        if connected.is_reconnect {
            self.handler.metrics.reconnects.inc();
        }
        let n = self.sessions.fetch_add(1, Ordering::Relaxed) + 1;
        let session_id = format!("{}.{n}", self.instance_id);
        log_at!(
            connected.loudness,
            session.id = %session_id,
            peer.addr = %connection.peer,
            server.id = connection.server_id.as_deref().unwrap_or(""),
            failed_attempts = connected.failed_attempts,
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
        session_id
    }

    /// Publishes and logs a session that ended on its own; returns the delay before the next
    /// attempt.
    fn ended(
        &self,
        policy: &mut RetryPolicy,
        session_id: &str,
        end: &SessionEnd,
        goaway: Option<(GoAwayCode, String)>,
        lived: Duration,
    ) -> Duration {
        let kind = session_end_kind(end);
        let code = goaway.as_ref().map(|(code, _)| *code);
        let error = match &goaway {
            Some((code, message)) => format!(
                "session ended after the server's GOAWAY ({}: {message}): {end}",
                code.label()
            ),
            None => format!("session ended: {end}"),
        };
        self.update(|s, r| {
            s.last_error = Some(error.clone());
            s.last_error_kind = Some(kind);
            r.last_error = Some(error.clone());
        });
        match policy.session_ended(kind, code, lived) {
            AfterSession::ReplicaRestarting { delay } => {
                info!(
                    session.id = %session_id,
                    lived = ?lived,
                    next_delay = ?delay,
                    "server replica is restarting; keeping the other replicas, \
                     reconnecting to this one when it is back"
                );
                delay
            }
            AfterSession::LivedLong { delay, loudness } => {
                log_at!(
                    loudness,
                    session.id = %session_id,
                    reason = kind,
                    error = %end,
                    lived = ?lived,
                    next_delay = ?delay,
                    "session to the server ended; reconnecting"
                );
                delay
            }
            AfterSession::Failed(retry) => self.log_retry(retry, kind, &error),
        }
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

    /// The mux session over `connection`, in the protocol it speaks.
    fn open_session(
        &self,
        connection: Connection,
        settings: &ConnectSettings,
    ) -> (Session, Incoming, SessionDriver) {
        match connection.protocol {
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
        let (session, incoming, driver) = self.open_session(connection, settings);
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

/// What the loop does after one round.
enum Round {
    /// Leave (shutdown).
    Stop,
    /// Go on at once.
    Now,
    /// Go on after this delay (unless shutdown comes first).
    After(Duration),
}

/// Logs a session the agent closed itself; a reload reconnects on a fresh streak.
fn stopped(stop: Stop, session_id: &str, policy: &mut RetryPolicy) -> Round {
    match stop {
        Stop::Shutdown => {
            info!(session.id = %session_id, "session closed for shutdown");
            return Round::Stop;
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
            policy.start_over();
        }
    }
    Round::Now
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
