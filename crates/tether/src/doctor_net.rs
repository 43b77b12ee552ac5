//! `tether doctor`, agent side, one server address: TCP connect, the TLS handshake (who the
//! server is, whether its chain verifies against the pinned CA, the name, its expiry), the
//! WebSocket upgrade, and the server's verdict on this agent's identity. The upgrade carries
//! `X-Tether-Doctor`: the server runs its checks and answers without starting a session.

use std::net::SocketAddr;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, ServerName};
use tether_agent::AgentConfig;
use tether_agent::config::ServerUrl;
use tether_common::read_ahead::ReadAhead;
use tether_common::tls;
use tether_common::tls_presented::RecordingServerVerifier;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::Error as WsError;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};

use crate::doctor_report::{Report, expiry_step};
use crate::doctor_verdict;

/// Request header asking the server for its verdict instead of a session (the server's
/// `connect::DOCTOR_HEADER`).
const DOCTOR_HEADER: &str = "x-tether-doctor";

type Tls = TlsStream<ReadAhead<TcpStream>>;

pub(crate) async fn endpoint(
    report: &mut Report,
    config: &AgentConfig,
    url: &str,
    server: &ServerUrl,
    addr: SocketAddr,
) {
    let limit = config.connect_timeout.0;
    let tcp = match tokio::time::timeout(limit, TcpStream::connect(addr)).await {
        Ok(Ok(tcp)) => {
            report.ok("tcp", &format!("{addr} accepts connections"));
            tcp
        }
        Ok(Err(err)) if err.kind() == std::io::ErrorKind::ConnectionRefused => {
            report.fail(
                "tcp",
                &format!("{addr}: connection refused: nothing listens there"),
                "start the server (tether server), or make the port of server_url the \
                 server's `listen` port",
            );
            return;
        }
        Ok(Err(err)) => {
            report.fail(
                "tcp",
                &format!("{addr}: {err}"),
                "check the route and firewalls between this host and the server",
            );
            return;
        }
        Err(_) => {
            report.fail(
                "tcp",
                &format!(
                    "{addr}: no answer within connect_timeout ({})",
                    config.connect_timeout
                ),
                "a firewall drops the packets or the host is down: check the route and \
                 firewalls to the server's port",
            );
            return;
        }
    };
    let Some(tls) = handshake(report, config, server, tcp, addr).await else {
        return;
    };
    upgrade(report, config, url, tls, addr).await;
}

/// The agent's own TLS config, with a verifier that keeps the server's chain for the report.
fn client_config(
    config: &AgentConfig,
) -> anyhow::Result<(Arc<rustls::ClientConfig>, Arc<RecordingServerVerifier>)> {
    let files = config.tls_files();
    let mut client = (*tls::client_config(&files)?).clone();
    let mut roots = rustls::RootCertStore::empty();
    for cert in tls::load_certs(&files.server_ca)? {
        roots.add(cert)?;
    }
    let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        tls::crypto_provider(),
    )
    .build()?;
    let recorder = Arc::new(RecordingServerVerifier::new(webpki));
    client
        .dangerous()
        .set_certificate_verifier(recorder.clone());
    Ok((Arc::new(client), recorder))
}

async fn handshake(
    report: &mut Report,
    config: &AgentConfig,
    server: &ServerUrl,
    tcp: TcpStream,
    addr: SocketAddr,
) -> Option<Tls> {
    let (client, recorder) = match client_config(config) {
        Ok(pair) => pair,
        Err(err) => {
            report.fail(
                "tls",
                &format!("cannot load the agent's TLS material: {err:#}"),
                "fix the files of the cert, key and ca steps above",
            );
            return None;
        }
    };
    let name = match server.tls_name(&config.server_name) {
        Ok(name) => name,
        Err(message) => {
            report.fail(
                "tls",
                &message,
                "fix server_name (or the host of server_url)",
            );
            return None;
        }
    };
    let connect =
        tokio_rustls::TlsConnector::from(client).connect(name.clone(), ReadAhead::new(tcp));
    let result = tokio::time::timeout(config.connect_timeout.0, connect).await;
    let seen = recorder.seen();
    match result {
        Ok(Ok(tls)) => {
            server_certificate_ok(report, &name, &seen);
            Some(tls)
        }
        Ok(Err(err)) => {
            let (text, fix) = doctor_verdict::explain_handshake(&err, &name, &seen, config);
            report.fail("tls", &format!("{addr}: {text}"), &fix);
            None
        }
        Err(_) => {
            report.fail(
                "tls",
                &format!("{addr}: no TLS handshake within connect_timeout"),
                "is this port the tether server's `listen` (and not a plain HTTP port)?",
            );
            None
        }
    }
}

fn server_certificate_ok(
    report: &mut Report,
    name: &ServerName<'_>,
    seen: &[CertificateDer<'static>],
) {
    let Some(info) = seen.first().and_then(|der| doctor_verdict::describe(der)) else {
        report.ok("tls", "handshake done");
        return;
    };
    report.ok(
        "tls",
        &format!(
            "server \"{}\" verified against tls.server_ca (issuer {}), valid for name \"{}\"",
            info.subject,
            info.issuer,
            name.to_str()
        ),
    );
    expiry_step(
        report,
        "tls",
        "the server certificate",
        (info.not_before, info.not_after),
        "renew the server certificate on the server (tether certs renew)",
    );
}

async fn upgrade(report: &mut Report, config: &AgentConfig, url: &str, tls: Tls, addr: SocketAddr) {
    let request = match request(config, url) {
        Ok(request) => request,
        Err(message) => {
            report.fail("upgrade", &message, "fix server_url and headers");
            return;
        }
    };
    let exchange = tokio_tungstenite::client_async(request, tls);
    let outcome = match tokio::time::timeout(config.connect_timeout.0, exchange).await {
        Ok(outcome) => outcome,
        Err(_) => {
            report.fail(
                "upgrade",
                &format!("{addr}: no answer to the WebSocket upgrade within connect_timeout"),
                "the server accepted TLS but did not answer HTTP: is it a tether server?",
            );
            return;
        }
    };
    match outcome {
        Ok((mut socket, response)) => {
            // A server without dry runs upgraded for real: leave at once.
            let _ = tokio::time::timeout(config.connect_timeout.0, socket.close(None)).await;
            report.ok("upgrade", &format!("{addr}: HTTP {}", response.status()));
            report.ok(
                "verdict",
                "accepted: the server opened a session (closed again at once; this server \
                 does not know doctor dry runs)",
            );
        }
        Err(WsError::Http(response)) => {
            let status = response.status();
            let body = response
                .body()
                .as_deref()
                .map(|b| {
                    String::from_utf8_lossy(&b[..b.len().min(300)])
                        .trim()
                        .to_owned()
                })
                .unwrap_or_default();
            let server_id = response
                .headers()
                .get("x-tether-server")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            doctor_verdict::http_verdict(report, addr, status, &body, &server_id, url);
        }
        Err(WsError::Io(err)) => doctor_verdict::io_verdict(report, addr, &err, config),
        Err(other) => report.fail(
            "upgrade",
            &format!("{addr}: {other}"),
            "is server_url the tether server's /v1/connect?",
        ),
    }
}

fn request(
    config: &AgentConfig,
    url: &str,
) -> Result<tokio_tungstenite::tungstenite::handshake::client::Request, String> {
    let mut request = url
        .into_client_request()
        .map_err(|e| format!("cannot build the upgrade request for {url}: {e}"))?;
    let headers = request.headers_mut();
    if config.protocol == tether_agent::AgentProtocol::Tether {
        headers.insert(
            "sec-websocket-protocol",
            HeaderValue::from_static(tether_agent::connector::SUBPROTOCOL),
        );
    }
    for (name, value) in &config.headers {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            headers.insert(name, value);
        }
    }
    headers.insert(DOCTOR_HEADER, HeaderValue::from_static("1"));
    Ok(request)
}
