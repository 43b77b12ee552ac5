//! Strict loading of TLS material for reloads (every file read once, expired leaves and CA
//! bundles holding leaves refused, a fingerprint of the bytes to tell an unchanged set), and
//! the re-verification of a live session's certificate chain against a new verifier.

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use rustls::server::danger::ClientCertVerifier;
use rustls_pki_types::{CertificateDer, UnixTime};

use crate::tls::{
    self, ClientCertPolicy, ClientTlsFiles, Origins, ServerTls, ServerTlsFiles, TlsError,
};

/// Server material loaded and checked by [`load_server_tls`].
#[derive(Debug, Clone)]
pub struct LoadedServerTls {
    /// The config and verifier.
    pub tls: ServerTls,
    /// The server's certificate chain (for the expiry gauge).
    pub cert_chain: Vec<CertificateDer<'static>>,
    /// The client CA bundle (for the expiry gauge).
    pub client_cas: Vec<CertificateDer<'static>>,
    /// A hash of every file's bytes: equal fingerprints mean unchanged material.
    pub fingerprint: u64,
}

/// Agent material loaded and checked by [`load_client_tls`].
#[derive(Debug, Clone)]
pub struct LoadedClientTls {
    /// The config for new handshakes.
    pub config: Arc<rustls::ClientConfig>,
    /// The agent's certificate chain (for the expiry gauge and the expiry warning).
    pub cert_chain: Vec<CertificateDer<'static>>,
    /// The pinned server CA bundle.
    pub server_cas: Vec<CertificateDer<'static>>,
    /// A hash of every file's bytes.
    pub fingerprint: u64,
}

/// Loads the server's material as a reload does: each file read once; a certificate that has
/// expired, a CA bundle holding a non-CA certificate, a key that does not match the
/// certificate, an empty or unparsable file, a directory or a missing file are refused with
/// the file and the reason.
pub fn load_server_tls(
    files: &ServerTlsFiles,
    policy: ClientCertPolicy,
) -> Result<LoadedServerTls, TlsError> {
    let cert_text = tls::read(&files.cert)?;
    let key_text = tls::read(&files.key)?;
    let ca_text = tls::read(&files.client_ca)?;
    let (cert_name, key_name, ca_name) = (
        files.cert.display().to_string(),
        files.key.display().to_string(),
        files.client_ca.display().to_string(),
    );
    let cert_chain = tls::parse_certs(&cert_text, &cert_name)?;
    let key = tls::parse_key(&key_text, &key_name)?;
    let client_cas = tls::parse_certs(&ca_text, &ca_name)?;
    check_leaf(&cert_chain[0], &cert_name)?;
    check_ca_bundle(&client_cas, &ca_name)?;
    let mut crls = Vec::new();
    let mut crl_texts = Vec::new();
    for path in &files.crls {
        let text = tls::read(path)?;
        crls.extend(tls::parse_crls(&text, &path.display().to_string())?);
        crl_texts.push(text);
    }
    let mut texts = vec![&cert_text, &key_text, &ca_text];
    texts.extend(crl_texts.iter());
    let fingerprint = fingerprint(&texts);
    let mut ca_origin = ca_name;
    if !files.crls.is_empty() {
        let names: Vec<String> = files.crls.iter().map(|p| p.display().to_string()).collect();
        ca_origin = format!("{ca_origin} with CRLs {}", names.join(", "));
    }
    let tls = tls::build_server_tls(
        cert_chain.clone(),
        key,
        client_cas.clone(),
        crls,
        policy,
        &Origins {
            identity: format!("{cert_name} / {key_name}"),
            ca: ca_origin,
        },
    )?;
    Ok(LoadedServerTls {
        tls,
        cert_chain,
        client_cas,
        fingerprint,
    })
}

/// Loads the agent's material as a reload does, with the checks of [`load_server_tls`].
pub fn load_client_tls(files: &ClientTlsFiles) -> Result<LoadedClientTls, TlsError> {
    let cert_text = tls::read(&files.cert)?;
    let key_text = tls::read(&files.key)?;
    let ca_text = tls::read(&files.server_ca)?;
    let (cert_name, key_name, ca_name) = (
        files.cert.display().to_string(),
        files.key.display().to_string(),
        files.server_ca.display().to_string(),
    );
    let cert_chain = tls::parse_certs(&cert_text, &cert_name)?;
    let key = tls::parse_key(&key_text, &key_name)?;
    let server_cas = tls::parse_certs(&ca_text, &ca_name)?;
    check_leaf(&cert_chain[0], &cert_name)?;
    check_ca_bundle(&server_cas, &ca_name)?;
    let fingerprint = fingerprint(&[&cert_text, &key_text, &ca_text]);
    let config = tls::build_client_config(
        cert_chain.clone(),
        key,
        server_cas.clone(),
        &Origins {
            identity: format!("{cert_name} / {key_name}"),
            ca: ca_name,
        },
    )?;
    Ok(LoadedClientTls {
        config,
        cert_chain,
        server_cas,
        fingerprint,
    })
}

/// The fingerprint [`load_server_tls`] computes, from the files as they are now; `None` if one
/// cannot be read. Lets a daemon that loaded its material otherwise tell an unchanged set.
pub fn server_files_fingerprint(files: &ServerTlsFiles) -> Option<u64> {
    let mut texts = Vec::new();
    for path in [&files.cert, &files.key, &files.client_ca]
        .into_iter()
        .chain(files.crls.iter())
    {
        texts.push(tls::read(path).ok()?);
    }
    Some(fingerprint(&texts.iter().collect::<Vec<_>>()))
}

/// The fingerprint [`load_client_tls`] computes, from the files as they are now.
pub fn client_files_fingerprint(files: &ClientTlsFiles) -> Option<u64> {
    let mut texts = Vec::new();
    for path in [&files.cert, &files.key, &files.server_ca] {
        texts.push(tls::read(path).ok()?);
    }
    Some(fingerprint(&texts.iter().collect::<Vec<_>>()))
}

fn fingerprint(texts: &[&Vec<u8>]) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for text in texts {
        text.hash(&mut hasher);
    }
    hasher.finish()
}

fn parse<'a>(
    der: &'a CertificateDer<'_>,
) -> Result<x509_parser::certificate::X509Certificate<'a>, TlsError> {
    x509_parser::parse_x509_certificate(der)
        .map(|(_, cert)| cert)
        .map_err(|e| TlsError::BadCertificate(e.to_string()))
}

/// `notBefore` and `notAfter` of a DER certificate, Unix seconds.
pub fn cert_validity(der: &CertificateDer<'_>) -> Result<(i64, i64), TlsError> {
    let cert = parse(der)?;
    Ok((
        cert.validity().not_before.timestamp(),
        cert.validity().not_after.timestamp(),
    ))
}

/// A Unix time as RFC 3339 UTC text (the number itself if it is out of range).
pub fn rfc3339(t: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(t)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| t.to_string())
}

/// Refuses a certificate whose validity has ended.
pub fn check_leaf(der: &CertificateDer<'_>, origin: &str) -> Result<(), TlsError> {
    let cert = parse(der)?;
    let not_after = cert.validity().not_after.timestamp();
    if not_after <= time::OffsetDateTime::now_utc().unix_timestamp() {
        return Err(TlsError::Expired {
            origin: origin.to_owned(),
            subject: cert.subject().to_string(),
            not_after,
        });
    }
    Ok(())
}

/// Refuses a CA bundle holding a certificate that is not a CA.
pub fn check_ca_bundle(certs: &[CertificateDer<'_>], origin: &str) -> Result<(), TlsError> {
    for der in certs {
        let cert = parse(der)?;
        if !cert.is_ca() {
            return Err(TlsError::NotACa {
                origin: origin.to_owned(),
                subject: cert.subject().to_string(),
            });
        }
    }
    Ok(())
}

/// Why a live session's certificate chain no longer verifies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// A closed-set label: `revoked`, `unknown_issuer`, `expired`, `bad_certificate`.
    pub reason: &'static str,
    /// The verifier's message.
    pub detail: String,
}

/// Verifies `chain` (end entity first) again with `verifier`, as a new handshake would now.
pub fn reverify(
    verifier: &dyn ClientCertVerifier,
    chain: &[CertificateDer<'static>],
) -> Result<(), Refusal> {
    let Some((end_entity, intermediates)) = chain.split_first() else {
        return Err(Refusal {
            reason: "bad_certificate",
            detail: "no certificate".into(),
        });
    };
    match verifier.verify_client_cert(end_entity, intermediates, UnixTime::now()) {
        Ok(_) => Ok(()),
        Err(err) => Err(Refusal {
            reason: refusal_reason(&err),
            detail: err.to_string(),
        }),
    }
}

/// A closed-set label for a refused client certificate: revoked, unknown_issuer, expired or
/// bad_certificate.
pub(crate) fn refusal_reason(err: &rustls::Error) -> &'static str {
    use rustls::CertificateError as E;
    match err {
        rustls::Error::InvalidCertificate(E::Revoked) => "revoked",
        rustls::Error::InvalidCertificate(E::UnknownIssuer) => "unknown_issuer",
        rustls::Error::InvalidCertificate(E::Expired | E::ExpiredContext { .. }) => "expired",
        _ => "bad_certificate",
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::pki::{Ca, IssueOptions};
    use std::path::Path;

    fn write(path: &Path, text: &str) {
        std::fs::write(path, text).unwrap();
    }

    #[test]
    fn reload_loading_refuses_bad_material_naming_the_file_and_the_reason() {
        let ca = Ca::generate("test CA").unwrap();
        let server = ca
            .issue_server(&["localhost".into()], &[], &IssueOptions::default())
            .unwrap();
        let agent = ca.issue_agent("edge-1", &IssueOptions::default()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        write(&p("server.pem"), &server.cert_pem);
        write(&p("server-key.pem"), &server.key_pem);
        write(&p("ca.pem"), ca.cert_pem());
        let files = ServerTlsFiles {
            cert: p("server.pem"),
            key: p("server-key.pem"),
            client_ca: p("ca.pem"),
            crls: Vec::new(),
        };
        let policy = ClientCertPolicy::Required;
        let good = load_server_tls(&files, policy).unwrap();
        assert_eq!(server_files_fingerprint(&files), Some(good.fingerprint));

        let refused =
            |files: &ServerTlsFiles| load_server_tls(files, policy).unwrap_err().to_string();
        // A CA file holding a leaf.
        write(&p("leaf-ca.pem"), &agent.cert_pem);
        let err = refused(&ServerTlsFiles {
            client_ca: p("leaf-ca.pem"),
            ..files.clone()
        });
        assert!(
            err.contains("leaf-ca.pem") && err.contains("is not a CA certificate"),
            "{err}"
        );
        // An expired certificate.
        let old = ca
            .issue_server(&["localhost".into()], &[], &IssueOptions::expired())
            .unwrap();
        write(&p("old.pem"), &old.cert_pem);
        write(&p("old-key.pem"), &old.key_pem);
        let err = refused(&ServerTlsFiles {
            cert: p("old.pem"),
            key: p("old-key.pem"),
            ..files.clone()
        });
        assert!(err.contains("old.pem") && err.contains("expired"), "{err}");
        // A key for another certificate.
        write(&p("agent-key.pem"), &agent.key_pem);
        let err = refused(&ServerTlsFiles {
            key: p("agent-key.pem"),
            ..files.clone()
        });
        assert!(err.contains("agent-key.pem"), "{err}");
        // Truncated PEM.
        write(
            &p("half.pem"),
            &server.cert_pem[..server.cert_pem.len() / 2],
        );
        let err = refused(&ServerTlsFiles {
            cert: p("half.pem"),
            ..files.clone()
        });
        assert!(err.contains("half.pem"), "{err}");
        // A directory, a missing file, an empty CA bundle.
        std::fs::create_dir(p("dir.pem")).unwrap();
        let err = refused(&ServerTlsFiles {
            cert: p("dir.pem"),
            ..files.clone()
        });
        assert!(err.contains("dir.pem"), "{err}");
        let err = refused(&ServerTlsFiles {
            key: p("gone.pem"),
            ..files.clone()
        });
        assert!(err.contains("gone.pem"), "{err}");
        write(&p("empty.pem"), "");
        let err = refused(&ServerTlsFiles {
            client_ca: p("empty.pem"),
            ..files.clone()
        });
        assert!(
            err.contains("empty.pem") && err.contains("no certificate"),
            "{err}"
        );
    }

    #[test]
    fn reverify_names_the_reason() {
        let ca = Ca::generate("test CA").unwrap();
        let other = Ca::generate("other CA").unwrap();
        let server = ca
            .issue_server(&["localhost".into()], &[], &IssueOptions::default())
            .unwrap();
        let revoked = ca.issue_agent("edge-1", &IssueOptions::default()).unwrap();
        let fine = ca.issue_agent("edge-2", &IssueOptions::default()).unwrap();
        let stranger = other
            .issue_agent("edge-3", &IssueOptions::default())
            .unwrap();
        let crl = ca.crl_pem(&[&revoked.cert_pem]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        std::fs::write(p("s.pem"), &server.cert_pem).unwrap();
        std::fs::write(p("k.pem"), &server.key_pem).unwrap();
        std::fs::write(p("ca.pem"), ca.cert_pem()).unwrap();
        std::fs::write(p("crl.pem"), crl).unwrap();
        let loaded = load_server_tls(
            &ServerTlsFiles {
                cert: p("s.pem"),
                key: p("k.pem"),
                client_ca: p("ca.pem"),
                crls: vec![p("crl.pem")],
            },
            ClientCertPolicy::Required,
        )
        .unwrap();
        let v = loaded.tls.verifier.as_ref();
        let chain = |pem: &str| tls::certs_from_pem(pem).unwrap();
        assert!(reverify(v, &chain(&fine.cert_pem)).is_ok());
        assert_eq!(
            reverify(v, &chain(&revoked.cert_pem)).unwrap_err().reason,
            "revoked"
        );
        assert_eq!(
            reverify(v, &chain(&stranger.cert_pem)).unwrap_err().reason,
            "unknown_issuer"
        );
        assert_eq!(reverify(v, &[]).unwrap_err().reason, "bad_certificate");
    }
}
