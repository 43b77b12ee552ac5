//! Enrollment of an agent that has no certificate yet (`enroll:` in agent.yaml): a new key made
//! here (written 0600, never sent), the server's CA bundle fetched and checked against the
//! pinned SHA-256, then the join token and a CSR sent over TLS that trusts only the pinned CA;
//! the certificate that comes back (with the identity the token names) is written where
//! `tls.cert` and `tls.key` point, and the agent then connects as usual.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use tether_common::csr::{self, KeyAndCsr};
use tether_common::identity::{IdentityMode, agent_id_from_cert};
use tether_common::pki::{write_file_private, write_file_public};
use tether_common::tls::{self, certs_from_pem};
use tracing::{info, warn};

use crate::config::AgentConfig;
use crate::enroll_http::{self, EnrollTarget, HttpError};
use crate::enroll_tls;

/// The enrollment routes on the server's tunnel listener.
pub(crate) const ENROLL_CA_PATH: &str = "/v1/enroll/ca";
pub(crate) const ENROLL_PATH: &str = "/v1/enroll";
/// Delays between attempts while the server cannot be reached.
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);

/// Why enrollment (or a renewal) failed.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    /// The `enroll:` section or the token file is unusable.
    #[error("enroll: {0}")]
    Config(String),
    /// The server's CA does not match `enroll.ca_sha256`, or its certificate does not chain to
    /// the pinned CA: not the server this agent was told to trust.
    #[error("enroll.ca_sha256: {0}")]
    Pin(String),
    /// The server answered with a refusal (HTTP status and its reason).
    #[error("the server refused (HTTP {status}): {reason}")]
    Refused {
        /// The HTTP status.
        status: u16,
        /// The server's reason text.
        reason: String,
    },
    /// The server refused the TLS handshake (a revoked or unknown certificate on renewal).
    #[error("{0}")]
    TlsRefused(String),
    /// The server could not be reached or answered nonsense (retried).
    #[error("{0}")]
    Transport(String),
    /// The certificate or key could not be written, or the answer does not fit the key.
    #[error("{0}")]
    Files(String),
}

impl EnrollError {
    /// Whether trying again later may succeed (the server was unreachable or busy).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Transport(_) => true,
            Self::Refused { status, .. } => *status >= 500 || *status == 429,
            _ => false,
        }
    }

    /// A closed-set label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Refused { .. } | Self::TlsRefused(_) => "refused",
            Self::Pin(_) => "pin",
            _ => "error",
        }
    }
}

impl From<HttpError> for EnrollError {
    fn from(err: HttpError) -> Self {
        if err.is_tls_refusal() {
            EnrollError::TlsRefused(err.to_string())
        } else {
            EnrollError::Transport(err.to_string())
        }
    }
}

/// The server's answer to an enrollment or a renewal.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Issued {
    pub(crate) agent_id: String,
    pub(crate) certificate: String,
    pub(crate) not_after: i64,
}

#[derive(Serialize)]
struct EnrollRequest<'a> {
    token: &'a str,
    csr: &'a str,
}

/// What enrollment wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enrolled {
    /// The identity the certificate carries (the token's).
    pub agent_id: String,
    /// `notAfter` of the certificate, Unix seconds.
    pub not_after: i64,
}

/// Enrolls if `config` needs it ([`AgentConfig::needs_enrollment`]), retrying while the server
/// cannot be reached; a refusal (used or expired token, wrong pin, ...) ends it with the reason.
/// `Ok(None)` when the certificate is already there.
pub async fn enroll_if_needed(config: &AgentConfig) -> Result<Option<Enrolled>, EnrollError> {
    if !config.needs_enrollment() {
        return Ok(None);
    }
    let mut delay = RETRY_MIN;
    loop {
        match enroll(config).await {
            Ok(done) => return Ok(Some(done)),
            Err(err) if err.is_transient() => {
                warn!(error = %err, retry_in = ?delay, "enrollment failed; trying again");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(RETRY_MAX);
            }
            Err(err) => return Err(err),
        }
    }
}

/// One enrollment attempt.
pub async fn enroll(config: &AgentConfig) -> Result<Enrolled, EnrollError> {
    let section = config
        .enroll
        .as_ref()
        .ok_or_else(|| EnrollError::Config("no `enroll:` section".into()))?;
    let token = std::fs::read_to_string(&section.token_file)
        .map_err(|e| {
            EnrollError::Config(format!(
                "cannot read token_file {}: {e}",
                section.token_file.display()
            ))
        })?
        .trim()
        .to_owned();
    if token.is_empty() {
        return Err(EnrollError::Config(format!(
            "token_file {} holds no token",
            section.token_file.display()
        )));
    }
    let pin = csr::parse_pin(&section.ca_sha256).map_err(EnrollError::Pin)?;
    let target = EnrollTarget::of(config).map_err(EnrollError::Config)?;
    let (ca, ca_pem) = pinned_ca(&target, &pin).await?;
    let tls = enroll_tls::pinned(ca)
        .map_err(|e| EnrollError::Pin(format!("the pinned CA is unusable: {e}")))?;
    let KeyAndCsr { key_pem, csr_pem } =
        csr::new_key_and_csr().map_err(|e| EnrollError::Files(e.to_string()))?;
    let body = serde_json::to_vec(&EnrollRequest {
        token: &token,
        csr: &csr_pem,
    })
    .map_err(|e| EnrollError::Files(e.to_string()))?;
    let reply = match enroll_http::exchange(&target, tls, "POST", ENROLL_PATH, Some(&body)).await {
        Err(HttpError::Tls { reason, .. }) if reason.contains("UnknownIssuer") => {
            return Err(EnrollError::Pin(format!(
                "the server's certificate does not chain to the pinned CA ({reason})"
            )));
        }
        other => other?,
    };
    let issued = issued_from(reply)?;
    install(config, &key_pem, &issued)?;
    if !config.tls.server_ca.exists() {
        write_file_public(&config.tls.server_ca, &ca_pem)
            .map_err(|e| EnrollError::Files(e.to_string()))?;
    }
    info!(
        agent.id = %issued.agent_id,
        not_after = issued.not_after,
        cert = %config.tls.cert.display(),
        "enrolled: certificate issued for the join token's identity"
    );
    Ok(Enrolled {
        agent_id: issued.agent_id,
        not_after: issued.not_after,
    })
}

/// The CA certificate whose SHA-256 is `pin` (DER and PEM), from the bundle the server serves.
async fn pinned_ca(
    target: &EnrollTarget,
    pin: &str,
) -> Result<(CertificateDer<'static>, String), EnrollError> {
    let first_look =
        enroll_tls::first_look().map_err(|e| EnrollError::Transport(format!("TLS setup: {e}")))?;
    let reply = enroll_http::exchange(target, first_look, "GET", ENROLL_CA_PATH, None).await?;
    if reply.status != 200 {
        return Err(refused(reply.status, &reply.body));
    }
    let blocks = pem_blocks(&reply.body);
    let count = blocks.len();
    for block in blocks {
        let Ok(mut certs) = certs_from_pem(&block) else {
            continue;
        };
        let der = certs.remove(0);
        if csr::cert_sha256(&der) == pin {
            return Ok((der, block));
        }
    }
    Err(EnrollError::Pin(format!(
        "none of the {count} CA certificate(s) the server sent has the SHA-256 {pin}: \
         a wrong ca_sha256, or not the server this agent should trust"
    )))
}

/// Each `CERTIFICATE` block of a PEM text, as its own PEM text.
fn pem_blocks(text: &str) -> Vec<String> {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    text.split_inclusive(END)
        .filter_map(|part| {
            let start = part.find(BEGIN)?;
            part.ends_with(END).then(|| format!("{}\n", &part[start..]))
        })
        .collect()
}

pub(crate) fn refused(status: u16, body: &str) -> EnrollError {
    let reason: String = body.trim().chars().take(500).collect();
    EnrollError::Refused { status, reason }
}

/// The certificate of a 200 answer, or the refusal.
pub(crate) fn issued_from(reply: enroll_http::Reply) -> Result<Issued, EnrollError> {
    if reply.status != 200 {
        return Err(refused(reply.status, &reply.body));
    }
    serde_json::from_str(&reply.body).map_err(|e| {
        EnrollError::Transport(format!("the server's answer is not a certificate: {e}"))
    })
}

/// Checks that `issued` is a certificate for `key_pem` naming `issued.agent_id`, then writes
/// the key (0600) and the certificate, each aside and renamed over the configured path.
pub(crate) fn install(
    config: &AgentConfig,
    key_pem: &str,
    issued: &Issued,
) -> Result<(), EnrollError> {
    let files = |e: &dyn std::fmt::Display| EnrollError::Files(e.to_string());
    let chain = certs_from_pem(&issued.certificate).map_err(|e| files(&e))?;
    let key = tls::key_from_pem(key_pem).map_err(|e| files(&e))?;
    let leaf = chain
        .first()
        .cloned()
        .ok_or_else(|| files(&"no certificate"))?;
    rustls::sign::CertifiedKey::from_der(chain, key, &tls::crypto_provider())
        .map_err(|e| files(&format!("the issued certificate is not for our key: {e}")))?;
    let id = agent_id_from_cert(&leaf, IdentityMode::UriSan).map_err(|e| files(&e))?;
    if id != issued.agent_id {
        return Err(files(&format!(
            "the issued certificate names \"{id}\", the answer \"{}\"",
            issued.agent_id
        )));
    }
    replace(&config.tls.key, key_pem, true)?;
    replace(&config.tls.cert, &issued.certificate, false)
}

fn replace(path: &Path, contents: &str, private: bool) -> Result<(), EnrollError> {
    let mut aside = path.as_os_str().to_owned();
    aside.push(".tmp");
    let aside = PathBuf::from(aside);
    let written = if private {
        write_file_private(&aside, contents)
    } else {
        write_file_public(&aside, contents)
    };
    written.map_err(|e| EnrollError::Files(e.to_string()))?;
    std::fs::rename(&aside, path)
        .map_err(|e| EnrollError::Files(format!("cannot write {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn pem_blocks_split_a_bundle() {
        let a = tether_common::pki::Ca::generate("a").unwrap();
        let b = tether_common::pki::Ca::generate("b").unwrap();
        let bundle = format!("# comment\n{}\n{}", a.cert_pem(), b.cert_pem());
        let blocks = pem_blocks(&bundle);
        assert_eq!(blocks.len(), 2);
        assert_eq!(
            certs_from_pem(&blocks[1]).unwrap(),
            certs_from_pem(b.cert_pem()).unwrap()
        );
    }

    #[test]
    fn transient_and_permanent_errors() {
        assert!(EnrollError::Transport("x".into()).is_transient());
        assert!(refused(503, "busy").is_transient());
        assert!(!refused(403, "used").is_transient());
        assert!(!EnrollError::Pin("x".into()).is_transient());
        assert_eq!(refused(403, "x").label(), "refused");
    }
}
