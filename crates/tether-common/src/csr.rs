//! Enrollment certificates: the agent's new key and its signing request (the key never leaves
//! the host), the signing of a request with the identity a join token names (never one the
//! request chose), and the SHA-256 pin of a CA certificate (`enroll.ca_sha256`).

use rcgen::{
    CertificateParams, CertificateSigningRequestParams, ExtendedKeyUsagePurpose, KeyPair, SanType,
};

use crate::identity::{AGENT_URI_PREFIX, validate_agent_id};
use crate::pki::{Ca, IssueOptions, PkiError, dn, ia5, leaf_params, rcgen_err};

/// Common name of an agent's signing request: a placeholder, the identity comes from the
/// server (the join token, or the certificate being renewed).
pub const CSR_COMMON_NAME: &str = "tether agent";

/// Longest signing request accepted (PEM text).
pub const MAX_CSR_PEM: usize = 16 * 1024;

/// A new private key and a signing request for it, both PEM.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyAndCsr {
    /// The PKCS#8 private key: write it with mode 0600, never send it.
    pub key_pem: String,
    /// The PKCS#10 signing request.
    pub csr_pem: String,
}

impl std::fmt::Debug for KeyAndCsr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyAndCsr")
            .field("key_pem", &"<redacted>")
            .field("csr_pem", &self.csr_pem)
            .finish()
    }
}

/// A new ECDSA P-256 key and a request that names no identity.
pub fn new_key_and_csr() -> Result<KeyAndCsr, PkiError> {
    let key = KeyPair::generate().map_err(rcgen_err("generate a key"))?;
    let csr_pem = csr_for(&key, None)?;
    Ok(KeyAndCsr {
        key_pem: key.serialize_pem(),
        csr_pem,
    })
}

/// A signing request for the key `key_pem` that asks for agent id `asks_for` (tests of the
/// server's refusal), or for nothing.
pub fn csr_for_key(key_pem: &str, asks_for: Option<&str>) -> Result<String, PkiError> {
    let key = KeyPair::from_pem(key_pem).map_err(|e| PkiError::Csr(format!("bad key: {e}")))?;
    csr_for(&key, asks_for)
}

fn csr_for(key: &KeyPair, asks_for: Option<&str>) -> Result<String, PkiError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = dn(asks_for.unwrap_or(CSR_COMMON_NAME));
    if let Some(id) = asks_for {
        params.subject_alt_names = vec![SanType::URI(ia5(&format!("{AGENT_URI_PREFIX}{id}"))?)];
    }
    params
        .serialize_request(key)
        .map_err(rcgen_err("make the signing request"))?
        .pem()
        .map_err(rcgen_err("encode the signing request"))
}

/// Parses a signing request and checks its signature (proof that the requester holds the key).
pub fn parse_csr(csr_pem: &str) -> Result<CertificateSigningRequestParams, PkiError> {
    if csr_pem.len() > MAX_CSR_PEM {
        return Err(PkiError::Csr(format!(
            "it is {} bytes long; at most {MAX_CSR_PEM}",
            csr_pem.len()
        )));
    }
    CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| {
        PkiError::Csr(format!(
            "not a PEM PKCS#10 request with a valid signature: {e}"
        ))
    })
}

/// Checks that a request asks for no identity, or for exactly agent `agent_id`: no other URI,
/// DNS or IP name, and a common name that is the placeholder or the id.
pub fn check_requested_identity(
    csr: &CertificateSigningRequestParams,
    agent_id: &str,
) -> Result<(), PkiError> {
    let wanted = format!("{AGENT_URI_PREFIX}{agent_id}");
    for san in &csr.params.subject_alt_names {
        let asked = match san {
            SanType::URI(uri) if uri.as_str() == wanted => continue,
            SanType::URI(uri) => uri.as_str().to_owned(),
            SanType::DnsName(name) => format!("DNS name {}", name.as_str()),
            SanType::IpAddress(ip) => format!("IP address {ip}"),
            other => format!("{other:?}"),
        };
        return Err(refused_identity(&asked, agent_id));
    }
    let cn = csr
        .params
        .distinguished_name
        .get(&rcgen::DnType::CommonName)
        .map(|value| dn_text(value).unwrap_or_else(|| "(not text)".to_owned()));
    match cn.as_deref() {
        None | Some(CSR_COMMON_NAME) => Ok(()),
        Some(cn) if cn == agent_id => Ok(()),
        Some(cn) => Err(refused_identity(&format!("common name {cn}"), agent_id)),
    }
}

fn dn_text(value: &rcgen::DnValue) -> Option<String> {
    match value {
        rcgen::DnValue::Utf8String(s) => Some(s.clone()),
        rcgen::DnValue::PrintableString(s) => Some(s.as_str().to_owned()),
        rcgen::DnValue::Ia5String(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

fn refused_identity(asked: &str, agent_id: &str) -> PkiError {
    let asked: String = asked.chars().take(200).collect();
    PkiError::Csr(format!(
        "it asks for `{asked}`, but this credential is for agent \"{agent_id}\" \
         (the server sets the identity; send a request without names)"
    ))
}

impl Ca {
    /// Signs an agent certificate for the key of `csr_pem` with identity `agent_id` (the one
    /// the join token or the renewed certificate names), after checking the request's
    /// signature and that it asks for no other identity. Returns the certificate, PEM.
    pub fn sign_agent_csr(
        &self,
        agent_id: &str,
        csr_pem: &str,
        opts: &IssueOptions,
    ) -> Result<String, PkiError> {
        validate_agent_id(agent_id)?;
        let csr = parse_csr(csr_pem)?;
        check_requested_identity(&csr, agent_id)?;
        let sans = vec![SanType::URI(ia5(&format!("{AGENT_URI_PREFIX}{agent_id}"))?)];
        let params = leaf_params(agent_id, sans, &[ExtendedKeyUsagePurpose::ClientAuth], opts)?;
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(rcgen_err("sign the agent certificate"))?;
        Ok(cert.pem())
    }
}

// === the CA pin ===

/// The SHA-256 of a certificate's DER, as 64 lowercase hex digits (`enroll.ca_sha256`).
pub fn cert_sha256(der: &[u8]) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses a pin: 64 hex digits, optionally prefixed `sha256:` and with `:` between bytes
/// (as `openssl x509 -fingerprint -sha256` prints it). Returns the lowercase hex form.
pub fn parse_pin(text: &str) -> Result<String, String> {
    let trimmed = text.trim();
    let bare = trimmed
        .strip_prefix("sha256:")
        .or_else(|| trimmed.strip_prefix("SHA256:"))
        .unwrap_or(trimmed);
    let hex: String = bare.chars().filter(|c| *c != ':').collect();
    if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!(
            "`{}` is not a SHA-256 fingerprint (64 hex digits, e.g. from \
             `tether certs inspect ca.pem`)",
            trimmed.chars().take(100).collect::<String>()
        ));
    }
    Ok(hex.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::identity::{IdentityMode, agent_id_from_cert};
    use crate::tls::certs_from_pem;

    #[test]
    fn signed_certificate_carries_the_given_identity_and_the_requesters_key() {
        let ca = Ca::generate("test CA").unwrap();
        let req = new_key_and_csr().unwrap();
        let cert_pem = ca
            .sign_agent_csr("edge-7", &req.csr_pem, &IssueOptions::default())
            .unwrap();
        let der = certs_from_pem(&cert_pem).unwrap().remove(0);
        assert_eq!(
            agent_id_from_cert(&der, IdentityMode::UriSan).unwrap(),
            "edge-7"
        );
        // The certificate and the agent's own key belong together.
        let key = crate::tls::key_from_pem(&req.key_pem).unwrap();
        rustls::sign::CertifiedKey::from_der(vec![der], key, &crate::tls::crypto_provider())
            .unwrap();
        assert!(!format!("{req:?}").contains("PRIVATE KEY"));
    }

    #[test]
    fn a_request_for_another_identity_is_refused() {
        let ca = Ca::generate("test CA").unwrap();
        let req = new_key_and_csr().unwrap();
        let other = csr_for_key(&req.key_pem, Some("edge-8")).unwrap();
        let err = ca
            .sign_agent_csr("edge-7", &other, &IssueOptions::default())
            .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("tether://agent/edge-8") && text.contains("\"edge-7\""),
            "{text}"
        );
        // Asking for exactly the token's id is fine.
        let same = csr_for_key(&req.key_pem, Some("edge-7")).unwrap();
        ca.sign_agent_csr("edge-7", &same, &IssueOptions::default())
            .unwrap();
    }

    #[test]
    fn garbage_and_oversized_requests_are_refused() {
        let ca = Ca::generate("test CA").unwrap();
        let opts = IssueOptions::default();
        let err = ca.sign_agent_csr("edge-7", "junk", &opts).unwrap_err();
        assert!(err.to_string().contains("PKCS#10"), "{err}");
        let huge = "x".repeat(MAX_CSR_PEM + 1);
        let err = ca.sign_agent_csr("edge-7", &huge, &opts).unwrap_err();
        assert!(err.to_string().contains("at most"), "{err}");
        let req = new_key_and_csr().unwrap();
        assert!(ca.sign_agent_csr("bad id", &req.csr_pem, &opts).is_err());
    }

    #[test]
    fn pins_parse_in_the_usual_spellings() {
        let der = b"certificate bytes";
        let hex = cert_sha256(der);
        assert_eq!(hex.len(), 64);
        assert_eq!(parse_pin(&hex).unwrap(), hex);
        assert_eq!(parse_pin(&format!("sha256:{hex}")).unwrap(), hex);
        let colons: Vec<String> = hex
            .as_bytes()
            .chunks(2)
            .map(|p| String::from_utf8_lossy(p).to_uppercase())
            .collect();
        assert_eq!(parse_pin(&colons.join(":")).unwrap(), hex);
        assert!(parse_pin("abc").unwrap_err().contains("64 hex digits"));
    }
}
