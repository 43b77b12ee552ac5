//! One agent connection before its session: the first byte, TLS (with the certificate
//! refusals remembered), ALPN, the agent identity and its pending-slot, then the HTTP upgrade
//! served by the upgrade router until a route hands the WebSocket back.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tether_common::identity::IdentityError;
use tether_common::read_ahead::ReadAhead;
use tether_common::tls::{alpn_ok, peer_identity};
use tether_common::tls_presented;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::time::{Instant, timeout, timeout_at};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tower::ServiceExt;
use tracing::{Span, debug, field, warn};

use crate::admission::first_byte;
use crate::agents::listener_context::{FIRST_BYTE_TIMEOUT, ListenerContext, classify_tls_error};
use crate::agents::registry::PeerChain;
use crate::agents::upgrade::handoff::{ConnFacts, UpgradedAgent};

/// Largest HTTP head buffered while reading the upgrade request.
const MAX_HTTP_BUF: usize = 64 * 1024;

/// The TLS stream of an agent connection.
type AgentTls = TlsStream<ReadAhead<TcpStream>>;

/// TLS, ALPN, identity and the HTTP upgrade; `None` if the connection is to be dropped.
pub(crate) async fn handshake(
    agents: &ListenerContext,
    tcp: TcpStream,
    peer: SocketAddr,
    deadline: Instant,
) -> Option<(String, UpgradedAgent, Option<PeerChain>)> {
    let tls = accept_tls(agents, tcp, peer, deadline).await?;
    // Kept in the registry so that a reload of the CA bundle or CRLs can verify it again.
    let chain: Option<PeerChain> = tls
        .get_ref()
        .1
        .peer_certificates()
        .map(|certs| certs.iter().map(|c| c.clone().into_owned()).collect());
    let (tls, agent_id) = identify(agents, tls, peer).await?;
    if let Some(id) = &agent_id {
        Span::current().record("agent.id", field::display(id));
    }
    // Held until the upgrade is done (or abandoned): a certificate that never upgrades
    // holds only a few pre-auth slots.
    let _identity_slot = match &agent_id {
        Some(id) => match agents.identities.try_take(id.clone()) {
            Some(slot) => Some(slot),
            None => {
                agents.handshake_failed("identity_limit");
                debug!("too many connections of this agent waiting for their upgrade");
                let why =
                    "too many connections of this agent identity are waiting for their upgrade";
                refuse(
                    tls,
                    http::StatusCode::TOO_MANY_REQUESTS,
                    why,
                    agents.handshake_timeout,
                )
                .await;
                return None;
            }
        },
        None => None,
    };
    let upgraded = upgrade(agents, tls, peer, agent_id.as_deref(), deadline).await?;
    if agent_id.is_none() {
        Span::current().record("agent.id", field::display(&upgraded.agent_id));
    }
    Some((upgraded.agent_id.to_string(), upgraded, chain))
}

/// The first byte in time, then the TLS handshake by `deadline` and an acceptable ALPN.
async fn accept_tls(
    agents: &ListenerContext,
    tcp: TcpStream,
    peer: SocketAddr,
    deadline: Instant,
) -> Option<AgentTls> {
    let _ = tcp.set_nodelay(true);
    if !first_byte(&tcp, FIRST_BYTE_TIMEOUT.min(agents.handshake_timeout)).await {
        agents.handshake_failed("first_byte_timeout");
        debug!("no TLS ClientHello in time; closing");
        return None;
    }
    let acceptor = TlsAcceptor::from(agents.tls.config());
    let accept = tls_presented::capture(acceptor.accept(ReadAhead::new(tcp)));
    let tls = match timeout_at(deadline, accept).await {
        Err(_) => {
            agents.handshake_failed("timeout");
            debug!("TLS handshake timed out");
            return None;
        }
        Ok((Err(err), presented)) => {
            let reason = classify_tls_error(&err);
            agents.handshake_failed(reason);
            if reason == "alpn" {
                agents.alpn_refused(peer, "its ALPN list does not include http/1.1");
            } else {
                agents.tls_refused(peer, &err, presented.as_ref());
                debug!(reason, error = %err, "TLS handshake failed");
            }
            return None;
        }
        Ok((Ok(tls), _)) => tls,
    };
    // No ALPN at all is fine (ordinary WebSocket clients offer none).
    if !alpn_ok(tls.get_ref().1.alpn_protocol()) {
        agents.handshake_failed("alpn");
        agents.alpn_refused(peer, "it negotiated a protocol other than http/1.1");
        return None;
    }
    Some(tls)
}

/// The agent id of the client certificate: `Some(None)` for a client without one (only
/// possible with `remotedialer.allow_without_client_cert`; the routes then decide: the
/// native one refuses, the remotedialer one needs the token and the tunnel-id header), `None`
/// once a certificate without a usable identity was refused.
async fn identify(
    agents: &ListenerContext,
    tls: AgentTls,
    peer: SocketAddr,
) -> Option<(AgentTls, Option<String>)> {
    let err = match peer_identity(tls.get_ref().1, agents.identity) {
        Ok(id) => return Some((tls, Some(id))),
        Err(IdentityError::NoPeerCertificate) => return Some((tls, None)),
        Err(err) => err,
    };
    let reason = err.reason();
    agents
        .metrics
        .auth_failures
        .with_label_values(&[reason])
        .inc();
    match agents.log.check(reason) {
        Some(suppressed) => warn!(
            peer.addr = %peer,
            reason,
            suppressed,
            error = %err,
            "agent certificate refused: it carries no usable agent identity"
        ),
        None => debug!(reason, error = %err, "agent certificate refused"),
    }
    let why = format!("agent certificate refused: {err}");
    refuse(
        tls,
        http::StatusCode::FORBIDDEN,
        &why,
        agents.handshake_timeout,
    )
    .await;
    None
}

/// Serves the connection's HTTP requests with the upgrade router until a route hands the
/// upgraded WebSocket back (or the connection ends without one, or `deadline` passes).
async fn upgrade(
    agents: &ListenerContext,
    tls: AgentTls,
    peer: SocketAddr,
    agent_id: Option<&str>,
    deadline: Instant,
) -> Option<UpgradedAgent> {
    let (handoff_tx, handoff_rx) = oneshot::channel();
    let facts = ConnFacts {
        agent_id: agent_id.map(Arc::from),
        peer_addr: peer,
        handoff: Arc::new(Mutex::new(Some(handoff_tx))),
    };
    let router = agents.router.clone();
    let service = hyper::service::service_fn(move |mut req: http::Request<_>| {
        req.extensions_mut().insert(facts.clone());
        router.clone().oneshot(req)
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(agents.handshake_timeout)
        .max_buf_size(MAX_HTTP_BUF);
    let http = builder
        .serve_connection(TokioIo::new(tls), service)
        .with_upgrades();
    match timeout_at(deadline, http).await {
        Err(_) => {
            agents.handshake_failed("upgrade_timeout");
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
    match timeout(agents.handshake_timeout, handoff_rx).await {
        Ok(Ok(upgraded)) => Some(upgraded),
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
