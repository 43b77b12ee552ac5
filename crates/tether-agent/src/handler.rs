//! Serves the server's stream requests on one session: for each OPEN, a policy-checked dial
//! (bounded by the smaller of our and the server's timeout), then the byte pump between the
//! tunneled stream and the target socket, turning a failure on one side into a reset on the other.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tether_common::log_throttle::LogThrottle;
use tether_mux::direct::{DirectTcp, pipe_direct};
use tether_mux::pipe::{PipeError, PipeSide};
use tether_mux::{Incoming, MuxStream, PendingOpen};
use tether_proto::{OpenErrorCode, ResetCode};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, debug_span, field, info};

use crate::dial::{DialError, Resolver, dial};
use crate::metrics::{AgentMetrics, DialOutcome};
use crate::policy::{Host, Policy};

/// The dial policy in effect, swappable at runtime (a config reload stores a new one; dials
/// already under way keep the policy they started with).
pub type SharedPolicy = Arc<ArcSwap<Policy>>;

/// What every stream handler needs; cheap to clone.
#[derive(Clone)]
pub(crate) struct Handler {
    pub(crate) policy: SharedPolicy,
    pub(crate) resolver: Arc<dyn Resolver>,
    pub(crate) dial_timeout: Arc<ArcSwap<Duration>>,
    pub(crate) metrics: AgentMetrics,
    pub(crate) tracker: TaskTracker,
    /// Policy refusals repeat as often as the server asks: one info line per window.
    pub(crate) denials: Arc<LogThrottle>,
}

impl Handler {
    /// Takes the server's OPENs until the session ends or `cancel` fires; each one is served in
    /// its own task on the tracker. Cancelling `cancel` also aborts every dial and stream of
    /// this session (their target sockets are reset).
    pub(crate) async fn serve(self, mut incoming: Incoming, cancel: CancellationToken) {
        loop {
            let pending = tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                pending = incoming.accept() => match pending {
                    Some(pending) => pending,
                    None => break,
                },
            };
            // Per stream, so at debug (see forward.rs); the policy refusal names its target.
            let span = debug_span!(
                "stream",
                stream.id = pending.id(),
                target = field::Empty,
                peer.addr = field::Empty,
            );
            let handler = self.clone();
            let cancel = cancel.clone();
            self.tracker
                .spawn(async move { handler.handle(pending, cancel).await }.instrument(span));
        }
    }

    async fn handle(&self, pending: PendingOpen, cancel: CancellationToken) {
        let target = pending.target();
        let host = match &target.host {
            tether_proto::Host::Ip(ip) => Host::Ip(*ip),
            tether_proto::Host::Name(name) => Host::Name(name.clone()),
        };
        let port = target.port;
        // The policy's `Host` display escapes peer-supplied names, so logs stay one line.
        tracing::Span::current().record("target", field::display(format_args!("{host}:{port}")));
        let timeout = effective_timeout(**self.dial_timeout.load(), pending.timeout());
        let policy = self.policy.load_full();
        // Boxed: the dial's future (resolution, happy eyeballs, timers) is large and lives only
        // until the target answers, while this task lives as long as the stream (its size is
        // each idle stream's cost).
        let dialing = Box::pin(dial(&policy, self.resolver.as_ref(), &host, port, timeout));
        let dialed = tokio::select! {
            dialed = dialing => dialed,
            _ = cancel.cancelled() => {
                // Dropping the pending open answers OPEN_ERR if the session is still there.
                debug!("session ending; dial abandoned");
                return;
            }
        };
        let (tcp, addr) = match dialed {
            Ok(dialed) => dialed,
            Err(err) => {
                let (code, outcome) = classify(&err);
                self.metrics.dial(outcome);
                if outcome == DialOutcome::Denied {
                    match self.denials.check("denied") {
                        Some(suppressed) => {
                            info!(
                                target = %target,
                                error = %err,
                                suppressed,
                                "open refused by the dial policy"
                            );
                        }
                        None => debug!(error = %err, "open refused by the dial policy"),
                    }
                } else {
                    debug!(error = %err, outcome = outcome.label(), "dial failed");
                }
                pending.reject(code, &err.to_string());
                return;
            }
        };
        tracing::Span::current().record("peer.addr", field::display(addr));
        self.metrics.dial(DialOutcome::Ok);
        let stream = match pending.accept() {
            Ok(stream) => stream,
            Err(err) => {
                debug!(error = %err, "the server gave up on the stream before it opened");
                abort(&tcp);
                return;
            }
        };
        debug!("stream open");
        pump(stream, tcp, &cancel).await;
    }
}

/// Moves bytes until both directions finish, one side fails, or the session ends.
async fn pump(mut stream: MuxStream, tcp: TcpStream, cancel: &CancellationToken) {
    let mut tcp = DirectTcp::new(tcp);
    let result = tokio::select! {
        result = pipe_direct(&mut stream, &mut tcp) => Some(result),
        _ = cancel.cancelled() => None,
    };
    match result {
        Some(Ok(totals)) => {
            debug!(
                to_tunnel = totals.to_tunnel,
                to_local = totals.to_local,
                "stream finished"
            );
        }
        Some(Err(PipeError {
            side: PipeSide::Tunnel,
            source,
        })) => {
            // The server reset the stream or the session died: the target must not mistake
            // that for a clean end of data.
            debug!(error = %source, "tunnel side failed; resetting the target connection");
            abort(tcp.get_ref());
        }
        Some(Err(PipeError {
            side: PipeSide::Local,
            source,
        })) => {
            debug!(error = %source, "target connection failed; resetting the stream");
            stream.reset(ResetCode::TargetReset, &source.to_string());
        }
        None => {
            debug!("session ending; resetting the stream and the target connection");
            stream.reset(ResetCode::SessionClosing, "agent session ending");
            abort(tcp.get_ref());
        }
    }
}

/// Makes closing `tcp` (when it is dropped) send RST instead of FIN.
fn abort(tcp: &TcpStream) {
    if let Err(err) = tcp.set_zero_linger() {
        debug!(error = %err, "cannot set SO_LINGER 0; the target sees a FIN");
    }
}

/// The smaller of our bound and the server's; a server timeout of 0 means "no preference".
fn effective_timeout(ours: Duration, server: Duration) -> Duration {
    if server.is_zero() {
        ours
    } else {
        ours.min(server)
    }
}

/// The OPEN_ERR code and metric outcome of a failed dial.
fn classify(err: &DialError) -> (OpenErrorCode, DialOutcome) {
    match err {
        DialError::Denied(_) => (OpenErrorCode::Denied, DialOutcome::Denied),
        DialError::ResolveFailed(_) => (OpenErrorCode::ResolveFailed, DialOutcome::ResolveFailed),
        DialError::Refused { .. } => (OpenErrorCode::Refused, DialOutcome::Refused),
        DialError::TimedOut { .. } => (OpenErrorCode::TimedOut, DialOutcome::TimedOut),
        DialError::Unreachable { .. } => (OpenErrorCode::Unreachable, DialOutcome::Unreachable),
        DialError::Io { .. } => (OpenErrorCode::Internal, DialOutcome::Error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    #[test]
    fn timeout_is_the_smaller_one() {
        let s = Duration::from_secs;
        assert_eq!(effective_timeout(s(10), s(3)), s(3));
        assert_eq!(effective_timeout(s(10), s(30)), s(10));
        assert_eq!(effective_timeout(s(10), Duration::ZERO), s(10));
    }

    #[test]
    fn every_dial_error_has_a_code() {
        let addr = "192.0.2.1:80".parse().unwrap();
        let cases = [
            (
                DialError::ResolveFailed(io::ErrorKind::NotFound.into()),
                OpenErrorCode::ResolveFailed,
            ),
            (DialError::Refused { addr }, OpenErrorCode::Refused),
            (
                DialError::TimedOut {
                    timeout: Duration::from_secs(1),
                },
                OpenErrorCode::TimedOut,
            ),
            (
                DialError::Unreachable {
                    addr,
                    source: io::ErrorKind::HostUnreachable.into(),
                },
                OpenErrorCode::Unreachable,
            ),
            (
                DialError::Io {
                    addr,
                    source: io::ErrorKind::PermissionDenied.into(),
                },
                OpenErrorCode::Internal,
            ),
        ];
        for (err, code) in cases {
            let (got, outcome) = classify(&err);
            assert_eq!(got, code, "{err}");
            // Metric labels follow the wire codes, except the catch-all.
            if code != OpenErrorCode::Internal {
                assert_eq!(outcome.label(), code.label());
            }
        }
    }
}
