//! The certificate a TLS peer presented, kept for the caller even when the handshake fails:
//! rustls forgets a refused chain, but the operator wants to know *which* agent (or *which*
//! server) was refused and why. A verifier wrapper records the end-entity certificate into a
//! slot scoped to the handshake's task ([`capture`]); outside such a scope it records nothing.

use std::cell::RefCell;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

tokio::task_local! {
    static PRESENTED: RefCell<Option<CertificateDer<'static>>>;
}

/// Runs `handshake` and returns its output with the end-entity certificate the peer presented
/// during it (if the config's verifier is a [`RecordingClientVerifier`] and the peer sent one).
/// The verifier runs inside the handshake future's poll, so the slot is this task's.
pub async fn capture<F: Future>(handshake: F) -> (F::Output, Option<CertificateDer<'static>>) {
    PRESENTED
        .scope(RefCell::new(None), async {
            let output = handshake.await;
            let presented = PRESENTED.with(|slot| slot.borrow_mut().take());
            (output, presented)
        })
        .await
}

fn record(end_entity: &CertificateDer<'_>) {
    // Outside `capture` (tests, reverification of live chains) there is no slot: nothing to do.
    let _ = PRESENTED.try_with(|slot| *slot.borrow_mut() = Some(end_entity.clone().into_owned()));
}

/// A client-certificate verifier that records what it was shown, then defers to `inner`.
#[derive(Debug)]
pub struct RecordingClientVerifier(pub Arc<dyn ClientCertVerifier>);

impl ClientCertVerifier for RecordingClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.0.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.0.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.0.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        record(end_entity);
        self.0.verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }

    fn requires_raw_public_keys(&self) -> bool {
        self.0.requires_raw_public_keys()
    }
}

/// A server-certificate verifier that keeps the chain it was shown (for `tether doctor`, which
/// explains a refused server certificate), then defers to `inner`.
#[derive(Debug)]
pub struct RecordingServerVerifier {
    inner: Arc<dyn ServerCertVerifier>,
    seen: Mutex<Vec<CertificateDer<'static>>>,
}

impl RecordingServerVerifier {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn ServerCertVerifier>) -> Self {
        Self {
            inner,
            seen: Mutex::new(Vec::new()),
        }
    }

    /// The chain (end entity first) of the last verification, empty before one.
    pub fn seen(&self) -> Vec<CertificateDer<'static>> {
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl ServerCertVerifier for RecordingServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let chain = std::iter::once(end_entity)
            .chain(intermediates)
            .map(|c| c.clone().into_owned())
            .collect();
        *self.seen.lock().unwrap_or_else(PoisonError::into_inner) = chain;
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }

    fn requires_raw_public_keys(&self) -> bool {
        self.inner.requires_raw_public_keys()
    }

    fn root_hint_subjects(&self) -> Option<&[DistinguishedName]> {
        self.inner.root_hint_subjects()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// Outside `capture` nothing is recorded and nothing fails.
    #[test]
    fn recording_outside_capture_is_a_no_op() {
        record(&CertificateDer::from(vec![0x30, 0x00]));
        assert!(PRESENTED.try_with(|_| ()).is_err());
    }
}
