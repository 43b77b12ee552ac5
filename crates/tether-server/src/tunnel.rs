//! The tunnel listener: an accept loop that only accepts, and per connection (in a tracked task)
//! the TLS handshake, ALPN and identity checks, the HTTP upgrade, and then the agent's session
//! until it ends.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus::IntGauge;
use tether_common::identity::{IdentityError, IdentityMode};
use tether_common::tls::{alpn_ok, peer_identity};
use tether_common::tls_presented;
use tether_mux::remotedialer::{self, RdSettings, RdTransport};
use tether_mux::{MuxConfig, Role, Session, SessionEnd};
use tether_proto::GoAwayCode;
use tether_proto::remotedialer::RdLimits;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
use tokio::time::{Instant, timeout, timeout_at};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;
use tracing::{Instrument, Span, debug, field, info, info_span, warn};

use crate::accept::accept;
use crate::admission::{Slot, SlotTable, first_byte, source_key};
use crate::connect::{ConnContext, UpgradedAgent};
use crate::metrics::ServerMetrics;
use crate::registry::Protocol;
use crate::registry::{PeerChain, SessionRegistry};
use crate::remotedialer_ws::RdWsTransport;
use crate::tls_reload::TlsReloader;
use crate::ws_transport::WsTransport;
use tether_common::log_throttle::LogThrottle;
use tether_common::read_ahead::ReadAhead;

/// Largest HTTP head buffered while reading the upgrade request.
const MAX_HTTP_BUF: usize = 64 * 1024;

/// How long a new connection may stay silent before its TLS ClientHello (capped by
/// `handshake_timeout`): an agent sends it at once, a silent socket only holds a slot.
pub(crate) const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(2);

/// Connections of one agent identity between its TLS handshake and its upgrade: a valid
/// certificate that never upgrades holds at most this many pre-auth slots.
pub(crate) const MAX_PENDING_PER_IDENTITY: usize = 4;

/// Everything a tunnel connection task needs.
pub(crate) struct Tunnel {
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
    pub(crate) metrics: ServerMetrics,
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

/// Accepts tunnel connections until shutdown; each one runs in its own tracked task.
pub(crate) async fn accept_loop(tunnel: Arc<Tunnel>, listener: TcpListener) {
    while let Some((tcp, peer)) = accept(&listener, &tunnel.shutdown, &tunnel.log).await {
        let Some(source) = tunnel.sources.try_take(source_key(peer.ip())) else {
            tunnel.handshake_failed("source_limit");
            match tunnel.log.check("source_limit") {
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
        let Ok(permit) = tunnel.pending.clone().try_acquire_owned() else {
            tunnel.handshake_failed("too_many_pending");
            match tunnel.log.check("too_many_pending") {
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
            PendingHandshake::new(permit, source, tunnel.metrics.preauth_inflight.clone());
        let span = info_span!(
            "agent_conn",
            peer.addr = %peer,
            agent.id = field::Empty,
            session.id = field::Empty
        );
        tunnel
            .tracker
            .spawn(serve_connection(tunnel.clone(), tcp, peer, pending).instrument(span));
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
    tunnel: Arc<Tunnel>,
    tcp: TcpStream,
    peer: SocketAddr,
    pending: PendingHandshake,
) {
    let deadline = Instant::now() + tunnel.handshake_timeout;
    let upgraded = tokio::select! {
        _ = tunnel.shutdown.cancelled() => None,
        upgraded = handshake(&tunnel, tcp, peer, deadline) => upgraded,
    };
    drop(pending);
    if let Some((agent_id, upgraded, chain)) = upgraded {
        run_session(&tunnel, agent_id, peer, upgraded, chain).await;
    }
}

/// TLS, ALPN, identity and the HTTP upgrade; `None` if the connection is to be dropped.
async fn handshake(
    tunnel: &Tunnel,
    tcp: TcpStream,
    peer: SocketAddr,
    deadline: Instant,
) -> Option<(String, UpgradedAgent, Option<PeerChain>)> {
    let _ = tcp.set_nodelay(true);
    if !first_byte(&tcp, FIRST_BYTE_TIMEOUT.min(tunnel.handshake_timeout)).await {
        tunnel.handshake_failed("first_byte_timeout");
        debug!("no TLS ClientHello in time; closing");
        return None;
    }
    let acceptor = TlsAcceptor::from(tunnel.tls.config());
    let accept = tls_presented::capture(acceptor.accept(ReadAhead::new(tcp)));
    let tls = match timeout_at(deadline, accept).await {
        Err(_) => {
            tunnel.handshake_failed("timeout");
            debug!("TLS handshake timed out");
            return None;
        }
        Ok((Err(err), presented)) => {
            let reason = classify_tls_error(&err);
            tunnel.handshake_failed(reason);
            if reason == "alpn" {
                tunnel.alpn_refused(peer, "its ALPN list does not include http/1.1");
            } else {
                tunnel.tls_refused(peer, &err, presented.as_ref());
                debug!(reason, error = %err, "TLS handshake failed");
            }
            return None;
        }
        Ok((Ok(tls), _)) => tls,
    };
    let conn = tls.get_ref().1;
    // Kept in the registry so that a reload of the CA bundle or CRLs can verify it again.
    let chain: Option<PeerChain> = conn
        .peer_certificates()
        .map(|certs| certs.iter().map(|c| c.clone().into_owned()).collect());
    // No ALPN at all is fine (ordinary WebSocket clients offer none).
    if !alpn_ok(conn.alpn_protocol()) {
        tunnel.handshake_failed("alpn");
        tunnel.alpn_refused(peer, "it negotiated a protocol other than http/1.1");
        return None;
    }
    // No certificate at all passes the handshake only with
    // `remotedialer.allow_without_client_cert`; the routes then decide (connect.rs refuses,
    // remotedialer_connect.rs needs the token and the tunnel-id header).
    let identity = peer_identity(conn, tunnel.identity);
    let agent_id = match identity {
        Ok(id) => Some(id),
        Err(IdentityError::NoPeerCertificate) => None,
        Err(err) => {
            let reason = err.reason();
            tunnel
                .metrics
                .auth_failures
                .with_label_values(&[reason])
                .inc();
            match tunnel.log.check(reason) {
                Some(suppressed) => warn!(
                    peer.addr = %peer,
                    reason,
                    suppressed,
                    error = %err,
                    "agent certificate refused: it carries no usable agent identity"
                ),
                None => debug!(reason, error = %err, "agent certificate refused"),
            }
            refuse(
                tls,
                http::StatusCode::FORBIDDEN,
                &format!("agent certificate refused: {err}"),
                tunnel.handshake_timeout,
            )
            .await;
            return None;
        }
    };
    if let Some(id) = &agent_id {
        Span::current().record("agent.id", field::display(id));
    }
    // Held until the upgrade is done (or abandoned): a certificate that never upgrades
    // holds only a few pre-auth slots.
    let _identity_slot = match &agent_id {
        Some(id) => match tunnel.identities.try_take(id.clone()) {
            Some(slot) => Some(slot),
            None => {
                tunnel.handshake_failed("identity_limit");
                debug!("too many connections of this agent waiting for their upgrade");
                refuse(
                    tls,
                    http::StatusCode::TOO_MANY_REQUESTS,
                    "too many connections of this agent identity are waiting for their upgrade",
                    tunnel.handshake_timeout,
                )
                .await;
                return None;
            }
        },
        None => None,
    };

    let (handoff_tx, handoff_rx) = oneshot::channel();
    let ctx = ConnContext {
        agent_id: agent_id.as_deref().map(Arc::from),
        peer_addr: peer,
        handoff: Arc::new(Mutex::new(Some(handoff_tx))),
    };
    let router = tunnel.router.clone();
    let service = hyper::service::service_fn(move |mut req: http::Request<_>| {
        req.extensions_mut().insert(ctx.clone());
        router.clone().oneshot(req)
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(tunnel.handshake_timeout)
        .max_buf_size(MAX_HTTP_BUF);
    let http = builder
        .serve_connection(TokioIo::new(tls), service)
        .with_upgrades();
    match timeout_at(deadline, http).await {
        Err(_) => {
            tunnel.handshake_failed("upgrade_timeout");
            debug!("no WebSocket upgrade within handshake_timeout; closing");
            return None;
        }
        Ok(Err(err)) => {
            debug!(error = %err, "HTTP connection ended with an error");
            return None;
        }
        Ok(Ok(())) => {}
    }
    // On an upgrade, axum's upgrade task sends the socket right after hyper hands it over;
    // otherwise the sender was dropped with the service.
    match timeout(tunnel.handshake_timeout, handoff_rx).await {
        Ok(Ok(upgraded)) => {
            if agent_id.is_none() {
                Span::current().record("agent.id", field::display(&upgraded.agent_id));
            }
            Some((upgraded.agent_id.to_string(), upgraded, chain))
        }
        _ => {
            debug!("HTTP connection closed without an upgrade");
            None
        }
    }
}

/// Answers the connection's request with `status` and `reason` as a one-line text body, then
/// closes it, so the client learns why it was refused; at most `limit`.
async fn refuse<S>(io: S, status: http::StatusCode, reason: &str, limit: Duration)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let body = format!("{reason}\n");
    let service = hyper::service::service_fn(move |_req: http::Request<_>| {
        let body = body.clone();
        async move {
            let mut response = http::Response::new(axum::body::Body::from(body));
            *response.status_mut() = status;
            let headers = response.headers_mut();
            headers.insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            headers.insert(
                http::header::CONNECTION,
                http::HeaderValue::from_static("close"),
            );
            Ok::<_, std::convert::Infallible>(response)
        }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limit)
        .keep_alive(false)
        .max_buf_size(MAX_HTTP_BUF);
    let _ = timeout(limit, builder.serve_connection(TokioIo::new(io), service)).await;
}

/// Runs the agent's session to its end; the registry entry lives exactly as long.
async fn run_session(
    tunnel: &Tunnel,
    agent_id: String,
    peer: SocketAddr,
    up: UpgradedAgent,
    chain: Option<PeerChain>,
) {
    let UpgradedAgent {
        socket,
        agent_id: _,
        instance,
        endpoint,
        version,
        labels,
        slot,
        protocol,
        peer_caps,
    } = up;
    let (session, incoming, driver) = match protocol {
        Protocol::Tether => Session::new(
            WsTransport::new(socket, tunnel.mux_config.limits()),
            Role::Server,
            // Capabilities (issue 27).
            tunnel.mux_config.clone().negotiate(&peer_caps),
            tunnel.metrics.mux.clone(),
        ),
        Protocol::Remotedialer => {
            let config = remotedialer::mux_config(Role::Server, &tunnel.mux_config);
            let transport = RdTransport::new(
                RdWsTransport::new(socket),
                Role::Server,
                RdSettings {
                    close_linger: tunnel.rd_close_linger,
                    sync_grace: tunnel.rd_sync_grace,
                    ..remotedialer::settings_for(&config)
                },
                RdLimits::default(),
            );
            Session::new(transport, Role::Server, config, tunnel.metrics.mux.clone())
        }
    };
    let protocol_gauge = tunnel
        .metrics
        .protocol_sessions
        .with_label_values(&[protocol.label()]);
    protocol_gauge.inc();
    let _protocol_count = GaugeDec(protocol_gauge);
    // The server takes no streams from agents: without a receiver the mux answers every OPEN
    // with OPEN_ERR(unsupported).
    drop(incoming);
    let guard = tunnel.registry.insert_labelled(
        &agent_id,
        peer,
        session.clone(),
        crate::registry::SessionMeta {
            instance: instance.clone(),
            endpoint,
            protocol,
            labels,
            peer_chain: chain,
        },
    );
    Span::current().record("session.id", guard.session_id());
    info!(
        instance = %instance,
        agent.version = %version,
        protocol = protocol.label(),
        "agent connected"
    );
    if tunnel.shutdown.is_cancelled() {
        session.goaway(GoAwayCode::Shutdown, "server shutting down");
    }
    let connected_at = Instant::now();
    let run = driver.run();
    tokio::pin!(run);
    let end = tokio::select! {
        end = &mut run => end,
        _ = tunnel.hard_stop.cancelled() => {
            session.close();
            run.await
        }
    };
    // Free the max_agents slot first: once the session is gone from the registry, a new one
    // is admitted.
    let session_id = guard.session_id();
    drop(slot);
    drop(guard);
    tunnel.registry.history().session_ended(
        &agent_id,
        session_id,
        end.label(),
        &end.to_string(),
        connected_at.elapsed().as_secs_f64(),
    );
    match end {
        SessionEnd::Protocol(_) => warn!(reason = end.label(), error = %end, "agent disconnected"),
        _ => info!(reason = end.label(), "agent disconnected"),
    }
}

/// Decrements a gauge when dropped, on every exit path.
struct GaugeDec(IntGauge);

impl Drop for GaugeDec {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Tunnel {
    fn handshake_failed(&self, reason: &'static str) {
        self.metrics
            .tls_handshake_failures
            .with_label_values(&[reason])
            .inc();
    }

    /// A handshake refused over a certificate: counted, remembered per client id (or source
    /// address) for `GET /v1/clients/{id}`, and logged once per throttle window.
    fn tls_refused(
        &self,
        peer: SocketAddr,
        err: &io::Error,
        presented: Option<&rustls::pki_types::CertificateDer<'static>>,
    ) {
        let Some(refusal) = err
            .get_ref()
            .and_then(|e| e.downcast_ref::<rustls::Error>())
            .and_then(crate::tls_refusals::classify)
        else {
            return;
        };
        let id = crate::tls_refusals::record(
            &refusal,
            presented,
            self.identity,
            peer,
            &self.metrics,
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
    fn alpn_refused(&self, peer: SocketAddr, why: &'static str) {
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
fn classify_tls_error(err: &io::Error) -> &'static str {
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
