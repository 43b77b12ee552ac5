//! The agents' listener (the tunnel listener): an accept loop that only accepts, within the
//! pre-auth limits, and per connection a tracked task that runs the handshake
//! (`handshake.rs`: TLS, identity, upgrade) and then the agent's session (`session.rs`).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use prometheus::IntGauge;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tracing::{Instrument, debug, field, info_span, warn};

use crate::accept::accept;
use crate::admission::{Slot, source_key};
use crate::agents::handshake::handshake;
use crate::agents::listener_context::ListenerContext;
use crate::agents::session::run_session;

/// Accepts agent connections until shutdown; each one runs in its own tracked task.
pub(crate) async fn accept_loop(agents: Arc<ListenerContext>, listener: TcpListener) {
    while let Some((tcp, peer)) = accept(&listener, &agents.shutdown, &agents.log).await {
        let Some(source) = agents.sources.try_take(source_key(peer.ip())) else {
            agents.handshake_failed("source_limit");
            match agents.log.check("source_limit") {
                Some(suppressed) => warn!(
                    peer.addr = %peer,
                    suppressed,
                    "too many connections from one source in the handshake phase \
                     (max_pending_handshakes_per_source); dropping new ones"
                ),
                None => {
                    debug!(peer.addr = %peer, "dropped: too many pending handshakes from this source")
                }
            }
            continue;
        };
        let Ok(permit) = agents.pending.clone().try_acquire_owned() else {
            agents.handshake_failed("too_many_pending");
            match agents.log.check("too_many_pending") {
                Some(suppressed) => warn!(
                    peer.addr = %peer,
                    suppressed,
                    "too many connections in the handshake phase (max_pending_handshakes); \
                     dropping new ones"
                ),
                None => debug!(peer.addr = %peer, "dropped: too many pending handshakes"),
            }
            continue;
        };
        let pending =
            PendingHandshake::new(permit, source, agents.metrics.preauth_inflight.clone());
        let span = info_span!(
            "agent_conn",
            peer.addr = %peer,
            agent.id = field::Empty,
            session.id = field::Empty
        );
        agents
            .tracker
            .spawn(serve_connection(agents.clone(), tcp, peer, pending).instrument(span));
    }
    debug!("tunnel listener stopped accepting");
}

/// A connection in the TLS/upgrade phase: holds its permit and counts itself in the gauge.
struct PendingHandshake {
    _permit: OwnedSemaphorePermit,
    _source: Slot<IpAddr>,
    gauge: IntGauge,
}

impl PendingHandshake {
    fn new(permit: OwnedSemaphorePermit, source: Slot<IpAddr>, gauge: IntGauge) -> Self {
        gauge.inc();
        Self {
            _permit: permit,
            _source: source,
            gauge,
        }
    }
}

impl Drop for PendingHandshake {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

async fn serve_connection(
    agents: Arc<ListenerContext>,
    tcp: TcpStream,
    peer: SocketAddr,
    pending: PendingHandshake,
) {
    let deadline = Instant::now() + agents.handshake_timeout;
    let upgraded = tokio::select! {
        _ = agents.shutdown.cancelled() => None,
        upgraded = handshake(&agents, tcp, peer, deadline) => upgraded,
    };
    drop(pending);
    if let Some((agent_id, upgraded, chain)) = upgraded {
        run_session(&agents, agent_id, peer, upgraded, chain).await;
    }
}
