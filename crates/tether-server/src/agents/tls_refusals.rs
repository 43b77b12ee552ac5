//! TLS handshakes refused over a certificate: the reason in words, a closed-set label for
//! `tether_tls_refusals_total{reason}`, and a record per client id (read from the presented
//! certificate, even one that did not verify) or, without a readable id, per source address.

use std::net::SocketAddr;

use prometheus::IntCounterVec;
use rustls::pki_types::CertificateDer;
use rustls::{AlertDescription, CertificateError};
use tether_common::identity::{IdentityMode, agent_id_from_cert};

use crate::agents::client_history::ClientHistory;

/// Labels of `tether_tls_refusals_total{reason}`.
pub const REASONS: [&str; 7] = [
    "expired",
    "not_yet_valid",
    "unknown_issuer",
    "revoked",
    "bad_certificate",
    "no_certificate",
    "client_refused_server",
];

/// A refusal worth telling the operator about: its label and its explanation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TlsRefusal {
    pub(crate) reason: &'static str,
    pub(crate) detail: String,
}

/// The refusal inside a failed TLS accept, or `None` for failures that say nothing about a
/// certificate (timeouts, a reset, a protocol mismatch, a port scan).
pub(crate) fn classify(err: &rustls::Error) -> Option<TlsRefusal> {
    let (reason, detail) = match err {
        rustls::Error::InvalidCertificate(cert) => certificate_refusal(cert),
        rustls::Error::NoCertificatesPresented => (
            "no_certificate",
            "the client presented no certificate; tether agents need one (tls.cert)".to_owned(),
        ),
        rustls::Error::AlertReceived(alert) => (
            "client_refused_server",
            format!(
                "the client ended the handshake with alert {}: it does not accept this \
                 server's certificate (a different CA pinned in its tls.server_ca, a name the \
                 certificate does not hold, or an expired server certificate)",
                alert_name(*alert)
            ),
        ),
        _ => return None,
    };
    Some(TlsRefusal { reason, detail })
}

fn certificate_refusal(err: &CertificateError) -> (&'static str, String) {
    match err {
        CertificateError::Expired | CertificateError::ExpiredContext { .. } => (
            "expired",
            format!("client certificate expired: {err}; renew it (tether certs renew)"),
        ),
        CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => (
            "not_yet_valid",
            format!("client certificate not valid yet: {err}; check the clocks"),
        ),
        CertificateError::UnknownIssuer => (
            "unknown_issuer",
            "client certificate not issued by a CA in tls.client_ca (unknown issuer)".to_owned(),
        ),
        // A CA of the same name (every `tether certs init` CA is "tether CA") signed it.
        CertificateError::BadSignature => (
            "unknown_issuer",
            "client certificate not issued by a CA in tls.client_ca (another CA of the same \
             name signed it: bad signature)"
                .to_owned(),
        ),
        CertificateError::Revoked => (
            "revoked",
            "client certificate revoked (listed in a CRL of tls.crls)".to_owned(),
        ),
        other => (
            "bad_certificate",
            format!("client certificate refused: {other}"),
        ),
    }
}

/// The TLS alert's name as the RFC spells it (`certificate_expired`), for operators.
pub fn alert_name(alert: AlertDescription) -> String {
    let debug = format!("{alert:?}");
    let mut name = String::with_capacity(debug.len() + 4);
    let mut prev_lower = false;
    for c in debug.chars() {
        if c.is_ascii_uppercase() && prev_lower {
            name.push('_');
        }
        prev_lower = c.is_ascii_lowercase();
        name.push(c.to_ascii_lowercase());
    }
    name
}

/// Counts `refusal` in `counter` (`tether_tls_refusals_total`) and remembers it under the agent id of `presented` when one can be read
/// from it (the certificate need not have verified), else under the peer's address.
pub(crate) fn record(
    refusal: &TlsRefusal,
    presented: Option<&CertificateDer<'_>>,
    identity: IdentityMode,
    peer: SocketAddr,
    counter: &IntCounterVec,
    history: &ClientHistory,
) -> Option<String> {
    counter.with_label_values(&[refusal.reason]).inc();
    let id = presented.and_then(|cert| agent_id_from_cert(cert, identity).ok());
    let peer_text = peer.to_string();
    match &id {
        Some(id) => history.refused(id, refusal.reason, &refusal.detail, &peer_text),
        None => history.refused_source(peer.ip(), refusal.reason, &refusal.detail, &peer_text),
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alerts_read_as_the_rfc_names_them() {
        assert_eq!(
            alert_name(AlertDescription::CertificateExpired),
            "certificate_expired"
        );
        assert_eq!(alert_name(AlertDescription::UnknownCA), "unknown_ca");
        assert_eq!(
            alert_name(AlertDescription::BadCertificate),
            "bad_certificate"
        );
    }

    #[test]
    fn only_certificate_failures_are_refusals() {
        let expired = classify(&rustls::Error::InvalidCertificate(
            CertificateError::Expired,
        ));
        assert_eq!(expired.map(|r| r.reason), Some("expired"));
        let alert = classify(&rustls::Error::AlertReceived(AlertDescription::UnknownCA));
        assert_eq!(alert.map(|r| r.reason), Some("client_refused_server"));
        assert_eq!(classify(&rustls::Error::HandshakeNotComplete), None);
        for reason in REASONS {
            assert!(!reason.is_empty());
        }
    }
}
