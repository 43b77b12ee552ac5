//! PKI for `tether certs`: a certificate authority, server and agent certificate issuance
//! (rcgen), and writing key material to disk with the right file modes.
//!
//! Everything produces PEM strings; [`init_dir`] and [`issue_agent_files`] are the file-based
//! front ends used by the CLI.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevokedCertParams, SanType, SerialNumber,
};
use time::OffsetDateTime;

use crate::identity::{AGENT_URI_PREFIX, IdentityError, SERVER_URI_PREFIX, validate_agent_id};

/// File name of the CA certificate written by [`init_dir`].
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the CA private key written by [`init_dir`].
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// File name of the server certificate written by [`init_dir`].
pub const SERVER_CERT_FILE: &str = "server.pem";
/// File name of the server private key written by [`init_dir`].
pub const SERVER_KEY_FILE: &str = "server-key.pem";

const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(24 * 3600);
/// Back-dating of `not_before`, so that peers with a slightly slow clock accept new certs.
const CLOCK_SKEW: Duration = HOUR;
/// Validity of leaf certificates issued with [`IssueOptions::default`].
const LEAF_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// Validity of a CA made by [`Ca::generate`].
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Errors of certificate generation and of the certificate files.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// rcgen refused to generate or sign something.
    #[error("cannot {what}: {source}")]
    Generate {
        /// What was being done ("generate the CA key", "sign the agent certificate", ...).
        what: &'static str,
        /// The rcgen error.
        #[source]
        source: rcgen::Error,
    },
    /// The CA certificate or key given to [`Ca::from_pem`] is unusable.
    #[error("cannot load the CA from {origin}: {problem}")]
    LoadCa {
        /// Where the CA came from (file names or "PEM input").
        origin: String,
        /// What is wrong.
        problem: String,
    },
    /// An agent id is not acceptable.
    #[error(transparent)]
    AgentId(#[from] IdentityError),
    /// A server id (`--server-peer`) is not acceptable.
    #[error("invalid server id: {0}")]
    ServerId(String),
    /// A certificate signing request is unusable or asks for what it may not have.
    #[error("certificate signing request refused: {0}")]
    Csr(String),
    /// A server certificate was requested with neither a DNS name nor an IP address.
    #[error("a server certificate needs at least one DNS name or IP address")]
    NoServerNames,
    /// A DNS name or URI is not representable in a certificate (non-ASCII).
    #[error("`{name}` cannot be used as a certificate name: {source}")]
    BadName {
        /// The rejected name.
        name: String,
        /// The rcgen error.
        #[source]
        source: rcgen::Error,
    },
    /// `not_after` is not after `not_before`, or a time is out of range.
    #[error("invalid validity period: {0}")]
    Validity(String),
    /// [`init_dir`] found an existing CA key and will not overwrite it.
    #[error(
        "refusing to overwrite the existing CA key {}: move it away first, or use `certs issue` to issue with it",
        path.display()
    )]
    CaKeyExists {
        /// The existing file.
        path: PathBuf,
    },
    /// Reading a file failed.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// Writing a file (or creating its directory) failed.
    #[error("cannot write {}: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
}

/// A certificate and its private key, both PEM-encoded.
#[derive(Clone, PartialEq, Eq)]
pub struct CertifiedKeyPem {
    /// The certificate (`-----BEGIN CERTIFICATE-----`).
    pub cert_pem: String,
    /// The PKCS#8 private key (`-----BEGIN PRIVATE KEY-----`).
    pub key_pem: String,
}

impl std::fmt::Debug for CertifiedKeyPem {
    // The key is a secret: never print it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertifiedKeyPem")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// Validity and SAN tweaks for an issued certificate.
///
/// The defaults are what production wants; the other knobs exist so that tests can make
/// expired certificates, certificates without the agent URI SAN, or ambiguous ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssueOptions {
    /// Start of validity. Default: now minus one hour (clock skew).
    pub not_before: SystemTime,
    /// End of validity. Default: one year from now. May be in the past (expired certificate).
    pub not_after: SystemTime,
    /// Agent certificates only: leave out the `tether://agent/<id>` URI SAN.
    pub omit_uri_san: bool,
    /// Further URI SANs to add (agent and server certificates).
    pub extra_uri_sans: Vec<String>,
}

impl IssueOptions {
    /// Valid from now (back-dated by an hour for slow clocks) for `validity`.
    pub fn valid_for(validity: Duration) -> Self {
        let now = SystemTime::now();
        Self {
            not_before: now - CLOCK_SKEW,
            not_after: now + validity,
            ..Self::default()
        }
    }
}

impl Default for IssueOptions {
    fn default() -> Self {
        let now = SystemTime::now();
        Self {
            not_before: now - CLOCK_SKEW,
            not_after: now + LEAF_VALIDITY,
            omit_uri_san: false,
            extra_uri_sans: Vec::new(),
        }
    }
}

impl IssueOptions {
    /// Options for a certificate that expired a day ago (valid for one hour two days ago).
    pub fn expired() -> Self {
        let now = SystemTime::now();
        Self {
            not_before: now - 2 * DAY,
            not_after: now - DAY,
            ..Self::default()
        }
    }
}

// === impl Ca ===

/// A certificate authority that signs server and agent certificates.
pub struct Ca {
    cert_pem: String,
    pub(crate) issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("cert_pem", &self.cert_pem)
            .finish_non_exhaustive()
    }
}

impl Ca {
    /// Generates a new self-signed CA (ECDSA P-256, valid for 10 years) named `common_name`.
    pub fn generate(common_name: &str) -> Result<Ca, PkiError> {
        let key = KeyPair::generate().map_err(rcgen_err("generate the CA key"))?;
        let now = SystemTime::now();
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(common_name);
        // Agent and server certificates are issued directly by this CA: no intermediates.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = to_offset(now - CLOCK_SKEW)?;
        params.not_after = to_offset(now + CA_VALIDITY)?;
        params.serial_number = Some(random_serial());
        let cert = params
            .self_signed(&key)
            .map_err(rcgen_err("self-sign the CA certificate"))?;
        Ok(Ca {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads an existing CA (certificate and PKCS#8 private key, PEM) to issue with.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Ca, PkiError> {
        Self::from_pem_named(cert_pem, key_pem, "PEM input")
    }

    pub(crate) fn from_pem_named(
        cert_pem: &str,
        key_pem: &str,
        origin: &str,
    ) -> Result<Ca, PkiError> {
        let load_err = |problem: String| PkiError::LoadCa {
            origin: origin.to_owned(),
            problem,
        };
        let key = KeyPair::from_pem(key_pem)
            .map_err(|e| load_err(format!("the CA key is not a usable PEM private key: {e}")))?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)
            .map_err(|e| load_err(format!("the CA certificate is not usable: {e}")))?;
        // A mismatched pair would sign certificates that nobody can verify.
        let cert_der = first_pem_der(cert_pem)
            .ok_or_else(|| load_err("no certificate found in the CA certificate PEM".into()))?;
        let (_, cert) = x509_parser::parse_x509_certificate(&cert_der)
            .map_err(|e| load_err(format!("the CA certificate cannot be parsed: {e}")))?;
        if cert.public_key().subject_public_key.data.as_ref() != issuer.key().public_key_raw() {
            return Err(load_err(
                "the CA key does not belong to the CA certificate".into(),
            ));
        }
        if !cert.is_ca() {
            return Err(load_err(
                "the certificate is not a CA (basicConstraints CA:TRUE missing)".into(),
            ));
        }
        Ok(Ca {
            cert_pem: cert_pem.to_owned(),
            issuer,
        })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA private key, PEM (PKCS#8). A secret: write it with [`write_file_private`].
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// Issues a server certificate (EKU serverAuth) for the given DNS names and IP addresses.
    pub fn issue_server(
        &self,
        dns_names: &[String],
        ips: &[IpAddr],
        opts: &IssueOptions,
    ) -> Result<CertifiedKeyPem, PkiError> {
        self.issue_server_with_key(dns_names, ips, None, opts)
    }

    /// [`issue_server`](Self::issue_server) for an existing private key (PEM), or a new one
    /// when `key_pem` is `None`.
    pub fn issue_server_with_key(
        &self,
        dns_names: &[String],
        ips: &[IpAddr],
        key_pem: Option<&str>,
        opts: &IssueOptions,
    ) -> Result<CertifiedKeyPem, PkiError> {
        if dns_names.is_empty() && ips.is_empty() {
            return Err(PkiError::NoServerNames);
        }
        let mut sans = Vec::with_capacity(dns_names.len() + ips.len());
        for name in dns_names {
            sans.push(SanType::DnsName(ia5(name)?));
        }
        sans.extend(ips.iter().copied().map(SanType::IpAddress));
        let cn = dns_names
            .first()
            .cloned()
            .or_else(|| ips.first().map(IpAddr::to_string))
            .unwrap_or_default();
        let key = leaf_key(key_pem)?;
        self.issue_leaf(&cn, sans, &[ExtendedKeyUsagePurpose::ServerAuth], key, opts)
    }

    /// Issues an agent certificate: CN = `agent_id`, URI SAN `tether://agent/<agent_id>`
    /// (unless [`IssueOptions::omit_uri_san`]), EKU clientAuth.
    pub fn issue_agent(
        &self,
        agent_id: &str,
        opts: &IssueOptions,
    ) -> Result<CertifiedKeyPem, PkiError> {
        self.issue_agent_with_key(agent_id, None, opts)
    }

    /// [`issue_agent`](Self::issue_agent) for an existing private key (PEM), or a new one
    /// when `key_pem` is `None` (`tether certs renew --keep-key`).
    pub fn issue_agent_with_key(
        &self,
        agent_id: &str,
        key_pem: Option<&str>,
        opts: &IssueOptions,
    ) -> Result<CertifiedKeyPem, PkiError> {
        validate_agent_id(agent_id)?;
        let mut sans = Vec::new();
        if !opts.omit_uri_san {
            sans.push(SanType::URI(ia5(&format!("{AGENT_URI_PREFIX}{agent_id}"))?));
        }
        let key = leaf_key(key_pem)?;
        self.issue_leaf(
            agent_id,
            sans,
            &[ExtendedKeyUsagePurpose::ClientAuth],
            key,
            opts,
        )
    }

    /// Issues a server-peer certificate for replica `server_id`: CN = the id, URI SAN
    /// `tether://server/<id>`, EKU clientAuth and serverAuth (one replica dials another).
    /// The agent route refuses it: it names no agent.
    pub fn issue_server_peer(
        &self,
        server_id: &str,
        opts: &IssueOptions,
    ) -> Result<CertifiedKeyPem, PkiError> {
        crate::host::validate_server_id(server_id).map_err(PkiError::ServerId)?;
        let sans = vec![SanType::URI(ia5(&format!(
            "{SERVER_URI_PREFIX}{server_id}"
        ))?)];
        self.issue_leaf(
            server_id,
            sans,
            &[
                ExtendedKeyUsagePurpose::ClientAuth,
                ExtendedKeyUsagePurpose::ServerAuth,
            ],
            leaf_key(None)?,
            opts,
        )
    }

    /// A CRL (PEM) signed by this CA that revokes the given certificates (PEM), valid for
    /// 30 days. Used to test revocation; production CRLs usually come from elsewhere.
    pub fn crl_pem(&self, revoked_cert_pems: &[&str]) -> Result<String, PkiError> {
        let revoked_certs = revoked_cert_pems
            .iter()
            .map(|pem| {
                let der = first_pem_der(pem).ok_or_else(|| PkiError::LoadCa {
                    origin: "PEM input".into(),
                    problem: "no certificate found in a certificate to revoke".into(),
                })?;
                let (_, cert) =
                    x509_parser::parse_x509_certificate(&der).map_err(|e| PkiError::LoadCa {
                        origin: "PEM input".into(),
                        problem: format!("a certificate to revoke cannot be parsed: {e}"),
                    })?;
                Ok(cert.raw_serial().to_vec())
            })
            .collect::<Result<Vec<_>, PkiError>>()?;
        self.crl_pem_for_serials(&revoked_certs)
    }

    /// A CRL (PEM) signed by this CA that revokes the certificates with the given serial
    /// numbers (big-endian bytes), valid for 30 days (`tether certs revoke`).
    pub fn crl_pem_for_serials(&self, serials: &[Vec<u8>]) -> Result<String, PkiError> {
        let now = SystemTime::now();
        let revoked_certs = serials
            .iter()
            .map(|serial| {
                Ok(RevokedCertParams {
                    serial_number: SerialNumber::from_slice(serial),
                    revocation_time: to_offset(now - CLOCK_SKEW)?,
                    reason_code: None,
                    invalidity_date: None,
                })
            })
            .collect::<Result<Vec<_>, PkiError>>()?;
        let params = CertificateRevocationListParams {
            this_update: to_offset(now - CLOCK_SKEW)?,
            next_update: to_offset(now + 30 * DAY)?,
            crl_number: random_serial(),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let crl = params
            .signed_by(&self.issuer)
            .map_err(rcgen_err("sign the CRL"))?;
        crl.pem().map_err(rcgen_err("encode the CRL"))
    }

    fn issue_leaf(
        &self,
        common_name: &str,
        sans: Vec<SanType>,
        eku: &[ExtendedKeyUsagePurpose],
        key: KeyPair,
        opts: &IssueOptions,
    ) -> Result<CertifiedKeyPem, PkiError> {
        let params = leaf_params(common_name, sans, eku, opts)?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(rcgen_err("sign the certificate"))?;
        Ok(CertifiedKeyPem {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// The private key of a new leaf: the one given (PEM), or a new ECDSA P-256 key.
fn leaf_key(key_pem: Option<&str>) -> Result<KeyPair, PkiError> {
    match key_pem {
        None => KeyPair::generate().map_err(rcgen_err("generate a key")),
        Some(pem) => KeyPair::from_pem(pem).map_err(|e| PkiError::LoadCa {
            origin: "the key to keep".into(),
            problem: format!("not a usable PEM private key: {e}"),
        }),
    }
}

/// The parameters of a leaf certificate: CN, SANs, EKUs, validity and a random serial.
pub(crate) fn leaf_params(
    common_name: &str,
    mut sans: Vec<SanType>,
    eku: &[ExtendedKeyUsagePurpose],
    opts: &IssueOptions,
) -> Result<CertificateParams, PkiError> {
    if opts.not_after <= opts.not_before {
        return Err(PkiError::Validity(
            "not_after must be later than not_before".into(),
        ));
    }
    for uri in &opts.extra_uri_sans {
        sans.push(SanType::URI(ia5(uri)?));
    }
    let mut params = CertificateParams::default();
    params.distinguished_name = dn(common_name);
    params.subject_alt_names = sans;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = eku.to_vec();
    params.not_before = to_offset(opts.not_before)?;
    params.not_after = to_offset(opts.not_after)?;
    params.serial_number = Some(random_serial());
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

// === files ===

/// Writes `contents` to `path` with mode 0600 (created, or truncated if it exists).
///
/// The mode is also applied to an existing file before anything is written, so that a secret
/// never lands in a file that others can read.
pub fn write_file_private(path: &Path, contents: impl AsRef<[u8]>) -> Result<(), PkiError> {
    write_file(path, contents.as_ref(), 0o600, false)
}

/// Writes `contents` to `path` with mode 0644 (created, or truncated if it exists).
pub fn write_file_public(path: &Path, contents: impl AsRef<[u8]>) -> Result<(), PkiError> {
    write_file(path, contents.as_ref(), 0o644, false)
}

fn write_file(path: &Path, contents: &[u8], mode: u32, create_new: bool) -> Result<(), PkiError> {
    let write_err = |source| PkiError::Write {
        path: path.to_owned(),
        source,
    };
    let mut options = OpenOptions::new();
    options.write(true);
    if create_new {
        options.create_new(true);
    } else {
        options.create(true).truncate(true);
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        options.mode(mode);
        let file = options.open(path).map_err(write_err)?;
        // `mode` only applies on creation; an existing file keeps its old permissions.
        file.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(write_err)?;
        write_all(file, contents).map_err(write_err)
    }
    #[cfg(not(unix))]
    {
        let _ = mode;
        let file = options.open(path).map_err(write_err)?;
        write_all(file, contents).map_err(write_err)
    }
}

fn write_all(mut file: fs::File, contents: &[u8]) -> io::Result<()> {
    file.write_all(contents)?;
    file.sync_all()
}

/// What [`init_dir`] created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitReport {
    /// The files written, in order: CA key, CA certificate, server key, server certificate.
    pub files: Vec<PathBuf>,
}

/// What [`issue_agent_files`] created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssueReport {
    /// The agent id the certificate was issued for.
    pub agent_id: String,
    /// The files written: the agent certificate, then its key.
    pub files: Vec<PathBuf>,
}

/// Creates a CA and a server certificate in `dir` (created if missing): `ca.pem`,
/// `ca-key.pem` (0600), `server.pem`, `server-key.pem` (0600).
///
/// Refuses to run if `dir/ca-key.pem` exists, so that an existing CA is never replaced.
pub fn init_dir(
    dir: &Path,
    server_names: &[String],
    server_ips: &[IpAddr],
) -> Result<InitReport, PkiError> {
    init_dir_with(dir, server_names, server_ips, &IssueOptions::default())
}

/// [`init_dir`] with the server certificate's validity given by `opts`.
pub fn init_dir_with(
    dir: &Path,
    server_names: &[String],
    server_ips: &[IpAddr],
    opts: &IssueOptions,
) -> Result<InitReport, PkiError> {
    let ca_key_path = dir.join(CA_KEY_FILE);
    // Checked before any work, and again atomically by `create_new` below.
    if fs::symlink_metadata(&ca_key_path).is_ok() {
        return Err(PkiError::CaKeyExists { path: ca_key_path });
    }
    if server_names.is_empty() && server_ips.is_empty() {
        return Err(PkiError::NoServerNames);
    }
    let ca = Ca::generate("tether CA")?;
    let server = ca.issue_server(server_names, server_ips, opts)?;
    fs::create_dir_all(dir).map_err(|source| PkiError::Write {
        path: dir.to_owned(),
        source,
    })?;

    match write_file(&ca_key_path, ca.key_pem().as_bytes(), 0o600, true) {
        Err(PkiError::Write { source, .. }) if source.kind() == io::ErrorKind::AlreadyExists => {
            return Err(PkiError::CaKeyExists { path: ca_key_path });
        }
        other => other?,
    }
    let ca_cert_path = dir.join(CA_CERT_FILE);
    let server_key_path = dir.join(SERVER_KEY_FILE);
    let server_cert_path = dir.join(SERVER_CERT_FILE);
    write_file_public(&ca_cert_path, ca.cert_pem())?;
    write_file_private(&server_key_path, &server.key_pem)?;
    write_file_public(&server_cert_path, &server.cert_pem)?;
    Ok(InitReport {
        files: vec![ca_key_path, ca_cert_path, server_key_path, server_cert_path],
    })
}

/// Issues an agent certificate with the CA in `dir` (`ca.pem`, `ca-key.pem`) and writes
/// `agent-<id>.pem` and `agent-<id>-key.pem` (0600) next to it, replacing older ones.
pub fn issue_agent_files(dir: &Path, agent_id: &str) -> Result<IssueReport, PkiError> {
    issue_agent_files_with(dir, agent_id, &IssueOptions::default())
}

/// [`issue_agent_files`] with the certificate's validity given by `opts`.
pub fn issue_agent_files_with(
    dir: &Path,
    agent_id: &str,
    opts: &IssueOptions,
) -> Result<IssueReport, PkiError> {
    validate_agent_id(agent_id)?;
    let ca_cert_path = dir.join(CA_CERT_FILE);
    let ca_key_path = dir.join(CA_KEY_FILE);
    let cert_pem = read_to_string(&ca_cert_path)?;
    let key_pem = read_to_string(&ca_key_path)?;
    let origin = format!("{} and {}", ca_cert_path.display(), ca_key_path.display());
    let ca = Ca::from_pem_named(&cert_pem, &key_pem, &origin)?;
    let agent = ca.issue_agent(agent_id, opts)?;
    let cert_path = dir.join(format!("agent-{agent_id}.pem"));
    let key_path = dir.join(format!("agent-{agent_id}-key.pem"));
    write_file_private(&key_path, &agent.key_pem)?;
    write_file_public(&cert_path, &agent.cert_pem)?;
    Ok(IssueReport {
        agent_id: agent_id.to_owned(),
        files: vec![cert_path, key_path],
    })
}

/// Issues a server-peer certificate (`tether://server/<id>`) with the CA in `dir` and writes
/// `server-peer-<id>.pem` and `server-peer-<id>-key.pem` (0600) next to it.
pub fn issue_server_peer_files(
    dir: &Path,
    server_id: &str,
    opts: &IssueOptions,
) -> Result<Vec<PathBuf>, PkiError> {
    crate::host::validate_server_id(server_id).map_err(PkiError::ServerId)?;
    let ca_cert_path = dir.join(CA_CERT_FILE);
    let ca_key_path = dir.join(CA_KEY_FILE);
    let origin = format!("{} and {}", ca_cert_path.display(), ca_key_path.display());
    let ca = Ca::from_pem_named(
        &read_to_string(&ca_cert_path)?,
        &read_to_string(&ca_key_path)?,
        &origin,
    )?;
    let peer = ca.issue_server_peer(server_id, opts)?;
    let cert_path = dir.join(format!("server-peer-{server_id}.pem"));
    let key_path = dir.join(format!("server-peer-{server_id}-key.pem"));
    write_file_private(&key_path, &peer.key_pem)?;
    write_file_public(&cert_path, &peer.cert_pem)?;
    Ok(vec![cert_path, key_path])
}

// === helpers ===

pub(crate) fn read_to_string(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(|source| PkiError::Read {
        path: path.to_owned(),
        source,
    })
}

pub(crate) fn rcgen_err(what: &'static str) -> impl FnOnce(rcgen::Error) -> PkiError {
    move |source| PkiError::Generate { what, source }
}

pub(crate) fn dn(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

pub(crate) fn ia5(name: &str) -> Result<rcgen::string::Ia5String, PkiError> {
    rcgen::string::Ia5String::try_from(name).map_err(|source| PkiError::BadName {
        name: name.to_owned(),
        source,
    })
}

pub(crate) fn to_offset(t: SystemTime) -> Result<OffsetDateTime, PkiError> {
    // Whole seconds: X.509 times have no fractions and rcgen would otherwise round.
    let secs = match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).ok(),
        Err(e) => i64::try_from(e.duration().as_secs()).ok().map(|s| -s),
    };
    secs.and_then(|s| OffsetDateTime::from_unix_timestamp(s).ok())
        .ok_or_else(|| PkiError::Validity("time out of range".into()))
}

/// A random positive 16-byte serial, so that CRL entries identify certificates uniquely.
fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    fastrand::fill(&mut bytes);
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01; // keep the full length (no leading zero byte to strip)
    SerialNumber::from_slice(&bytes)
}

/// The DER of the first `CERTIFICATE` block of a PEM text.
fn first_pem_der(pem: &str) -> Option<Vec<u8>> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .and_then(Result::ok)
        .map(|c| c.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{IdentityMode, agent_id_from_cert};
    use std::os::unix::fs::PermissionsExt;
    use x509_parser::extensions::GeneralName;

    fn der(pem: &str) -> Vec<u8> {
        first_pem_der(pem).unwrap()
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    fn with_cert<R>(
        pem: &str,
        f: impl FnOnce(&x509_parser::certificate::X509Certificate<'_>) -> R,
    ) -> R {
        let der = der(pem);
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        f(&cert)
    }

    #[test]
    fn ca_is_a_ca_with_ten_years() {
        let ca = Ca::generate("test CA").unwrap();
        with_cert(ca.cert_pem(), |c| {
            assert!(c.is_ca());
            let years = (c.validity().not_after.timestamp() - c.validity().not_before.timestamp())
                / (365 * 24 * 3600);
            assert_eq!(years, 10);
            assert_eq!(
                c.subject()
                    .iter_common_name()
                    .next()
                    .unwrap()
                    .as_str()
                    .unwrap(),
                "test CA"
            );
        });
        assert!(ca.key_pem().starts_with("-----BEGIN PRIVATE KEY-----"));
    }

    #[test]
    fn agent_cert_has_uri_san_cn_and_client_auth() {
        let ca = Ca::generate("test CA").unwrap();
        let agent = ca.issue_agent("edge-1", &IssueOptions::default()).unwrap();
        assert_eq!(
            agent_id_from_cert(&der(&agent.cert_pem), IdentityMode::UriSan).unwrap(),
            "edge-1"
        );
        with_cert(&agent.cert_pem, |c| {
            assert!(!c.is_ca());
            let eku = c.extended_key_usage().unwrap().unwrap().value;
            assert!(eku.client_auth && !eku.server_auth);
            assert_eq!(
                c.subject()
                    .iter_common_name()
                    .next()
                    .unwrap()
                    .as_str()
                    .unwrap(),
                "edge-1"
            );
            // Default validity: from about an hour ago, for about a year.
            let now = OffsetDateTime::now_utc().unix_timestamp();
            let nb = c.validity().not_before.timestamp();
            let na = c.validity().not_after.timestamp();
            assert!((now - 3700..=now - 3500).contains(&nb), "{nb} vs {now}");
            assert!((now + 364 * 86400..=now + 366 * 86400).contains(&na));
        });
    }

    #[test]
    fn server_cert_has_names_and_server_auth() {
        let ca = Ca::generate("test CA").unwrap();
        let ips: Vec<IpAddr> = vec!["127.0.0.1".parse().unwrap(), "::1".parse().unwrap()];
        let server = ca
            .issue_server(&["localhost".into()], &ips, &IssueOptions::default())
            .unwrap();
        with_cert(&server.cert_pem, |c| {
            let eku = c.extended_key_usage().unwrap().unwrap().value;
            assert!(eku.server_auth && !eku.client_auth);
            let sans = &c
                .subject_alternative_name()
                .unwrap()
                .unwrap()
                .value
                .general_names;
            assert!(sans.contains(&GeneralName::DNSName("localhost")));
            assert!(sans.contains(&GeneralName::IPAddress(&[127, 0, 0, 1])));
            assert_eq!(sans.len(), 3);
        });
        assert!(matches!(
            ca.issue_server(&[], &[], &IssueOptions::default()),
            Err(PkiError::NoServerNames)
        ));
    }

    #[test]
    fn options_expired_omit_and_extra_sans() {
        let ca = Ca::generate("test CA").unwrap();
        let expired = ca.issue_agent("old", &IssueOptions::expired()).unwrap();
        with_cert(&expired.cert_pem, |c| {
            assert!(
                c.validity().not_after.timestamp() < OffsetDateTime::now_utc().unix_timestamp()
            );
        });

        let opts = IssueOptions {
            omit_uri_san: true,
            ..IssueOptions::default()
        };
        let bare = ca.issue_agent("bare", &opts).unwrap();
        assert_eq!(
            agent_id_from_cert(&der(&bare.cert_pem), IdentityMode::UriSan).unwrap_err(),
            IdentityError::MissingUriSan
        );

        let opts = IssueOptions {
            extra_uri_sans: vec!["tether://agent/other".into()],
            ..IssueOptions::default()
        };
        let two = ca.issue_agent("one", &opts).unwrap();
        assert_eq!(
            agent_id_from_cert(&der(&two.cert_pem), IdentityMode::UriSan).unwrap_err(),
            IdentityError::Ambiguous { count: 2 }
        );

        let now = SystemTime::now();
        let backwards = IssueOptions {
            not_before: now,
            not_after: now - HOUR,
            ..IssueOptions::default()
        };
        assert!(matches!(
            ca.issue_agent("x", &backwards),
            Err(PkiError::Validity(_))
        ));
    }

    #[test]
    fn server_peer_cert_names_the_replica_and_no_agent() {
        let ca = Ca::generate("test CA").unwrap();
        let peer = ca
            .issue_server_peer("replica-1", &IssueOptions::default())
            .unwrap();
        let err = agent_id_from_cert(&der(&peer.cert_pem), IdentityMode::UriSan).unwrap_err();
        assert_eq!(
            err,
            IdentityError::ServerPeer {
                uri: "tether://server/replica-1".into()
            }
        );
        with_cert(&peer.cert_pem, |c| {
            let eku = c.extended_key_usage().unwrap().unwrap().value;
            assert!(eku.client_auth && eku.server_auth);
        });
        assert!(matches!(
            ca.issue_server_peer("bad id", &IssueOptions::default()),
            Err(PkiError::ServerId(_))
        ));
        let tmp = tempfile::tempdir().unwrap();
        init_dir(tmp.path(), &["localhost".into()], &[]).unwrap();
        let files =
            issue_server_peer_files(tmp.path(), "replica-2", &IssueOptions::default()).unwrap();
        assert_eq!(mode(&files[1]), 0o600);
    }

    #[test]
    fn invalid_agent_id_is_refused() {
        let ca = Ca::generate("test CA").unwrap();
        let err = ca
            .issue_agent("bad/id", &IssueOptions::default())
            .unwrap_err();
        assert!(matches!(
            err,
            PkiError::AgentId(IdentityError::InvalidId { .. })
        ));
        assert!(err.to_string().contains("bad/id"), "{err}");
    }

    #[test]
    fn ca_round_trips_through_pem() {
        let ca = Ca::generate("test CA").unwrap();
        let loaded = Ca::from_pem(ca.cert_pem(), &ca.key_pem()).unwrap();
        let agent = loaded
            .issue_agent("edge-9", &IssueOptions::default())
            .unwrap();
        // Issuer name and signature chain back to the original CA certificate.
        let ca_der = der(ca.cert_pem());
        let (_, ca_cert) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
        with_cert(&agent.cert_pem, |c| {
            assert_eq!(c.issuer(), ca_cert.subject());
            c.verify_signature(Some(ca_cert.public_key())).unwrap();
        });
    }

    #[test]
    fn ca_from_pem_rejects_bad_input() {
        let ca = Ca::generate("a").unwrap();
        let other = Ca::generate("b").unwrap();
        let err = Ca::from_pem(ca.cert_pem(), &other.key_pem()).unwrap_err();
        assert!(err.to_string().contains("does not belong"), "{err}");
        let err = Ca::from_pem("garbage", &ca.key_pem()).unwrap_err();
        assert!(matches!(err, PkiError::LoadCa { .. }), "{err}");
        let err = Ca::from_pem(ca.cert_pem(), "garbage").unwrap_err();
        assert!(err.to_string().contains("CA key"), "{err}");
        let leaf = ca.issue_agent("leaf", &IssueOptions::default()).unwrap();
        let err = Ca::from_pem(&leaf.cert_pem, &leaf.key_pem).unwrap_err();
        assert!(err.to_string().contains("not a CA"), "{err}");
    }

    #[test]
    fn write_modes_and_truncation() {
        let dir = tempfile::tempdir().unwrap();
        let private = dir.path().join("secret");
        fs::write(&private, "a much longer previous content").unwrap();
        fs::set_permissions(&private, fs::Permissions::from_mode(0o666)).unwrap();
        write_file_private(&private, "new").unwrap();
        assert_eq!(fs::read_to_string(&private).unwrap(), "new");
        assert_eq!(mode(&private), 0o600);

        let public = dir.path().join("public");
        write_file_public(&public, b"pub").unwrap();
        assert_eq!(mode(&public), 0o644);

        let err = write_file_public(&dir.path().join("missing/x"), "x").unwrap_err();
        assert!(err.to_string().contains("missing/x"), "{err}");
    }

    #[test]
    fn init_dir_writes_files_and_refuses_to_overwrite() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("pki");
        let report = init_dir(
            &dir,
            &["tether.example".into()],
            &["10.0.0.1".parse().unwrap()],
        )
        .unwrap();
        let names: Vec<_> = report
            .files
            .iter()
            .map(|p| p.file_name().unwrap().to_str().unwrap())
            .collect();
        assert_eq!(
            names,
            ["ca-key.pem", "ca.pem", "server-key.pem", "server.pem"]
        );
        assert_eq!(mode(&dir.join("ca-key.pem")), 0o600);
        assert_eq!(mode(&dir.join("server-key.pem")), 0o600);
        assert_eq!(mode(&dir.join("ca.pem")), 0o644);
        let ca_key_before = fs::read_to_string(dir.join("ca-key.pem")).unwrap();

        let err = init_dir(&dir, &["x".into()], &[]).unwrap_err();
        assert!(matches!(err, PkiError::CaKeyExists { .. }));
        assert!(err.to_string().contains("ca-key.pem"), "{err}");
        assert_eq!(
            fs::read_to_string(dir.join("ca-key.pem")).unwrap(),
            ca_key_before
        );
    }

    #[test]
    fn issue_agent_files_uses_the_dir_ca() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        init_dir(dir, &["localhost".into()], &[]).unwrap();
        let report = issue_agent_files(dir, "edge-1").unwrap();
        assert_eq!(report.agent_id, "edge-1");
        assert_eq!(
            report.files,
            vec![
                dir.join("agent-edge-1.pem"),
                dir.join("agent-edge-1-key.pem")
            ]
        );
        assert_eq!(mode(&dir.join("agent-edge-1-key.pem")), 0o600);
        let cert_pem = fs::read_to_string(dir.join("agent-edge-1.pem")).unwrap();
        assert_eq!(
            agent_id_from_cert(&der(&cert_pem), IdentityMode::UriSan).unwrap(),
            "edge-1"
        );
        let ca_pem = fs::read_to_string(dir.join("ca.pem")).unwrap();
        let ca_der = der(&ca_pem);
        let (_, ca_cert) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
        with_cert(&cert_pem, |c| {
            c.verify_signature(Some(ca_cert.public_key())).unwrap()
        });

        let err = issue_agent_files(dir, "no spaces").unwrap_err();
        assert!(err.to_string().contains("no spaces"), "{err}");
        assert!(!dir.join("agent-no spaces.pem").exists());
    }

    #[test]
    fn issue_agent_files_names_missing_ca_file() {
        let tmp = tempfile::tempdir().unwrap();
        let err = issue_agent_files(tmp.path(), "edge-1").unwrap_err();
        assert!(matches!(err, PkiError::Read { .. }));
        assert!(err.to_string().contains("ca.pem"), "{err}");
    }

    #[test]
    fn crl_lists_revoked_serials() {
        let ca = Ca::generate("test CA").unwrap();
        let a = ca.issue_agent("a", &IssueOptions::default()).unwrap();
        let crl_pem = ca.crl_pem(&[&a.cert_pem]).unwrap();
        assert!(crl_pem.starts_with("-----BEGIN X509 CRL-----"));
    }

    #[test]
    fn debug_hides_keys() {
        let ca = Ca::generate("test CA").unwrap();
        let a = ca.issue_agent("a", &IssueOptions::default()).unwrap();
        assert!(!format!("{a:?}").contains("PRIVATE KEY"));
        assert!(!format!("{ca:?}").contains("PRIVATE KEY"));
    }
}
