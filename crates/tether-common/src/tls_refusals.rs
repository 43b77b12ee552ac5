//! Client certificates refused during the TLS handshake, logged with the agent id they carry
//! and the reason (revoked, expired, unknown issuer): a revoked agent's refused reconnect or
//! renewal says who it was, at warn once per reason and window, at debug otherwise.

use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use tracing::{debug, warn};

use crate::identity::{IdentityMode, agent_id_from_cert};
use crate::log_throttle::LogThrottle;
use crate::tls_check::refusal_reason;

/// How often one kind of refusal is logged at warn.
const LOG_WINDOW: Duration = Duration::from_secs(60);

/// A client-certificate verifier that logs what the one inside refuses.
#[derive(Debug)]
pub(crate) struct LoggedRefusals {
    inner: Arc<dyn ClientCertVerifier>,
    log: LogThrottle,
}

impl LoggedRefusals {
    pub(crate) fn wrap(inner: Arc<dyn ClientCertVerifier>) -> Arc<dyn ClientCertVerifier> {
        Arc::new(LoggedRefusals {
            inner,
            log: LogThrottle::new(LOG_WINDOW),
        })
    }

    fn note(&self, end_entity: &CertificateDer<'_>, err: &rustls::Error) {
        let reason = refusal_reason(err);
        let id =
            agent_id_from_cert(end_entity, IdentityMode::UriSan).unwrap_or_else(|_| "-".to_owned());
        match self.log.check(reason) {
            Some(suppressed) => warn!(
                agent.id = %id,
                reason,
                suppressed,
                error = %err,
                "client certificate refused at the TLS handshake"
            ),
            None => debug!(agent.id = %id, reason, "client certificate refused"),
        }
    }
}

impl ClientCertVerifier for LoggedRefusals {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)
            .inspect_err(|err| self.note(end_entity, err))
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
}
