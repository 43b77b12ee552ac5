//! The proxies' accept loop: per consumer connection, the pre-auth slots (global and per
//! peer), the active-connection gauge, and the protocol's handler (`http_connect.rs`,
//! `socks5.rs`) in a tracked task that the hard stop ends.

use std::net::SocketAddr;
use std::sync::Arc;

use prometheus::IntGauge;
use tokio::net::{TcpListener, TcpStream};
use tracing::{Instrument, debug, debug_span, field};

use crate::accept::accept;
use crate::admission::source_key;
use crate::consumers::proxy::{Admission, Frontend, Kind};
use crate::consumers::splice::reset;
use crate::consumers::{http_connect, socks5};

/// Accepts consumer connections until shutdown; each one runs in its own tracked task.
pub(crate) async fn accept_loop(frontend: Arc<Frontend>, listener: TcpListener) {
    while let Some((tcp, peer)) = accept(&listener, &frontend.ctx.shutdown, &frontend.log).await {
        let Some(peer_slot) = frontend.peers.try_take(source_key(peer.ip())) else {
            frontend.refused("limit", None, "", &"too many handshakes from this peer");
            reset(&tcp);
            continue;
        };
        let Ok(permit) = frontend.preauth.clone().try_acquire_owned() else {
            frontend.refused("limit", None, "", &"too many consumer handshakes");
            reset(&tcp);
            continue;
        };
        let mut admission = Admission::preauth(permit, peer_slot);
        // Per connection, so at debug (see forward.rs); refusals carry their own fields.
        let span = debug_span!(
            "frontend_conn",
            frontend = frontend.kind.label(),
            peer.addr = %peer,
            consumer = field::Empty,
            agent.id = field::Empty,
            target = field::Empty,
            stream.id = field::Empty
        );
        let conn = frontend.clone();
        let active = Active::new(
            frontend
                .metrics
                .frontend_active
                .with_label_values(&[frontend.kind.label()]),
        );
        frontend.ctx.tracker.spawn(
            async move {
                let _held = active;
                tokio::select! {
                    // Polled first: once splicing, `serve` ends itself on hard stop with a
                    // reset of the consumer, which dropping it here would turn into an EOF.
                    biased;
                    _ = serve(&conn, tcp, peer, &mut admission) => {}
                    // Ends handshakes and dials still running at hard stop.
                    _ = conn.ctx.hard_stop.cancelled() => {}
                }
            }
            .instrument(span),
        );
    }
    debug!(
        frontend = frontend.kind.label(),
        "frontend stopped accepting"
    );
}

/// Counts a connection in `tether_frontend_connections_active` until dropped.
struct Active(IntGauge);

impl Active {
    fn new(gauge: IntGauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.dec();
    }
}

async fn serve(frontend: &Frontend, tcp: TcpStream, peer: SocketAddr, admission: &mut Admission) {
    let _ = tcp.set_nodelay(true);
    match frontend.kind {
        Kind::HttpConnect => http_connect::serve(frontend, tcp, peer, admission).await,
        Kind::Socks5 => socks5::serve(frontend, tcp, peer, admission).await,
    }
}
