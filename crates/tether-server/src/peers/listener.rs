//! The peer listener: mutual TLS with ALPN `tether-peer/1` and a `tether://server/<id>` client
//! certificate (an agent certificate is refused), then a tether.v1 session (length-prefixed
//! frames over the TLS stream) whose streams are relay requests.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tether_common::log_throttle::LogThrottle;
use tether_mux::transport::framed;
use tether_mux::{MuxConfig, MuxMetrics, Role, Session};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use super::config::MAX_MEMBERS;
use super::serve::Served;
use super::tls::{ALPN_PEER, PeerTls, peer_id, peer_serial};
use crate::accept::accept;

/// Most connections on the peer listener at once (handshakes and sessions): a few per member.
const MAX_PEER_CONNECTIONS: usize = 4 * MAX_MEMBERS;
/// Bound on a peer's TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything the peer listener needs.
pub(crate) struct PeerListener {
    pub(crate) tls: PeerTls,
    pub(crate) mux_config: MuxConfig,
    pub(crate) served: Served,
    pub(crate) tracker: TaskTracker,
    pub(crate) log: LogThrottle,
}

impl PeerListener {
    /// Accepts peer connections until `shutdown`; their sessions (and the relayed streams on
    /// them) last until `hard_stop`, so the drain lets relayed streams finish.
    pub(crate) async fn run(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: CancellationToken,
        hard_stop: CancellationToken,
    ) {
        let slots = Arc::new(Semaphore::new(MAX_PEER_CONNECTIONS));
        while let Some((tcp, peer)) = accept(&listener, &shutdown, &self.log).await {
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                if let Some(suppressed) = self.log.check("peer_limit") {
                    warn!(peer.addr = %peer, suppressed, "too many peer connections; dropping new ones");
                }
                continue;
            };
            let this = self.clone();
            let stop = hard_stop.clone();
            let span = info_span!("peer_conn", peer.addr = %peer);
            self.tracker.spawn(
                async move {
                    this.serve(tcp, peer, stop).await;
                    drop(slot);
                }
                .instrument(span),
            );
        }
    }

    async fn serve(&self, tcp: TcpStream, peer: SocketAddr, stop: CancellationToken) {
        let _ = tcp.set_nodelay(true);
        let acceptor = TlsAcceptor::from(self.tls.server());
        let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(err)) => return self.refused(peer, &format!("TLS handshake failed: {err}")),
            Err(_) => return self.refused(peer, "TLS handshake timed out"),
        };
        let conn = tls.get_ref().1;
        if conn.alpn_protocol() != Some(ALPN_PEER) {
            return self.refused(peer, "no tether-peer/1 ALPN");
        }
        let peer_id = match peer_id(conn.peer_certificates()) {
            Ok(id) => id,
            Err(err) => return self.refused(peer, &format!("certificate refused: {err}")),
        };
        let serial = peer_serial(conn.peer_certificates());
        info!(peer.id = %peer_id, peer.serial = %serial, "peer session accepted");
        let transport = framed(tls, self.mux_config.limits());
        let (session, incoming, driver) = Session::new(
            transport,
            Role::Server,
            self.mux_config.clone(),
            MuxMetrics::unregistered(),
        );
        let gauge = self.served.metrics.sessions.with_label_values(&["in"]);
        gauge.inc();
        let driver = self.tracker.spawn(driver.run());
        let streams = self.served.accept_streams(incoming, stop.clone());
        tokio::select! {
            _ = streams => {}
            _ = session.closed() => {}
        }
        session.close();
        let _ = driver.await;
        gauge.dec();
        debug!(peer.id = %peer_id, "peer session ended");
    }

    /// Logs a refused peer connection (once per window per reason kind).
    fn refused(&self, peer: SocketAddr, reason: &str) {
        match self.log.check("peer_refused") {
            Some(suppressed) => {
                warn!(peer.addr = %peer, reason, suppressed, "peer connection refused")
            }
            None => debug!(peer.addr = %peer, reason, "peer connection refused"),
        }
    }
}
