//! Certificate operations on files for `tether certs`: describe a certificate (`inspect`),
//! issue a successor with the same identity (`renew`), and add certificates to a CA's CRL file
//! (`revoke`). Files that a daemon watches are replaced atomically (written aside, renamed).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::{GeneralName, ParsedExtension, X509Extension};
use x509_parser::x509::X509Name;

use crate::identity::AGENT_URI_PREFIX;
use crate::pki::{
    CA_CERT_FILE, CA_KEY_FILE, Ca, IssueOptions, PkiError, read_to_string, write_file_private,
    write_file_public,
};
use crate::tls;
use crate::tls_check::rfc3339;

/// What a certificate says, for `tether certs inspect`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// Subject DN.
    pub subject: String,
    /// Issuer DN.
    pub issuer: String,
    /// Serial number, hex.
    pub serial: String,
    /// `notBefore`, Unix seconds.
    pub not_before: i64,
    /// `notAfter`, Unix seconds.
    pub not_after: i64,
    /// DNS names.
    pub dns: Vec<String>,
    /// IP addresses.
    pub ips: Vec<String>,
    /// URIs (the agent identity is `tether://agent/<id>`).
    pub uris: Vec<String>,
    /// Whether it is a CA certificate.
    pub is_ca: bool,
    /// SHA-256 of its DER, hex: the `enroll.ca_sha256` pin of a CA certificate.
    pub sha256: String,
}

impl CertInfo {
    /// The agent id of its URI SAN, if it has one.
    pub fn agent_id(&self) -> Option<&str> {
        self.uris
            .iter()
            .find_map(|u| u.strip_prefix(AGENT_URI_PREFIX))
    }

    /// `notBefore` and `notAfter` as RFC 3339 UTC text.
    pub fn validity_text(&self) -> (String, String) {
        (rfc3339(self.not_before), rfc3339(self.not_after))
    }

    /// Seconds until `notAfter` (negative once expired).
    pub fn remaining_secs(&self) -> i64 {
        self.not_after - time::OffsetDateTime::now_utc().unix_timestamp()
    }
}

/// Why the private key at `key` is not the key of the certificate chain at `cert`, or `None`
/// when they belong together.
pub fn key_mismatch(cert: &Path, key: &Path) -> Result<Option<String>, PkiError> {
    let chain = tls::load_certs(cert).map_err(|e| bad(&cert.display().to_string(), e))?;
    let key_der = tls::load_private_key(key).map_err(|e| bad(&key.display().to_string(), e))?;
    let provider = tls::crypto_provider();
    Ok(
        rustls::sign::CertifiedKey::from_der(chain, key_der, &provider)
            .err()
            .map(|e| {
                format!(
                    "the key {} is not this certificate's key ({e})",
                    key.display()
                )
            }),
    )
}

fn bad(origin: &str, problem: impl std::fmt::Display) -> PkiError {
    PkiError::LoadCa {
        origin: origin.to_owned(),
        problem: problem.to_string(),
    }
}

fn describe(cert: &X509Certificate<'_>, der: &[u8]) -> CertInfo {
    let mut info = CertInfo {
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        serial: cert.raw_serial_as_string(),
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        dns: Vec::new(),
        ips: Vec::new(),
        uris: Vec::new(),
        is_ca: cert.is_ca(),
        sha256: crate::csr::cert_sha256(der),
    };
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(d) => info.dns.push((*d).to_owned()),
                GeneralName::URI(u) => info.uris.push((*u).to_owned()),
                GeneralName::IPAddress(bytes) => info.ips.push(ip_text(bytes)),
                _ => {}
            }
        }
    }
    info
}

fn ip_text(bytes: &[u8]) -> String {
    match bytes.len() {
        4 => {
            let octets: [u8; 4] = bytes.try_into().unwrap_or_default();
            std::net::IpAddr::from(octets).to_string()
        }
        16 => {
            let octets: [u8; 16] = bytes.try_into().unwrap_or_default();
            std::net::IpAddr::from(octets).to_string()
        }
        _ => format!("{bytes:02x?}"),
    }
}

/// Describes every certificate of the PEM file at `path`.
pub fn inspect_file(path: &Path) -> Result<Vec<CertInfo>, PkiError> {
    let origin = path.display().to_string();
    let certs = tls::load_certs(path).map_err(|e| bad(&origin, e))?;
    certs
        .iter()
        .map(|der| {
            x509_parser::parse_x509_certificate(der)
                .map(|(_, cert)| describe(&cert, der))
                .map_err(|e| bad(&origin, format!("cannot parse a certificate: {e}")))
        })
        .collect()
}

fn load_ca(dir: &Path) -> Result<Ca, PkiError> {
    let cert_path = dir.join(CA_CERT_FILE);
    let key_path = dir.join(CA_KEY_FILE);
    let origin = format!("{} and {}", cert_path.display(), key_path.display());
    Ca::from_pem_named(
        &read_to_string(&cert_path)?,
        &read_to_string(&key_path)?,
        &origin,
    )
}

/// Writes `contents` next to `path` and renames it over `path`, so that a watcher never reads
/// half a file.
fn replace(path: &Path, contents: &str, private: bool) -> Result<(), PkiError> {
    let mut aside = path.as_os_str().to_owned();
    aside.push(".tmp");
    let aside = PathBuf::from(aside);
    if private {
        write_file_private(&aside, contents)?;
    } else {
        write_file_public(&aside, contents)?;
    }
    std::fs::rename(&aside, path).map_err(|source| PkiError::Write {
        path: path.to_owned(),
        source,
    })
}

/// What [`renew`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenewReport {
    /// The renewed certificate.
    pub info: CertInfo,
}

/// Issues a successor of the certificate at `cert` with the CA in `ca_dir`: the same agent id
/// (or, for a server certificate, the same DNS names and IP addresses), a new key (or, with
/// `keep_key`, the key in `key`), valid for `validity` from now. Replaces `key` then `cert`
/// atomically (a daemon watching them may see the new key with the old certificate for an
/// instant, refuses that pair, and takes the new pair at its next look); with `keep_key` only
/// `cert` is replaced.
pub fn renew(
    ca_dir: &Path,
    cert: &Path,
    key: &Path,
    validity: Duration,
    keep_key: bool,
) -> Result<RenewReport, PkiError> {
    let old = inspect_file(cert)?
        .into_iter()
        .next()
        .ok_or_else(|| bad(&cert.display().to_string(), "no certificate"))?;
    let ca = load_ca(ca_dir)?;
    let opts = IssueOptions::valid_for(validity);
    let kept = if keep_key {
        if let Some(problem) = key_mismatch(cert, key)? {
            return Err(bad(&key.display().to_string(), problem));
        }
        Some(read_to_string(key)?)
    } else {
        None
    };
    let kept = kept.as_deref();
    let issued = match old.agent_id() {
        Some(id) => ca.issue_agent_with_key(id, kept, &opts)?,
        None => {
            let ips = old
                .ips
                .iter()
                .filter_map(|ip| ip.parse().ok())
                .collect::<Vec<_>>();
            if old.dns.is_empty() && ips.is_empty() {
                return Err(bad(
                    &cert.display().to_string(),
                    "neither an agent identity nor server names to renew",
                ));
            }
            ca.issue_server_with_key(&old.dns, &ips, kept, &opts)?
        }
    };
    if !keep_key {
        replace(key, &issued.key_pem, true)?;
    }
    replace(cert, &issued.cert_pem, false)?;
    Ok(RenewReport {
        info: inspect_file(cert)?.remove(0),
    })
}

/// The CA of `ca_dir` as `revoke` compares issuers: its subject and its key identifier.
struct CaId {
    subject: String,
    key_id: Option<Vec<u8>>,
}

impl CaId {
    fn load(path: &Path) -> Result<CaId, PkiError> {
        let origin = path.display().to_string();
        let der = tls::load_certs(path)
            .map_err(|e| bad(&origin, e))?
            .remove(0);
        let (_, cert) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| bad(&origin, format!("cannot parse the CA certificate: {e}")))?;
        let key_id = cert
            .extensions()
            .iter()
            .find_map(|e| match e.parsed_extension() {
                ParsedExtension::SubjectKeyIdentifier(id) => Some(id.0.to_vec()),
                _ => None,
            });
        Ok(CaId {
            subject: cert.subject().to_string(),
            key_id,
        })
    }

    /// Whether a certificate or CRL with this issuer and these extensions comes from this CA:
    /// the authority key identifier when both sides have one (two CAs may share a name),
    /// else the issuer name.
    fn issued(&self, issuer: &X509Name<'_>, extensions: &[X509Extension<'_>]) -> bool {
        let authority = extensions.iter().find_map(|e| match e.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(aki) => aki.key_identifier.as_ref(),
            _ => None,
        });
        match (&self.key_id, authority) {
            (Some(ours), Some(theirs)) => ours.as_slice() == theirs.0,
            _ => issuer.to_string() == self.subject,
        }
    }
}

/// What [`revoke`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevokeReport {
    /// The serial numbers added (hex); empty when they were revoked already.
    pub added: Vec<String>,
    /// How many certificates the CRL now revokes.
    pub total: usize,
}

/// Adds the certificates of the PEM file `cert` to the CRL at `crl` (created if missing),
/// signed by the CA in `ca_dir`; the CRL's existing entries are kept. The certificates must
/// have been issued by that CA, and an existing CRL must be that CA's. Without `cert`, the CRL
/// is only re-signed (a fresh 30-day validity), or created empty.
pub fn revoke(ca_dir: &Path, cert: Option<&Path>, crl: &Path) -> Result<RevokeReport, PkiError> {
    let ca_cert = ca_dir.join(CA_CERT_FILE);
    revoke_with(&ca_cert, &ca_dir.join(CA_KEY_FILE), cert, &[], crl)
}

/// [`revoke`] with the CA given by its certificate and key files, and further serial numbers
/// (hex, as [`serial_hex`] writes them) to revoke besides the certificates in `cert`: the
/// certificates an enrollment issuer signed for one agent (`tether certs revoke --agent`).
pub fn revoke_with(
    ca_cert: &Path,
    ca_key: &Path,
    cert: Option<&Path>,
    serials_hex: &[String],
    crl: &Path,
) -> Result<RevokeReport, PkiError> {
    let origin = format!("{} and {}", ca_cert.display(), ca_key.display());
    let ca = Ca::from_pem_named(&read_to_string(ca_cert)?, &read_to_string(ca_key)?, &origin)?;
    let ca_id = CaId::load(ca_cert)?;
    let mut serials: Vec<Vec<u8>> = Vec::new();
    if crl.exists() {
        let origin = crl.display().to_string();
        for der in tls::load_crls(crl).map_err(|e| bad(&origin, e))? {
            let (_, list) = x509_parser::parse_x509_crl(&der)
                .map_err(|e| bad(&origin, format!("cannot parse the CRL: {e}")))?;
            if !ca_id.issued(list.issuer(), list.extensions()) {
                return Err(bad(
                    &origin,
                    format!(
                        "the CRL was issued by \"{}\", not by this CA (\"{}\")",
                        list.issuer(),
                        ca_id.subject
                    ),
                ));
            }
            serials.extend(
                list.iter_revoked_certificates()
                    .map(|r| r.raw_serial().to_vec()),
            );
        }
    }
    let mut added = Vec::new();
    let certs = match cert {
        Some(cert) => tls::load_certs(cert).map_err(|e| bad(&cert.display().to_string(), e))?,
        None => Vec::new(),
    };
    let origin = cert.map(|c| c.display().to_string()).unwrap_or_default();
    for der in certs {
        let (_, parsed) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| bad(&origin, format!("cannot parse a certificate: {e}")))?;
        if !ca_id.issued(parsed.issuer(), parsed.extensions()) {
            return Err(bad(
                &origin,
                format!(
                    "\"{}\" was issued by \"{}\", not by this CA",
                    parsed.subject(),
                    parsed.issuer()
                ),
            ));
        }
        let serial = parsed.raw_serial().to_vec();
        if !serials.contains(&serial) {
            added.push(parsed.raw_serial_as_string());
            serials.push(serial);
        }
    }
    for text in serials_hex {
        let serial = serial_bytes(text)
            .ok_or_else(|| bad("a serial number", format!("`{text}` is not hex")))?;
        if !serials.contains(&serial) {
            added.push(text.clone());
            serials.push(serial);
        }
    }
    let pem = ca.crl_pem_for_serials(&serials)?;
    replace(crl, &pem, false)?;
    Ok(RevokeReport {
        added,
        total: serials.len(),
    })
}

/// The serial number of a DER certificate as lowercase hex without separators.
pub fn serial_hex(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(
        cert.raw_serial()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
    )
}

fn serial_bytes(text: &str) -> Option<Vec<u8>> {
    let text = text.trim();
    if text.is_empty() || text.len() % 2 != 0 || text.len() > 80 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Parses a validity such as `90d`, `12h` or `30m` (days, or any unit of
/// [`parse_duration`](crate::duration::parse_duration)).
pub fn parse_validity(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let duration = match text.strip_suffix('d') {
        Some(days) => days
            .parse::<u64>()
            .ok()
            .and_then(|d| d.checked_mul(86_400))
            .map(Duration::from_secs)
            .ok_or_else(|| format!("`{text}`: expected a whole number of days such as `90d`"))?,
        None => crate::duration::parse_duration(text)
            .map_err(|e| format!("{e}; days are written `90d`"))?,
    };
    if duration < Duration::from_secs(60) {
        return Err(format!("`{text}` is shorter than a minute"));
    }
    if SystemTime::now().checked_add(duration).is_none() || duration.as_secs() > 100 * 365 * 86_400
    {
        return Err(format!("`{text}` is longer than 100 years"));
    }
    Ok(duration)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::pki::{init_dir, issue_agent_files_with};
    use crate::tls::{ServerTlsFiles, server_tls};
    use crate::tls_check::reverify;

    #[test]
    fn validity_parses_days_and_units_and_refuses_nonsense() {
        assert_eq!(
            parse_validity("90d").unwrap(),
            Duration::from_secs(90 * 86_400)
        );
        assert_eq!(
            parse_validity("12h").unwrap(),
            Duration::from_secs(12 * 3600)
        );
        assert!(parse_validity("10s").unwrap_err().contains("shorter"));
        assert!(parse_validity("xd").is_err());
        assert!(
            parse_validity("9999999d")
                .unwrap_err()
                .contains("100 years")
        );
        assert!(parse_validity("5y").is_err());
    }

    #[test]
    fn issue_inspect_renew_and_revoke_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        init_dir(d, &["localhost".into()], &["127.0.0.1".parse().unwrap()]).unwrap();
        let opts = IssueOptions::valid_for(Duration::from_secs(3 * 3600));
        issue_agent_files_with(d, "edge-1", &opts).unwrap();
        issue_agent_files_with(d, "edge-2", &IssueOptions::default()).unwrap();
        let cert = d.join("agent-edge-1.pem");
        let key = d.join("agent-edge-1-key.pem");

        let info = inspect_file(&cert).unwrap().remove(0);
        assert_eq!(info.agent_id(), Some("edge-1"));
        assert!(!info.is_ca);
        assert!(
            (3 * 3600 - 60..=3 * 3600).contains(&info.remaining_secs()),
            "{info:?}"
        );
        let server = inspect_file(&d.join("server.pem")).unwrap().remove(0);
        assert_eq!(server.dns, vec!["localhost"]);
        assert_eq!(server.ips, vec!["127.0.0.1"]);

        // Renewal: same identity, new serial, new key, the new validity.
        let old_key = std::fs::read_to_string(&key).unwrap();
        let renewed = renew(d, &cert, &key, Duration::from_secs(10 * 86_400), false).unwrap();
        assert_eq!(renewed.info.agent_id(), Some("edge-1"));
        assert_ne!(renewed.info.serial, info.serial);
        assert_ne!(std::fs::read_to_string(&key).unwrap(), old_key);
        assert!(renewed.info.remaining_secs() > 9 * 86_400);
        let server_renewed = renew(
            d,
            &d.join("server.pem"),
            &d.join("server-key.pem"),
            Duration::from_secs(86_400),
            false,
        )
        .unwrap();
        assert_eq!(server_renewed.info.dns, vec!["localhost"]);

        // --keep-key: a new certificate for the same key; the key file is untouched.
        let key_before = std::fs::read_to_string(&key).unwrap();
        let kept = renew(d, &cert, &key, Duration::from_secs(86_400), true).unwrap();
        assert_eq!(kept.info.agent_id(), Some("edge-1"));
        assert_ne!(kept.info.serial, renewed.info.serial);
        assert_eq!(std::fs::read_to_string(&key).unwrap(), key_before);
        assert_eq!(key_mismatch(&cert, &key).unwrap(), None);
        // A key that is not the certificate's is refused with --keep-key.
        let err = renew(
            d,
            &cert,
            &d.join("agent-edge-2-key.pem"),
            Duration::from_secs(86_400),
            true,
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("not this certificate's key"),
            "{err}"
        );

        // Revocation accumulates in the CRL, and the server's verifier refuses exactly those.
        let crl = d.join("crl.pem");
        let first = revoke(d, Some(&cert), &crl).unwrap();
        assert_eq!((first.added.len(), first.total), (1, 1));
        let again = revoke(d, Some(&cert), &crl).unwrap();
        assert_eq!((again.added.len(), again.total), (0, 1));
        let tls = server_tls(
            &ServerTlsFiles {
                cert: d.join("server.pem"),
                key: d.join("server-key.pem"),
                client_ca: d.join("ca.pem"),
                crls: vec![crl.clone()],
            },
            crate::tls::ClientCertPolicy::Required,
        )
        .unwrap();
        let chain = |p: &Path| tls::load_certs(p).unwrap();
        assert_eq!(
            reverify(tls.verifier.as_ref(), &chain(&cert))
                .unwrap_err()
                .reason,
            "revoked"
        );
        assert!(reverify(tls.verifier.as_ref(), &chain(&d.join("agent-edge-2.pem"))).is_ok());
        let second = revoke(d, Some(&d.join("agent-edge-2.pem")), &crl).unwrap();
        assert_eq!(second.total, 2);
        // Re-signing keeps the entries; without a CRL it creates an empty one.
        let resigned = revoke(d, None, &crl).unwrap();
        assert_eq!((resigned.added.len(), resigned.total), (0, 2));
        // By serial number (what `certs revoke --agent` reads from the issuance log).
        let serial = serial_hex(&tls::load_certs(&d.join("server.pem")).unwrap()[0]).unwrap();
        let by_serial = revoke_with(
            &d.join(CA_CERT_FILE),
            &d.join(CA_KEY_FILE),
            None,
            std::slice::from_ref(&serial),
            &crl,
        )
        .unwrap();
        assert_eq!((by_serial.added, by_serial.total), (vec![serial], 3));
        assert!(
            revoke_with(
                &d.join(CA_CERT_FILE),
                &d.join(CA_KEY_FILE),
                None,
                &["xyz".into()],
                &crl
            )
            .is_err()
        );
        let fresh = revoke(d, None, &d.join("empty-crl.pem")).unwrap();
        assert_eq!(fresh.total, 0);
        assert_eq!(tls::load_crls(&d.join("empty-crl.pem")).unwrap().len(), 1);

        // A certificate of another CA, and a CRL of another CA, are refused.
        let other = tempfile::tempdir().unwrap();
        init_dir(other.path(), &["localhost".into()], &[]).unwrap();
        let err = revoke(other.path(), Some(&cert), &other.path().join("crl.pem")).unwrap_err();
        assert!(err.to_string().contains("not by this CA"), "{err}");
        let err = revoke(other.path(), Some(&other.path().join("server.pem")), &crl).unwrap_err();
        assert!(err.to_string().contains("not by this CA"), "{err}");
    }
}
