//! Static port forwards: each local listener tunnels every consumer connection to a fixed
//! target through the newest session of a fixed agent; failures reach the consumer as a reset.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tether_common::pipe::{PipeError, PipeSide, pipe};
use tether_proto::{ResetCode, TargetAddr};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, field, info, info_span, warn};

use crate::accept::accept;
use crate::metrics::{NO_SESSION, ServerMetrics};
use crate::registry::SessionRegistry;
use tether_common::log_throttle::LogThrottle;

/// One configured forward and what its connection tasks share.
#[derive(Debug)]
pub(crate) struct Forward {
    pub(crate) name: String,
    pub(crate) client: String,
    pub(crate) target: TargetAddr,
    pub(crate) dial_timeout: Duration,
    pub(crate) registry: Arc<SessionRegistry>,
    pub(crate) metrics: ServerMetrics,
    /// Cancelled when shutdown starts: stop accepting.
    pub(crate) shutdown: CancellationToken,
    /// Cancelled when the drain deadline has passed: abort the pipes still running.
    pub(crate) hard_stop: CancellationToken,
    pub(crate) tracker: TaskTracker,
    pub(crate) log: LogThrottle,
    /// Whether the last dial failed: failures are logged at warn once per episode.
    failing: AtomicBool,
}

impl Forward {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        name: String,
        client: String,
        target: TargetAddr,
        dial_timeout: Duration,
        registry: Arc<SessionRegistry>,
        metrics: ServerMetrics,
        shutdown: CancellationToken,
        hard_stop: CancellationToken,
        tracker: TaskTracker,
    ) -> Self {
        Self {
            name,
            client,
            target,
            dial_timeout,
            registry,
            metrics,
            shutdown,
            hard_stop,
            tracker,
            log: LogThrottle::new(Duration::from_secs(60)),
            failing: AtomicBool::new(false),
        }
    }

    fn dial_failed(&self, code: &'static str, err: &dyn std::fmt::Display) {
        self.metrics.dial_errors.with_label_values(&[code]).inc();
        if !self.failing.swap(true, Ordering::Relaxed) {
            warn!(
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
            info!("forward dials succeed again");
        }
    }
}

/// Accepts consumer connections until shutdown; each one runs in its own tracked task.
pub(crate) async fn accept_loop(forward: Arc<Forward>, listener: TcpListener) {
    while let Some((tcp, peer)) = accept(&listener, &forward.shutdown, &forward.log).await {
        let span = info_span!(
            "forward_conn",
            forward = %forward.name,
            agent.id = %forward.client,
            target = %forward.target,
            peer.addr = %peer,
            stream.id = field::Empty
        );
        forward
            .tracker
            .spawn(serve_consumer(forward.clone(), tcp).instrument(span));
    }
    debug!(forward = %forward.name, "forward stopped accepting");
}

async fn serve_consumer(forward: Arc<Forward>, mut tcp: TcpStream) {
    let _ = tcp.set_nodelay(true);
    let session = match forward.registry.pick(&forward.client) {
        Ok(session) => session,
        Err(err) => {
            forward.dial_failed(NO_SESSION, &err);
            reset(tcp);
            return;
        }
    };
    // Counted from the attempt, like remotedialer; the guard counts the removal on every exit.
    let _compat = forward
        .metrics
        .remotedialer
        .as_ref()
        .map(|compat| compat.connection(&forward.client));
    let started = Instant::now();
    let opened = session
        .open_with_timeout(forward.target.clone(), forward.dial_timeout)
        .await;
    forward
        .metrics
        .dial_duration
        .observe(started.elapsed().as_secs_f64());
    let mut stream = match opened {
        Ok(stream) => stream,
        Err(err) => {
            forward.dial_failed(err.label(), &err);
            reset(tcp);
            return;
        }
    };
    forward.dial_succeeded();
    tracing::Span::current().record("stream.id", stream.id());
    debug!("stream open");
    let result = tokio::select! {
        result = pipe(&mut stream, &mut tcp) => result,
        _ = forward.hard_stop.cancelled() => Err(PipeError {
            side: PipeSide::Tunnel,
            source: io::Error::new(io::ErrorKind::ConnectionAborted, "server shutting down"),
        }),
    };
    match result {
        Ok(totals) => debug!(
            to_tunnel = totals.to_tunnel,
            to_local = totals.to_local,
            "stream finished"
        ),
        Err(err) => {
            debug!(side = ?err.side, error = %err.source, "stream failed");
            match err.side {
                PipeSide::Tunnel => reset(tcp),
                PipeSide::Local => {
                    stream.reset(ResetCode::TargetReset, "consumer connection failed")
                }
            }
        }
    }
}

/// Closes the consumer's socket with RST, so it sees an error rather than a clean EOF.
fn reset(tcp: TcpStream) {
    let _ = tcp.set_zero_linger();
    drop(tcp);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::Mutex;

    use super::*;
    use crate::registry::NoSession;

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
        let metrics = ServerMetrics::unregistered().unwrap();
        let forward = Forward::new(
            "db".into(),
            "edge-1".into(),
            "db.internal:5432".parse().unwrap(),
            Duration::from_secs(1),
            Arc::new(SessionRegistry::new(metrics.clone())),
            metrics.clone(),
            CancellationToken::new(),
            CancellationToken::new(),
            TaskTracker::new(),
        );
        let lines = Lines::default();
        let writer = lines.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        let err = NoSession {
            client: "edge-1".into(),
        };
        tracing::subscriber::with_default(subscriber, || {
            for _ in 0..50 {
                forward.dial_failed(NO_SESSION, &err);
            }
            forward.dial_succeeded();
            for _ in 0..50 {
                forward.dial_failed(NO_SESSION, &err);
            }
        });
        let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
        let warnings: Vec<&str> = text.lines().filter(|l| l.contains("WARN")).collect();
        assert_eq!(warnings.len(), 2, "{text}");
        assert!(
            warnings[0].contains("no agent connected for client \"edge-1\""),
            "{text}"
        );
        assert_eq!(
            metrics.dial_errors.with_label_values(&[NO_SESSION]).get(),
            100
        );
    }
}
