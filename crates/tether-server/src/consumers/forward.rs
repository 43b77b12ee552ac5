//! Static port forwards: each local listener tunnels every consumer connection to a fixed
//! target through the newest session of a fixed agent; failures reach the consumer as a reset.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tether_proto::TargetAddr;
use tokio::net::{TcpListener, TcpStream};
use tracing::{Instrument, debug, debug_span, field, info, warn};

use crate::accept::accept;
use crate::consumers::audit::Via;
use crate::consumers::context::ConsumerContext;
use crate::consumers::dial::DialError;
use crate::consumers::splice::{reset, splice};
use tether_common::log_throttle::LogThrottle;

/// One configured forward and what its connection tasks share.
#[derive(Debug)]
pub(crate) struct Forward {
    pub(crate) name: String,
    pub(crate) client: String,
    pub(crate) target: TargetAddr,
    /// The dialer, audit log and lifecycle; its `shutdown` stops this forward alone.
    pub(crate) ctx: ConsumerContext,
    pub(crate) log: LogThrottle,
    /// Whether the last dial failed: failures are logged at warn once per episode.
    failing: AtomicBool,
    /// The last failed dial, for the admin listing (`tether status`).
    pub(crate) last_error: Arc<LastError>,
}

/// A forward's last failed dial.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardError {
    /// When, RFC 3339 UTC.
    pub at: String,
    /// What failed, in words, with its code (`no_session`, `denied`, ...).
    pub error: String,
}

/// The last failed dial of a forward: when, and why in words. Replaced whole under a short
/// lock, never held across `.await`.
#[derive(Debug, Default)]
pub(crate) struct LastError(Mutex<Option<ForwardError>>);

impl LastError {
    fn set(&self, error: String) {
        let value = ForwardError {
            at: crate::rfc3339::rfc3339(std::time::SystemTime::now()),
            error,
        };
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(value);
    }

    /// The last failed dial, if any.
    pub(crate) fn get(&self) -> Option<ForwardError> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl Forward {
    pub(crate) fn new(
        name: String,
        client: String,
        target: TargetAddr,
        ctx: ConsumerContext,
    ) -> Self {
        Self {
            name,
            client,
            target,
            ctx,
            log: LogThrottle::new(Duration::from_secs(60)),
            failing: AtomicBool::new(false),
            last_error: Arc::default(),
        }
    }

    /// Logs a failed dial (counted by the dialer): at warn once per episode, then at debug.
    fn dial_failed(&self, err: &DialError) {
        let code = err.label();
        self.last_error.set(format!("{err} ({code})"));
        if !self.failing.swap(true, Ordering::Relaxed) {
            warn!(
                forward = %self.name,
                agent.id = %self.client,
                target = %self.target,
                code,
                error = %err,
                "forward cannot reach its target; further failures are logged at debug until a \
                 dial succeeds"
            );
        } else {
            debug!(code, error = %err, "forward dial failed");
        }
    }

    fn dial_succeeded(&self) {
        if self.failing.swap(false, Ordering::Relaxed) {
            info!(forward = %self.name, "forward dials succeed again");
        }
    }
}

/// Accepts consumer connections until shutdown; each one runs in its own tracked task.
pub(crate) async fn accept_loop(forward: Arc<Forward>, listener: TcpListener) {
    while let Some((tcp, peer)) = accept(&listener, &forward.ctx.shutdown, &forward.log).await {
        // Per connection, so at debug: at info, 5,000 concurrent spans keep about 4 MB in the
        // subscriber's span slab after they close. Events that matter name their forward.
        let span = debug_span!(
            "forward_conn",
            forward = %forward.name,
            agent.id = %forward.client,
            target = %forward.target,
            peer.addr = %peer,
            stream.id = field::Empty
        );
        forward
            .ctx
            .tracker
            .spawn(serve_consumer(forward.clone(), tcp, peer).instrument(span));
    }
    debug!(forward = %forward.name, "forward stopped accepting");
}

async fn serve_consumer(forward: Arc<Forward>, tcp: TcpStream, peer: SocketAddr) {
    let _ = tcp.set_nodelay(true);
    let dialer = &forward.ctx.dialer;
    let mut audit = forward.ctx.audit.connection(
        Via::Forward(&forward.name),
        peer,
        None,
        &forward.client,
        &forward.target,
    );
    // One round trip when the session offers it (issue 27): the consumer's first bytes go
    // with the OPEN, and the agent's answer is counted when it comes.
    let (conn, early) = match dialer.dial_early(&forward.client, &forward.target).await {
        Ok(dialed) => dialed,
        Err(err) => {
            forward.dial_failed(&err);
            reset(&tcp);
            audit.dial_failed(&err);
            return;
        }
    };
    audit.dialed(&conn, &forward.target);
    tracing::Span::current().record("stream.id", conn.stream.id());
    debug!("stream open");
    // Boxed: once answered, the box is freed instead of the answer's timer staying in this
    // task (whose size is each idle connection's cost) for the connection's life.
    let answered = Box::pin(async {
        let answer = dialer.answered(early).await;
        match &answer {
            Ok(()) => forward.dial_succeeded(),
            Err(err) => forward.dial_failed(err),
        }
        answer
    });
    let (end, answer) = tokio::join!(splice(conn, tcp, &forward.ctx.hard_stop), answered);
    match answer {
        Ok(()) => audit.spliced(&end),
        Err(err) => audit.dial_failed(&err),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::io;
    use std::sync::Mutex;

    use tokio_util::sync::CancellationToken;
    use tokio_util::task::TaskTracker;

    use super::*;
    use crate::agents::health_metrics::HealthMetrics;
    use crate::agents::registry::{NoSession, SessionRegistry};
    use crate::agents::registry_metrics::RegistryMetrics;
    use crate::consumers::audit::AuditLog;
    use crate::consumers::dial::AgentDialer;
    use crate::consumers::dial_metrics::DialMetrics;

    /// Collects formatted log lines.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_missing_session_is_logged_once_per_episode() {
        let dialer = AgentDialer {
            registry: Arc::new(SessionRegistry::new(
                RegistryMetrics::unregistered().unwrap(),
            )),
            metrics: DialMetrics::unregistered().unwrap(),
            health: HealthMetrics::unregistered().unwrap(),
            dial_timeout: Duration::from_secs(1),
            relay: None,
        };
        let forward = Forward::new(
            "db".into(),
            "edge-1".into(),
            "db.internal:5432".parse().unwrap(),
            ConsumerContext {
                dialer,
                audit: AuditLog::off(),
                shutdown: CancellationToken::new(),
                hard_stop: CancellationToken::new(),
                tracker: TaskTracker::new(),
            },
        );
        let lines = Lines::default();
        let writer = lines.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        let err = DialError::NoSession(NoSession {
            client: "edge-1".into(),
            replica: String::new(),
        });
        tracing::subscriber::with_default(subscriber, || {
            for _ in 0..50 {
                forward.dial_failed(&err);
            }
            forward.dial_succeeded();
            for _ in 0..50 {
                forward.dial_failed(&err);
            }
        });
        let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
        let warnings: Vec<&str> = text.lines().filter(|l| l.contains("WARN")).collect();
        assert_eq!(warnings.len(), 2, "{text}");
        assert!(
            warnings[0].contains("no agent connected for client \"edge-1\""),
            "{text}"
        );
    }
}
