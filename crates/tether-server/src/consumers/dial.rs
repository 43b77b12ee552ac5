//! `AgentDialer`: opens a stream through the newest usable session of an agent (failing over
//! to another session, or relaying through a peer replica), with the dial metrics; what static
//! forwards, the HTTP CONNECT proxy, the SOCKS5 proxy and relayed dials share.

use std::sync::Arc;
use std::time::Duration;

use tether_mux::{MuxStream, OpenError};
use tether_proto::{OpenErrorCode, TargetAddr};
use tokio::time::Instant;
use tracing::warn;

use crate::agents::health_metrics::HealthMetrics;
use crate::agents::registry::{NoSession, SessionEntry, SessionRegistry};
use crate::consumers::dial_metrics::{DialMetrics, NO_SESSION};
use crate::peers::relay::{Relay, RelayError};
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
pub(crate) struct AgentDialer {
    pub(crate) registry: Arc<SessionRegistry>,
    pub(crate) metrics: DialMetrics,
    /// Where a session that does not answer an OPEN is counted unhealthy.
    pub(crate) health: HealthMetrics,
    pub(crate) dial_timeout: Duration,
    /// Peer replicas to relay through when this replica holds no session of the client
    /// (`peers:`); `None` for dials that must stay local (a relayed dial is never relayed).
    pub(crate) relay: Option<Relay>,
}

/// An open stream and what must live as long as it.
#[derive(Debug)]
pub(crate) struct DialedStream {
    pub(crate) stream: MuxStream,
    /// The registry's id of the session that carries the stream.
    pub(crate) session_id: u64,
    /// The agent process instance of that session (may be empty).
    pub(crate) instance: String,
    /// Counts the remotedialer-compatible removal when the connection ends.
    pub(super) _compat: Option<ConnectionGuard>,
}

impl AgentDialer {
    /// Opens a stream to `target` through agent `client`. Failures are counted in
    /// `tether_dial_errors_total{code}`; logging them is the caller's (it knows the episode).
    pub(crate) async fn dial(
        &self,
        client: &str,
        target: &TargetAddr,
    ) -> Result<DialedStream, DialError> {
        let entry = match (self.registry.pick_entry(client), &self.relay) {
            (Ok(entry), _) => entry,
            (Err(no_session), Some(relay)) => {
                return Box::pin(self.dial_relayed(relay, client, target, no_session)).await;
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
        // Boxed, as the relayed dial above: these futures are large and live only until the
        // stream is open, while the caller's task lives as long as the connection.
        let opened = Box::pin(self.open_with_failover(client, entry, target)).await;
        self.metrics
            .dial_duration
            .observe(started.elapsed().as_secs_f64());
        match opened {
            Ok((stream, used)) => Ok(DialedStream {
                stream,
                session_id: used.session_id,
                instance: used.instance,
                _compat: compat,
            }),
            Err(source) => Err(self.open_failed(target, source)),
        }
    }
}

impl AgentDialer {
    /// Opens `target` through a peer replica that holds a session of `client`.
    async fn dial_relayed(
        &self,
        relay: &Relay,
        client: &str,
        target: &TargetAddr,
        no_session: NoSession,
    ) -> Result<DialedStream, DialError> {
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
                return Ok(DialedStream {
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

impl AgentDialer {
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
            self.health.health_unhealthy.inc();
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

impl AgentDialer {
    /// A refused or failed open, counted under its code.
    pub(super) fn open_failed(&self, target: &TargetAddr, source: OpenError) -> DialError {
        self.metrics
            .dial_errors
            .with_label_values(&[source.label()])
            .inc();
        DialError::Open {
            target: target.clone(),
            source,
        }
    }

    /// Whether `client` has a healthy session other than `entry`'s to fail over to.
    pub(super) fn has_alternative(&self, client: &str, entry: &SessionEntry) -> bool {
        self.registry.sessions(client).iter().any(|other| {
            other.session_id != entry.session_id
                && !other.session.is_closed()
                && other.session.peer_goaway().is_none()
                && other.health.is_healthy()
        })
    }
}
