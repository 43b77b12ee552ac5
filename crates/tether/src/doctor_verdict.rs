//! `tether doctor`, agent side: what a failed handshake or the server's answer to the upgrade
//! means, in words, with the fix. The server's refusals of this agent's certificate arrive as
//! TLS alerts after the handshake (TLS 1.3), its refusals of the identity as HTTP answers.

use std::io;
use std::net::SocketAddr;

use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{AlertDescription, CertificateError};
use tether_agent::AgentConfig;
use tokio_tungstenite::tungstenite::http::StatusCode;
use x509_parser::extensions::GeneralName;

use crate::doctor_report::{Report, human_secs, now_unix};

/// What the report says about a certificate.
pub(crate) struct CertSummary {
    pub(crate) subject: String,
    pub(crate) issuer: String,
    pub(crate) not_before: i64,
    pub(crate) not_after: i64,
    /// DNS and IP names.
    pub(crate) names: Vec<String>,
}

pub(crate) fn describe(der: &CertificateDer<'_>) -> Option<CertSummary> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(d) => names.push((*d).to_owned()),
                GeneralName::IPAddress(b) if b.len() == 4 => {
                    let octets: [u8; 4] = (*b).try_into().unwrap_or_default();
                    names.push(std::net::IpAddr::from(octets).to_string());
                }
                GeneralName::IPAddress(b) if b.len() == 16 => {
                    let octets: [u8; 16] = (*b).try_into().unwrap_or_default();
                    names.push(std::net::IpAddr::from(octets).to_string());
                }
                _ => {}
            }
        }
    }
    Some(CertSummary {
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        names,
    })
}

fn rustls_error(err: &io::Error) -> Option<&rustls::Error> {
    err.get_ref()?.downcast_ref::<rustls::Error>()
}

/// A failed handshake: the reason and the fix.
pub(crate) fn explain_handshake(
    err: &io::Error,
    name: &ServerName<'_>,
    seen: &[CertificateDer<'static>],
    config: &AgentConfig,
) -> (String, String) {
    let server = seen.first().and_then(|der| describe(der));
    let who = server.as_ref().map_or_else(
        || "the server certificate".to_owned(),
        |s| format!("the server certificate \"{}\"", s.subject),
    );
    match rustls_error(err) {
        Some(rustls::Error::InvalidCertificate(cert)) => {
            bad_server_certificate(cert, &who, server.as_ref(), name, config)
        }
        Some(rustls::Error::AlertReceived(alert)) => refused_by_server(*alert, config),
        Some(other) => (
            format!("TLS handshake failed: {other}"),
            "is this port the tether server's `listen`?".to_owned(),
        ),
        None => (
            format!("TLS handshake failed: {err}"),
            "is this port the tether server's `listen` (and not a plain HTTP port)?".to_owned(),
        ),
    }
}

/// The agent refused the server's certificate (`cert`): why, and the fix.
fn bad_server_certificate(
    cert: &CertificateError,
    who: &str,
    server: Option<&CertSummary>,
    name: &ServerName<'_>,
    config: &AgentConfig,
) -> (String, String) {
    let ca = config.tls.server_ca.display();
    match cert {
        CertificateError::UnknownIssuer | CertificateError::BadSignature => (
            format!(
                "{who} is not signed by the pinned CA: its issuer \"{}\" is {} in \
                 tls.server_ca ({ca}) ({})",
                server.map_or("?", |s| s.issuer.as_str()),
                if *cert == CertificateError::BadSignature {
                    "another CA of the same name as the one"
                } else {
                    "not a CA"
                },
                if *cert == CertificateError::BadSignature {
                    "bad signature"
                } else {
                    "unknown issuer"
                }
            ),
            format!(
                "tls.server_ca must be the ca.pem of the CA that issued the server \
                 certificate: copy it from the server's CA directory (`tether certs \
                 inspect {ca}` shows which CA it is)"
            ),
        ),
        CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => (
            format!(
                "{who} is not valid for the name \"{}\" (name mismatch): it holds [{}]",
                name.to_str(),
                server
                    .as_ref()
                    .map_or(String::new(), |s| s.names.join(", "))
            ),
            "dial a name the certificate holds (server_url's host, or server_name), or \
             reissue the server certificate with that name (tether certs init --dns NAME \
             / --ip ADDR)"
                .to_owned(),
        ),
        CertificateError::Expired | CertificateError::ExpiredContext { .. } => (
            format!(
                "{who} expired{} (certificate expired)",
                server.map_or(String::new(), |s| format!(
                    " at {}, {} ago",
                    tether_common::tls_check::rfc3339(s.not_after),
                    human_secs(now_unix() - s.not_after)
                ))
            ),
            "renew the server certificate on the server (tether certs renew --dir CA_DIR \
             --cert server.pem --key server-key.pem); the server picks it up without a \
             restart"
                .to_owned(),
        ),
        CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => (
            format!("{who} is not valid yet (a clock is wrong)"),
            "check the clocks of this host and of the server (NTP)".to_owned(),
        ),
        other => (
            format!("{who} was refused: {other}"),
            "check the server certificate with tether certs inspect".to_owned(),
        ),
    }
}

/// The server ended the handshake with `alert`: it refused this agent's certificate.
fn refused_by_server(alert: AlertDescription, config: &AgentConfig) -> (String, String) {
    let name = tether_server::tls_refusals::alert_name(alert);
    let cert = config.tls.cert.display();
    let (what, fix) = match alert {
        AlertDescription::CertificateExpired => (
            "this agent's certificate has expired".to_owned(),
            format!("renew it: tether certs renew --dir CA_DIR --cert {cert} --key KEY"),
        ),
        AlertDescription::UnknownCA => (
            "this agent's certificate is not issued by a CA the server trusts (its \
             tls.client_ca)"
                .to_owned(),
            "issue the agent certificate with the server's CA (tether certs issue --dir \
             CA_DIR --agent ID), or add this CA to the server's tls.client_ca"
                .to_owned(),
        ),
        // A CA of the same name signed it (the signature does not verify).
        AlertDescription::DecryptError => (
            "this agent's certificate is not signed by the CA the server trusts (another CA \
             of the same name signed it)"
                .to_owned(),
            "issue the agent certificate with the server's CA (tether certs issue --dir \
             CA_DIR --agent ID)"
                .to_owned(),
        ),
        AlertDescription::CertificateRevoked => (
            "this agent's certificate is revoked (in the server's CRL)".to_owned(),
            "issue a new certificate for this agent (tether certs issue)".to_owned(),
        ),
        AlertDescription::CertificateRequired => (
            "the server requires a client certificate".to_owned(),
            "set tls.cert and tls.key".to_owned(),
        ),
        _ => (
            "the server refused the TLS session".to_owned(),
            "`tether status ID` on the server shows its reason".to_owned(),
        ),
    };
    (format!("{what} (TLS alert {name} from the server)"), fix)
}

/// The server's HTTP answer to the dry-run upgrade.
pub(crate) fn http_verdict(
    report: &mut Report,
    addr: SocketAddr,
    status: StatusCode,
    body: &str,
    server_id: &str,
    url: &str,
) {
    let said = if body.is_empty() {
        format!("HTTP {status}")
    } else {
        format!("HTTP {status}: {body}")
    };
    match status {
        StatusCode::OK => {
            report.ok("upgrade", &format!("{addr}: /v1/connect answers"));
            let from = if server_id.is_empty() {
                String::new()
            } else {
                format!(" (server {server_id})")
            };
            report.ok("verdict", &format!("{body}{from}"));
        }
        StatusCode::FORBIDDEN | StatusCode::UNAUTHORIZED => {
            report.ok("upgrade", &format!("{addr}: /v1/connect answers"));
            let fix = if body.contains("not allowed") {
                "add this agent's id to the server's allowed_agents (applied on reload), or use \
                 the certificate of an allowed id"
            } else {
                "present the agent certificate (tls.cert, tls.key) the server's CA issued"
            };
            report.fail("verdict", &format!("refused: {said}"), fix);
        }
        StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS => {
            report.ok("upgrade", &format!("{addr}: /v1/connect answers"));
            report.fail(
                "verdict",
                &format!("not now: {said}"),
                "the server is at max_agents or shutting down: raise max_agents or retry",
            );
        }
        StatusCode::NOT_FOUND => report.fail(
            "upgrade",
            &format!("{addr}: {said}: no such path ({url})"),
            "server_url's path must be the server's /v1/connect (or its remotedialer path with \
             protocol: remotedialer)",
        ),
        _ => report.fail(
            "upgrade",
            &format!("{addr}: {said}"),
            "is server_url the tether server's /v1/connect, and `protocol` right?",
        ),
    }
}

/// The upgrade failed below HTTP: usually the server's TLS alert refusing our certificate.
pub(crate) fn io_verdict(
    report: &mut Report,
    addr: SocketAddr,
    err: &io::Error,
    config: &AgentConfig,
) {
    match rustls_error(err) {
        Some(rustls::Error::AlertReceived(alert)) => {
            report.skip("upgrade", "the server refused the TLS session first");
            let (text, fix) = refused_by_server(*alert, config);
            report.fail("verdict", &format!("{addr}: {text}"), &fix);
        }
        _ => report.fail(
            "upgrade",
            &format!("{addr}: the connection failed during the upgrade: {err}"),
            "the server closed the connection: `tether status ID` on the server (or its log) \
             says why",
        ),
    }
}
