//! Dialing through an agent and splicing a consumer socket onto the stream: the part that
//! static forwards, the HTTP CONNECT proxy and the SOCKS5 proxy share.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tether_mux::direct::{DirectTcp, pipe_direct_until};
use tether_mux::pipe::{PipeError, PipeSide, PipeTotals};
use tether_mux::{MuxStream, OpenAnswer, OpenError};
use tether_proto::{OpenErrorCode, ResetCode, TargetAddr};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::audit::AuditLog;
use crate::metrics::{NO_SESSION, ServerMetrics};
use crate::peers::relay::{Relay, RelayError};
use crate::registry::{NoSession, SessionEntry, SessionRegistry};
use crate::remotedialer_metrics::ConnectionGuard;

/// Why a dial through an agent failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DialError {
    /// The client has no live session.
    #[error(transparent)]
    NoSession(#[from] NoSession),
    /// The session could not open the stream (the agent's OPEN_ERR, a timeout, a closed session).
    #[error("agent could not open {target}: {source}")]
    Open {
        /// Where the agent was asked to connect.
        target: TargetAddr,
        /// Why it failed.
        #[source]
        source: OpenError,
    },
}

impl DialError {
    /// A label from a closed set (`tether_dial_errors_total{code}`).
    pub(crate) fn label(&self) -> &'static str {
        match self {
            DialError::NoSession(_) => NO_SESSION,
            DialError::Open { source, .. } => source.label(),
        }
    }

    /// Whether the failure is a timeout (the agent's dial or the wait for its answer).
    pub(crate) fn is_timeout(&self) -> bool {
        matches!(
            self,
            DialError::Open {
                source: OpenError::Timeout(_)
                    | OpenError::Refused {
                        code: OpenErrorCode::TimedOut,
                        ..
                    },
                ..
            }
        )
    }
}

/// How long an OPEN may go unanswered on one session of a client that has another healthy
/// session, before it is reset there and tried once on the other.
pub(crate) const FAILOVER_AFTER: Duration = Duration::from_secs(2);

/// Opens streams through the newest usable session of a client, with the dial metrics.
#[derive(Debug, Clone)]
pub(crate) struct TunnelDialer {
    pub(crate) registry: Arc<SessionRegistry>,
    pub(crate) metrics: ServerMetrics,
    pub(crate) dial_timeout: Duration,
    /// Where each connection's audit line goes (a no-op when `audit_log` is off).
    pub(crate) audit: AuditLog,
    /// Peer replicas to relay through when this replica holds no session of the client
    /// (`peers:`); `None` for dials that must stay local (a relayed dial is never relayed).
    pub(crate) relay: Option<Relay>,
}

/// An open stream and what must live as long as it.
#[derive(Debug)]
pub(crate) struct TunnelConn {
    pub(crate) stream: MuxStream,
    /// The registry's id of the session that carries the stream.
    pub(crate) session_id: u64,
    /// The agent process instance of that session (may be empty).
    pub(crate) instance: String,
    /// Counts the remotedialer-compatible removal when the connection ends.
    _compat: Option<ConnectionGuard>,
}

impl TunnelDialer {
    /// Opens a stream to `target` through agent `client`. Failures are counted in
    /// `tether_dial_errors_total{code}`; logging them is the caller's (it knows the episode).
    pub(crate) async fn dial(
        &self,
        client: &str,
        target: &TargetAddr,
    ) -> Result<TunnelConn, DialError> {
        let entry = match (self.registry.pick_entry(client), &self.relay) {
            (Ok(entry), _) => entry,
            (Err(no_session), Some(relay)) => {
                return self.dial_relayed(relay, client, target, no_session).await;
            }
            (Err(no_session), None) => {
                self.metrics
                    .dial_errors
                    .with_label_values(&[NO_SESSION])
                    .inc();
                return Err(no_session.into());
            }
        };
        // Counted from the attempt, like remotedialer; the guard counts the removal on every exit.
        let compat = self
            .metrics
            .remotedialer
            .as_ref()
            .map(|compat| compat.connection(client));
        let started = Instant::now();
        let opened = self.open_with_failover(client, entry, target).await;
        self.metrics
            .dial_duration
            .observe(started.elapsed().as_secs_f64());
        match opened {
            Ok((stream, used)) => Ok(TunnelConn {
                stream,
                session_id: used.session_id,
                instance: used.instance,
                _compat: compat,
            }),
            Err(source) => {
                self.metrics
                    .dial_errors
                    .with_label_values(&[source.label()])
                    .inc();
                Err(DialError::Open {
                    target: target.clone(),
                    source,
                })
            }
        }
    }
}

impl TunnelDialer {
    /// Opens `target` through a peer replica that holds a session of `client`.
    async fn dial_relayed(
        &self,
        relay: &Relay,
        client: &str,
        target: &TargetAddr,
        no_session: NoSession,
    ) -> Result<TunnelConn, DialError> {
        let compat = self
            .metrics
            .remotedialer
            .as_ref()
            .map(|compat| compat.connection(client));
        let started = Instant::now();
        let relayed = relay.open(client, target).await;
        self.metrics
            .dial_duration
            .observe(started.elapsed().as_secs_f64());
        let error = match relayed {
            Ok(relayed) => {
                return Ok(TunnelConn {
                    stream: relayed.stream,
                    session_id: 0,
                    instance: format!("relay:{}", relayed.via),
                    _compat: compat,
                });
            }
            Err(RelayError::NoSession) => DialError::NoSession(no_session),
            Err(RelayError::Open(source)) => DialError::Open {
                target: target.clone(),
                source,
            },
        };
        self.metrics
            .dial_errors
            .with_label_values(&[error.label()])
            .inc();
        Err(error)
    }
}

/// How a splice ended: the bytes moved and a close reason for the audit log.
#[derive(Debug)]
pub(crate) struct SpliceEnd {
    pub(crate) totals: PipeTotals,
    /// `closed` (both directions finished), `consumer_error`, `tunnel_error` or `shutdown`.
    pub(crate) reason: &'static str,
    /// The failure, if any.
    pub(crate) error: Option<String>,
}

impl TunnelDialer {
    /// Opens on `entry`'s session. When the client has another healthy session, an OPEN left
    /// unanswered for [`FAILOVER_AFTER`] is reset (its future dropped), `entry` is marked
    /// unhealthy at once (its next health pong heals it) and the dial is tried once more on
    /// the session `pick` chooses then, with the rest of `dial_timeout`. Returns the stream
    /// and the session it opened on.
    async fn open_with_failover(
        &self,
        client: &str,
        entry: SessionEntry,
        target: &TargetAddr,
    ) -> Result<(MuxStream, SessionEntry), OpenError> {
        let has_alternative = self.has_alternative(client, &entry);
        let first_wait = FAILOVER_AFTER.min(self.dial_timeout);
        if !has_alternative || first_wait == self.dial_timeout {
            let stream = entry
                .session
                .open_with_timeout(target.clone(), self.dial_timeout)
                .await?;
            return Ok((stream, entry));
        }
        let first = entry
            .session
            .open_with_timeout(target.clone(), self.dial_timeout);
        if let Ok(result) = tokio::time::timeout(first_wait, first).await {
            return result.map(|stream| (stream, entry));
        }
        if entry.health.set_healthy(false) {
            self.metrics.health_unhealthy.inc();
        }
        warn!(
            agent.id = client,
            session.id = entry.session_id,
            waited = ?first_wait,
            "session did not answer an OPEN; marked unhealthy, dialing on another session"
        );
        let retry = match self.registry.pick_entry(client) {
            Ok(retry) if retry.session_id != entry.session_id => retry,
            _ => return Err(OpenError::Timeout(first_wait)),
        };
        let stream = retry
            .session
            .open_with_timeout(target.clone(), self.dial_timeout - first_wait)
            .await?;
        Ok((stream, retry))
    }
}

impl TunnelDialer {
    /// Whether `client` has a healthy session other than `entry`'s to fail over to.
    fn has_alternative(&self, client: &str, entry: &SessionEntry) -> bool {
        self.registry.sessions(client).iter().any(|other| {
            other.session_id != entry.session_id
                && !other.session.is_closed()
                && other.session.peer_goaway().is_none()
                && other.health.is_healthy()
        })
    }

    /// Like [`Self::dial`], but in one round trip when the session negotiated it (issue 27)
    /// and there is no other session to fail over to: the stream is returned before the
    /// agent's answer, so the consumer's first bytes travel with the OPEN. The answer is
    /// [`Self::answered`]'s, which counts it as `dial` counts its own.
    pub(crate) async fn dial_early(
        &self,
        client: &str,
        target: &TargetAddr,
    ) -> Result<(TunnelConn, Option<EarlyDial>), DialError> {
        let entry = match self.registry.pick_entry(client) {
            Ok(entry) if entry.session.early_data() && !self.has_alternative(client, &entry) => {
                entry
            }
            _ => return self.dial(client, target).await.map(|conn| (conn, None)),
        };
        let compat = self
            .metrics
            .remotedialer
            .as_ref()
            .map(|compat| compat.connection(client));
        let started = Instant::now();
        match entry
            .session
            .open_early(target.clone(), self.dial_timeout)
            .await
        {
            Ok((stream, answer)) => {
                let conn = TunnelConn {
                    stream,
                    session_id: entry.session_id,
                    instance: entry.instance,
                    _compat: compat,
                };
                let target = target.clone();
                Ok((
                    conn,
                    Some(EarlyDial {
                        answer,
                        started,
                        target,
                    }),
                ))
            }
            Err(source) => {
                self.metrics
                    .dial_errors
                    .with_label_values(&[source.label()])
                    .inc();
                Err(DialError::Open {
                    target: target.clone(),
                    source,
                })
            }
        }
    }

    /// The agent's answer to an early dial (`Ok` at once for a dial that waited for it);
    /// counted in the dial metrics. A stream that went away before its answer is `Ok`.
    pub(crate) async fn answered(&self, early: Option<EarlyDial>) -> Result<(), DialError> {
        let Some(EarlyDial {
            answer,
            started,
            target,
        }) = early
        else {
            return Ok(());
        };
        let outcome = answer.outcome().await;
        self.metrics
            .dial_duration
            .observe(started.elapsed().as_secs_f64());
        match outcome {
            Some(Err(source)) => {
                self.metrics
                    .dial_errors
                    .with_label_values(&[source.label()])
                    .inc();
                Err(DialError::Open { target, source })
            }
            _ => Ok(()),
        }
    }
}

/// An early dial whose answer is still to come (see [`TunnelDialer::dial_early`]).
#[derive(Debug)]
pub(crate) struct EarlyDial {
    answer: OpenAnswer,
    started: Instant,
    target: TargetAddr,
}

/// Pumps bytes between `tcp` and the tunnel stream until both directions end, one side fails,
/// or `hard_stop` fires. A failure on one side becomes a reset on the other, never a clean EOF.
pub(crate) async fn splice(
    mut conn: TunnelConn,
    tcp: TcpStream,
    hard_stop: &CancellationToken,
) -> SpliceEnd {
    let mut tcp = DirectTcp::new(tcp);
    let stop = async {
        hard_stop.cancelled().await;
        PipeError {
            side: PipeSide::Tunnel,
            source: io::Error::new(io::ErrorKind::ConnectionAborted, SHUTTING_DOWN),
        }
    };
    let end = pipe_direct_until(&mut conn.stream, &mut tcp, stop).await;
    let totals = end.totals;
    match end.result {
        Ok(()) => {
            debug!(
                to_tunnel = totals.to_tunnel,
                to_local = totals.to_local,
                "stream finished"
            );
            SpliceEnd {
                totals,
                reason: "closed",
                error: None,
            }
        }
        Err(err) => {
            debug!(side = ?err.side, error = %err.source, "stream failed");
            let reason = if hard_stop.is_cancelled() {
                "shutdown"
            } else {
                match err.side {
                    PipeSide::Tunnel => "tunnel_error",
                    PipeSide::Local => "consumer_error",
                }
            };
            match err.side {
                PipeSide::Tunnel => reset(tcp.get_ref()),
                PipeSide::Local => conn
                    .stream
                    .reset(ResetCode::TargetReset, "consumer connection failed"),
            }
            SpliceEnd {
                totals,
                reason,
                error: Some(err.source.to_string()),
            }
        }
    }
}

/// The error a splice ends with at the server's hard stop.
const SHUTTING_DOWN: &str = "server shutting down";

/// Makes closing the consumer's socket (when it is dropped) send RST, so the consumer sees an
/// error rather than a clean EOF.
pub(crate) fn reset(tcp: &TcpStream) {
    let _ = tcp.set_zero_linger();
}
