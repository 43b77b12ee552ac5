//! `ListenerContext`: what every connection task of the agents' listener shares (TLS material,
//! pre-auth limits, the registry, the upgrade router, the lifecycle), and how a failed
//! handshake is counted and logged.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tether_common::identity::IdentityMode;
use tether_common::log_throttle::LogThrottle;
use tether_mux::MuxConfig;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::admission::SlotTable;
use crate::agents::metrics::AgentMetrics;
use crate::agents::registry::SessionRegistry;
use crate::agents::tls_refusals;
use crate::tls_reload::TlsReloader;

/// How long a new connection may stay silent before its TLS ClientHello (capped by
/// `handshake_timeout`): an agent sends it at once, a silent socket only holds a slot.
pub(crate) const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(2);

/// Connections of one agent identity between its TLS handshake and its upgrade: a valid
/// certificate that never upgrades holds at most this many pre-auth slots.
pub(crate) const MAX_PENDING_PER_IDENTITY: usize = 4;

/// Everything a tunnel connection task needs.
pub(crate) struct ListenerContext {
    /// The TLS material in force: each handshake takes the newest.
    pub(crate) tls: TlsReloader,
    pub(crate) identity: IdentityMode,
    pub(crate) handshake_timeout: Duration,
    /// One permit per connection in the TLS/upgrade phase (`max_pending_handshakes`).
    pub(crate) pending: Arc<Semaphore>,
    /// Pending handshakes per source address (`max_pending_handshakes_per_source`).
    pub(crate) sources: Arc<SlotTable<IpAddr>>,
    /// Authenticated connections not yet upgraded, per agent id ([`MAX_PENDING_PER_IDENTITY`]).
    pub(crate) identities: Arc<SlotTable<String>>,
    pub(crate) registry: Arc<SessionRegistry>,
    pub(crate) metrics: AgentMetrics,
    pub(crate) mux_config: MuxConfig,
    /// `remotedialer.close_linger`.
    pub(crate) rd_close_linger: Duration,
    /// `remotedialer.sync_grace`.
    pub(crate) rd_sync_grace: Duration,
    /// The `/v1/connect` router (see `connect.rs`).
    pub(crate) router: axum::Router,
    /// Cancelled when shutdown starts: stop accepting, abandon handshakes, GOAWAY new sessions.
    pub(crate) shutdown: CancellationToken,
    /// Cancelled when the drain deadline has passed: close every session.
    pub(crate) hard_stop: CancellationToken,
    pub(crate) tracker: TaskTracker,
    pub(crate) log: LogThrottle,
}

impl ListenerContext {
    pub(crate) fn handshake_failed(&self, reason: &'static str) {
        self.metrics
            .tls_handshake_failures
            .with_label_values(&[reason])
            .inc();
    }

    /// A handshake refused over a certificate: counted, remembered per client id (or source
    /// address) for `GET /v1/clients/{id}`, and logged once per throttle window.
    pub(crate) fn tls_refused(
        &self,
        peer: SocketAddr,
        err: &io::Error,
        presented: Option<&rustls::pki_types::CertificateDer<'static>>,
    ) {
        let Some(refusal) = err
            .get_ref()
            .and_then(|e| e.downcast_ref::<rustls::Error>())
            .and_then(tls_refusals::classify)
        else {
            return;
        };
        let id = tls_refusals::record(
            &refusal,
            presented,
            self.identity,
            peer,
            &self.metrics.tls_refusals,
            self.registry.history(),
        );
        if let Some(suppressed) = self.log.check(refusal.reason) {
            warn!(
                peer.addr = %peer,
                agent.id = id.as_deref().unwrap_or("unknown"),
                reason = refusal.reason,
                suppressed,
                "TLS handshake refused: {}",
                refusal.detail
            );
        }
    }

    /// A client refused for its ALPN: a warning once per throttle window, debug otherwise.
    pub(crate) fn alpn_refused(&self, peer: SocketAddr, why: &'static str) {
        match self.log.check("alpn") {
            Some(suppressed) => warn!(
                peer.addr = %peer,
                reason = "alpn",
                suppressed,
                "TLS client refused: {why} (offer http/1.1 or no ALPN)"
            ),
            None => debug!(reason = "alpn", "TLS client refused: {why}"),
        }
    }
}

/// A closed-set label for a failed TLS accept, from the rustls error inside the I/O error.
pub(crate) fn classify_tls_error(err: &io::Error) -> &'static str {
    match err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    {
        Some(rustls::Error::InvalidCertificate(_)) => "bad_certificate",
        Some(rustls::Error::NoCertificatesPresented) => "no_certificate",
        Some(rustls::Error::AlertReceived(_)) => "peer_alert",
        Some(rustls::Error::NoApplicationProtocol) => "alpn",
        Some(_) => "protocol",
        None if err.kind() == io::ErrorKind::UnexpectedEof => "eof",
        None => "io",
    }
}
