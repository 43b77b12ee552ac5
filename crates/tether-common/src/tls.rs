//! TLS material and rustls configurations: PEM loading, the mutual-TLS server and client
//! configs (TLS 1.3 only, aws-lc-rs, ALPN `http/1.1`), and peer identity after the handshake.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};

use crate::identity::{IdentityError, IdentityMode, agent_id_from_cert};

/// The one application protocol tether speaks on its TLS port (the WebSocket upgrade).
pub const ALPN_HTTP11: &[u8] = b"http/1.1";

/// Errors of loading TLS material or building a rustls configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The PEM text is malformed.
    #[error("{origin}: bad PEM: {source}")]
    Pem {
        /// The file (or "PEM input").
        origin: String,
        /// The PEM parser's error.
        #[source]
        source: pem::Error,
    },
    /// The PEM text holds no item of the expected kind.
    #[error("{origin}: no {expected} found (expected a PEM block `-----BEGIN {marker}-----`)")]
    Missing {
        /// The file (or "PEM input").
        origin: String,
        /// What was looked for ("certificate", "private key", "CRL").
        expected: &'static str,
        /// The PEM marker that was looked for.
        marker: &'static str,
    },
    /// A CA certificate cannot be used as a trust anchor.
    #[error("{origin}: unusable CA certificate: {source}")]
    BadCa {
        /// The file (or "PEM input").
        origin: String,
        /// The rustls error.
        #[source]
        source: rustls::Error,
    },
    /// The client-certificate verifier could not be built (no CA, bad CRL).
    #[error("{origin}: {source}")]
    Verifier {
        /// The CA bundle and CRL files involved.
        origin: String,
        /// The rustls error.
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
    /// rustls refused the configuration (for example a key that does not match the certificate).
    #[error("{origin}: {source}")]
    Config {
        /// The certificate and key involved.
        origin: String,
        /// The rustls error.
        #[source]
        source: rustls::Error,
    },
    /// A certificate could not be parsed as X.509.
    #[error("cannot parse certificate: {0}")]
    BadCertificate(String),
    /// A certificate's validity has ended (refused by reloads, see `tls_check`).
    #[error("{origin}: certificate \"{subject}\" expired at {not_after} (Unix time)")]
    Expired {
        /// The file.
        origin: String,
        /// The certificate's subject.
        subject: String,
        /// Its `notAfter`, Unix seconds.
        not_after: i64,
    },
    /// A CA bundle holds a certificate that is not a CA (a leaf given as the CA file).
    #[error(
        "{origin}: \"{subject}\" is not a CA certificate (basicConstraints CA:FALSE or absent); \
         a CA bundle holds only CA certificates"
    )]
    NotACa {
        /// The file.
        origin: String,
        /// The certificate's subject.
        subject: String,
    },
}

/// The crypto provider used by every tether TLS config: aws-lc-rs, chosen explicitly so that
/// the process-wide default provider never matters.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

// === loading ===

/// Loads every certificate of a PEM file (a chain or a CA bundle); at least one is required.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let text = read(path)?;
    parse_certs(&text, &path.display().to_string())
}

/// Loads the first private key (PKCS#8, PKCS#1 or SEC1) of a PEM file.
pub fn load_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let text = read(path)?;
    parse_key(&text, &path.display().to_string())
}

/// Loads every CRL of a PEM file; at least one is required.
pub fn load_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let text = read(path)?;
    parse_crls(&text, &path.display().to_string())
}

/// Parses every certificate of a PEM string; at least one is required.
pub fn certs_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    parse_certs(pem.as_bytes(), PEM_INPUT)
}

/// Parses the first private key of a PEM string.
pub fn key_from_pem(pem: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    parse_key(pem.as_bytes(), PEM_INPUT)
}

/// Parses every CRL of a PEM string; at least one is required.
pub fn crls_from_pem(pem: &str) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    parse_crls(pem.as_bytes(), PEM_INPUT)
}

const PEM_INPUT: &str = "PEM input";

pub(crate) fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn parse_all<T: PemObject>(
    text: &[u8],
    origin: &str,
    expected: &'static str,
    marker: &'static str,
) -> Result<Vec<T>, TlsError> {
    let items = T::pem_slice_iter(text)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            origin: origin.to_owned(),
            source,
        })?;
    if items.is_empty() {
        return Err(TlsError::Missing {
            origin: origin.to_owned(),
            expected,
            marker,
        });
    }
    Ok(items)
}

pub(crate) fn parse_certs(
    text: &[u8],
    origin: &str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    parse_all(text, origin, "certificate", "CERTIFICATE")
}

pub(crate) fn parse_crls(
    text: &[u8],
    origin: &str,
) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    parse_all(text, origin, "CRL", "X509 CRL")
}

pub(crate) fn parse_key(text: &[u8], origin: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(text).map_err(|source| match source {
        pem::Error::NoItemsFound => TlsError::Missing {
            origin: origin.to_owned(),
            expected: "private key",
            marker: "PRIVATE KEY",
        },
        source => TlsError::Pem {
            origin: origin.to_owned(),
            source,
        },
    })
}

// === server ===

/// Files of the server's TLS identity and of the agent trust anchors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTlsFiles {
    /// Server certificate chain (PEM).
    pub cert: PathBuf,
    /// Server private key (PEM).
    pub key: PathBuf,
    /// CA bundle that agent certificates must chain to (PEM).
    pub client_ca: PathBuf,
    /// Optional CRLs (PEM), checked for agent certificates.
    pub crls: Vec<PathBuf>,
}

/// Whether the server's handshake demands a client certificate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ClientCertPolicy {
    /// Every client presents a certificate that verifies (the default).
    #[default]
    Required,
    /// A client may present no certificate at all; one that is presented must still verify
    /// against the CA (and the CRLs). The application then authenticates certless clients
    /// otherwise (the remotedialer token).
    Optional,
}

/// Builds the server config: TLS 1.3 only, agent certificate required and verified against
/// `client_ca` (and the CRLs), ALPN `http/1.1`.
pub fn server_config(files: &ServerTlsFiles) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    server_config_with_policy(files, ClientCertPolicy::Required)
}

/// [`server_config`] with a choice of whether a client certificate is required.
pub fn server_config_with_policy(
    files: &ServerTlsFiles,
    policy: ClientCertPolicy,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    server_tls(files, policy).map(|tls| tls.config)
}

/// A server config and the client-certificate verifier inside it, kept to verify the chains of
/// live sessions again after a reload of the CA bundle or CRLs.
#[derive(Clone)]
pub struct ServerTls {
    /// The rustls config for new handshakes.
    pub config: Arc<rustls::ServerConfig>,
    /// The verifier `config` uses for client certificates.
    pub verifier: Arc<dyn ClientCertVerifier>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls").finish_non_exhaustive()
    }
}

/// [`server_config_with_policy`], keeping the verifier.
pub fn server_tls(files: &ServerTlsFiles, policy: ClientCertPolicy) -> Result<ServerTls, TlsError> {
    let certs = load_certs(&files.cert)?;
    let key = load_private_key(&files.key)?;
    let roots = load_certs(&files.client_ca)?;
    let mut crls = Vec::new();
    for path in &files.crls {
        crls.extend(load_crls(path)?);
    }
    let ca_origin = if files.crls.is_empty() {
        files.client_ca.display().to_string()
    } else {
        let crl_names: Vec<String> = files.crls.iter().map(|p| p.display().to_string()).collect();
        format!(
            "{} with CRLs {}",
            files.client_ca.display(),
            crl_names.join(", ")
        )
    };
    build_server_tls(
        certs,
        key,
        roots,
        crls,
        policy,
        &Origins {
            identity: format!("{} / {}", files.cert.display(), files.key.display()),
            ca: ca_origin,
        },
    )
}

/// [`server_config`] from PEM strings (tests, `tether demo`).
pub fn server_config_from_pem(
    cert_pem: &str,
    key_pem: &str,
    client_ca_pem: &str,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    server_config_from_pem_with_crls(cert_pem, key_pem, client_ca_pem, &[])
}

/// [`server_config_from_pem`] with CRLs (PEM strings).
pub fn server_config_from_pem_with_crls(
    cert_pem: &str,
    key_pem: &str,
    client_ca_pem: &str,
    crl_pems: &[&str],
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut crls = Vec::new();
    for crl in crl_pems {
        crls.extend(crls_from_pem(crl)?);
    }
    build_server_config(
        certs_from_pem(cert_pem)?,
        key_from_pem(key_pem)?,
        certs_from_pem(client_ca_pem)?,
        crls,
        ClientCertPolicy::Required,
        &Origins {
            identity: PEM_INPUT.into(),
            ca: PEM_INPUT.into(),
        },
    )
}

/// Names used in error messages.
pub(crate) struct Origins {
    pub(crate) identity: String,
    pub(crate) ca: String,
}

fn root_store(
    certs: Vec<CertificateDer<'static>>,
    origin: &str,
) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots.add(cert).map_err(|source| TlsError::BadCa {
            origin: origin.to_owned(),
            source,
        })?;
    }
    Ok(roots)
}

fn build_server_config(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    client_roots: Vec<CertificateDer<'static>>,
    crls: Vec<CertificateRevocationListDer<'static>>,
    policy: ClientCertPolicy,
    origins: &Origins,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    build_server_tls(certs, key, client_roots, crls, policy, origins).map(|tls| tls.config)
}

pub(crate) fn build_server_tls(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    client_roots: Vec<CertificateDer<'static>>,
    crls: Vec<CertificateRevocationListDer<'static>>,
    policy: ClientCertPolicy,
    origins: &Origins,
) -> Result<ServerTls, TlsError> {
    let provider = crypto_provider();
    let roots = root_store(client_roots, &origins.ca)?;
    // Revocation status of certificates not covered by any CRL is an error (fail closed),
    // but only the agent's own certificate is checked: tether CAs issue agents directly.
    let mut verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
    if !crls.is_empty() {
        verifier = verifier.with_crls(crls).only_check_end_entity_revocation();
    }
    if policy == ClientCertPolicy::Optional {
        verifier = verifier.allow_unauthenticated();
    }
    let verifier = verifier.build().map_err(|source| TlsError::Verifier {
        origin: origins.ca.clone(),
        source,
    })?;
    let config_err = |source| TlsError::Config {
        origin: origins.identity.clone(),
        source,
    };
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(config_err)?
        // Records the presented certificate, so a refused handshake can name its agent.
        .with_client_cert_verifier(Arc::new(crate::tls_presented::RecordingClientVerifier(
            verifier.clone(),
        )))
        .with_single_cert(certs, key)
        .map_err(config_err)?;
    config.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
    Ok(ServerTls {
        config: Arc::new(config),
        verifier,
    })
}

// === client ===

/// Files of the agent's TLS identity and of the pinned server CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTlsFiles {
    /// Agent certificate chain (PEM).
    pub cert: PathBuf,
    /// Agent private key (PEM).
    pub key: PathBuf,
    /// CA bundle that the server certificate must chain to (PEM); the only trust anchors.
    pub server_ca: PathBuf,
}

/// Builds the agent's config: TLS 1.3 only, trusting only `server_ca`, presenting the agent
/// certificate, ALPN `http/1.1`.
pub fn client_config(files: &ClientTlsFiles) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    build_client_config(
        load_certs(&files.cert)?,
        load_private_key(&files.key)?,
        load_certs(&files.server_ca)?,
        &Origins {
            identity: format!("{} / {}", files.cert.display(), files.key.display()),
            ca: files.server_ca.display().to_string(),
        },
    )
}

/// [`client_config`] from PEM strings (tests, `tether demo`).
pub fn client_config_from_pem(
    cert_pem: &str,
    key_pem: &str,
    server_ca_pem: &str,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    build_client_config(
        certs_from_pem(cert_pem)?,
        key_from_pem(key_pem)?,
        certs_from_pem(server_ca_pem)?,
        &Origins {
            identity: PEM_INPUT.into(),
            ca: PEM_INPUT.into(),
        },
    )
}

pub(crate) fn build_client_config(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    server_roots: Vec<CertificateDer<'static>>,
    origins: &Origins,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let roots = root_store(server_roots, &origins.ca)?;
    let config_err = |source| TlsError::Config {
        origin: origins.identity.clone(),
        source,
    };
    let mut config = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(config_err)?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .map_err(config_err)?;
    config.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
    Ok(Arc::new(config))
}

// === after the handshake ===

/// `notAfter` of a DER certificate, in Unix seconds (for `tether_tls_cert_expiry_timestamp_seconds`).
pub fn cert_not_after(cert_der: &[u8]) -> Result<i64, TlsError> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| TlsError::BadCertificate(e.to_string()))?;
    Ok(cert.validity().not_after.timestamp())
}

/// The agent id of the peer of a completed server-side handshake (first peer certificate).
pub fn peer_identity(
    conn: &rustls::ServerConnection,
    mode: IdentityMode,
) -> Result<String, IdentityError> {
    let cert = conn
        .peer_certificates()
        .and_then(|certs| certs.first())
        .ok_or(IdentityError::NoPeerCertificate)?;
    agent_id_from_cert(cert, mode)
}

/// Whether a server-side connection may go on with HTTP/1.1: the client negotiated `http/1.1`,
/// or offered no ALPN at all (ordinary WebSocket clients such as Go's gorilla/websocket never
/// do).
///
/// A client whose ALPN list excludes `http/1.1` does not get here: rustls ends its handshake
/// with `no_application_protocol` ([`rustls::Error::NoApplicationProtocol`]). Anything else
/// negotiated is refused.
pub fn alpn_ok(negotiated: Option<&[u8]>) -> bool {
    negotiated.is_none_or(|proto| proto == ALPN_HTTP11)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{Ca, CertifiedKeyPem, IssueOptions, write_file_private, write_file_public};
    use rustls::pki_types::ServerName;
    use std::io;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    use crate::tls_presented::capture;

    struct Fixture {
        ca: Ca,
        other_ca: Ca,
        server: CertifiedKeyPem,
    }

    fn fixture() -> Fixture {
        let ca = Ca::generate("tether test CA").unwrap();
        let other_ca = Ca::generate("other CA").unwrap();
        let server = ca
            .issue_server(
                &["localhost".into()],
                &["127.0.0.1".parse().unwrap()],
                &IssueOptions::default(),
            )
            .unwrap();
        Fixture {
            ca,
            other_ca,
            server,
        }
    }

    impl Fixture {
        fn server_config(&self) -> Arc<rustls::ServerConfig> {
            server_config_from_pem(
                &self.server.cert_pem,
                &self.server.key_pem,
                self.ca.cert_pem(),
            )
            .unwrap()
        }

        fn client_config(&self, agent: &CertifiedKeyPem) -> Arc<rustls::ClientConfig> {
            client_config_from_pem(&agent.cert_pem, &agent.key_pem, self.ca.cert_pem()).unwrap()
        }

        fn agent(&self, id: &str) -> CertifiedKeyPem {
            self.ca.issue_agent(id, &IssueOptions::default()).unwrap()
        }
    }

    struct Outcome {
        server: io::Result<(Option<String>, Result<String, IdentityError>)>,
        client: io::Result<()>,
    }

    /// Runs a handshake over an in-memory pipe, then one byte each way so that a client whose
    /// certificate the server rejected (TLS 1.3 reports that after the client's Finished)
    /// sees the failure too.
    async fn handshake(
        server: Arc<rustls::ServerConfig>,
        client: Arc<rustls::ClientConfig>,
    ) -> Outcome {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let server_side = async move {
            let mut tls = TlsAcceptor::from(server).accept(server_io).await?;
            let alpn = tls
                .get_ref()
                .1
                .alpn_protocol()
                .map(|p| String::from_utf8_lossy(p).into_owned());
            let identity = peer_identity(tls.get_ref().1, IdentityMode::UriSan);
            let mut byte = [0u8; 1];
            tls.read_exact(&mut byte).await?;
            tls.write_all(&byte).await?;
            tls.shutdown().await?;
            Ok((alpn, identity))
        };
        let client_side = async move {
            let name = ServerName::try_from("localhost").unwrap();
            let mut tls = TlsConnector::from(client).connect(name, client_io).await?;
            tls.write_all(b"x").await?;
            let mut byte = [0u8; 1];
            tls.read_exact(&mut byte).await?;
            Ok(())
        };
        let (server, client) = tokio::join!(server_side, client_side);
        Outcome { server, client }
    }

    fn rustls_error(err: &io::Error) -> Option<&rustls::Error> {
        err.get_ref()
            .and_then(|e| e.downcast_ref::<rustls::Error>())
    }

    fn is_cert_error(err: &io::Error, pred: impl Fn(&rustls::CertificateError) -> bool) -> bool {
        matches!(rustls_error(err), Some(rustls::Error::InvalidCertificate(e)) if pred(e))
    }

    #[tokio::test]
    async fn mutual_tls_succeeds_and_server_sees_identity() {
        let f = fixture();
        let out = handshake(f.server_config(), f.client_config(&f.agent("edge-1"))).await;
        out.client.unwrap();
        let (alpn, identity) = out.server.unwrap();
        assert_eq!(alpn.as_deref(), Some("http/1.1"));
        assert!(alpn_ok(alpn.as_deref().map(str::as_bytes)));
        assert_eq!(identity.unwrap(), "edge-1");
    }

    #[tokio::test]
    async fn client_cert_from_another_ca_is_refused() {
        let f = fixture();
        let stranger = f
            .other_ca
            .issue_agent("edge-1", &IssueOptions::default())
            .unwrap();
        let out = handshake(f.server_config(), f.client_config(&stranger)).await;
        let err = out.server.unwrap_err();
        assert!(
            is_cert_error(&err, |e| matches!(
                e,
                rustls::CertificateError::UnknownIssuer
            )),
            "{err:?}"
        );
        assert!(out.client.is_err());
    }

    #[tokio::test]
    async fn expired_client_cert_is_refused() {
        let f = fixture();
        let old =
            f.ca.issue_agent("edge-1", &IssueOptions::expired())
                .unwrap();
        let out = handshake(f.server_config(), f.client_config(&old)).await;
        let err = out.server.unwrap_err();
        assert!(
            is_cert_error(&err, |e| matches!(
                e,
                rustls::CertificateError::Expired | rustls::CertificateError::ExpiredContext { .. }
            )),
            "{err:?}"
        );
        assert!(out.client.is_err());
    }

    /// A TLS 1.3 client that trusts the fixture's CA and presents no certificate.
    fn certless_client(f: &Fixture) -> rustls::ClientConfig {
        let mut roots = RootCertStore::empty();
        roots
            .add(certs_from_pem(f.ca.cert_pem()).unwrap().remove(0))
            .unwrap();
        let mut no_cert = rustls::ClientConfig::builder_with_provider(crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        no_cert.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
        no_cert
    }

    #[tokio::test]
    async fn client_without_certificate_is_refused() {
        let f = fixture();
        let no_cert = certless_client(&f);
        let out = handshake(f.server_config(), Arc::new(no_cert)).await;
        let err = out.server.unwrap_err();
        assert!(
            matches!(
                rustls_error(&err),
                Some(rustls::Error::NoCertificatesPresented)
            ),
            "{err:?}"
        );
        assert!(out.client.is_err());
    }

    #[tokio::test]
    async fn optional_client_cert_admits_certless_clients_but_still_verifies_presented_ones() {
        let f = fixture();
        let optional = build_server_config(
            certs_from_pem(&f.server.cert_pem).unwrap(),
            key_from_pem(&f.server.key_pem).unwrap(),
            certs_from_pem(f.ca.cert_pem()).unwrap(),
            Vec::new(),
            ClientCertPolicy::Optional,
            &Origins {
                identity: PEM_INPUT.into(),
                ca: PEM_INPUT.into(),
            },
        )
        .unwrap();
        // No certificate: the handshake completes and there is no identity.
        let no_cert = certless_client(&f);
        let out = handshake(optional.clone(), Arc::new(no_cert)).await;
        out.client.unwrap();
        let (_, identity) = out.server.unwrap();
        assert_eq!(identity.unwrap_err(), IdentityError::NoPeerCertificate);
        // A good certificate still yields its identity.
        let out = handshake(optional.clone(), f.client_config(&f.agent("edge-1"))).await;
        assert_eq!(out.server.unwrap().1.unwrap(), "edge-1");
        // A presented certificate from another CA is still refused.
        let stranger = f
            .other_ca
            .issue_agent("edge-1", &IssueOptions::default())
            .unwrap();
        let out = handshake(optional, f.client_config(&stranger)).await;
        let err = out.server.unwrap_err();
        assert!(
            is_cert_error(&err, |e| matches!(
                e,
                rustls::CertificateError::UnknownIssuer
            )),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn server_cert_from_another_ca_is_refused_by_client() {
        let f = fixture();
        let rogue = f
            .other_ca
            .issue_server(&["localhost".into()], &[], &IssueOptions::default())
            .unwrap();
        let server =
            server_config_from_pem(&rogue.cert_pem, &rogue.key_pem, f.ca.cert_pem()).unwrap();
        let out = handshake(server, f.client_config(&f.agent("edge-1"))).await;
        let err = out.client.unwrap_err();
        assert!(
            is_cert_error(&err, |e| matches!(
                e,
                rustls::CertificateError::UnknownIssuer
            )),
            "{err:?}"
        );
        assert!(out.server.is_err());
    }

    #[tokio::test]
    async fn cert_without_uri_san_handshakes_but_has_no_identity() {
        let f = fixture();
        let opts = IssueOptions {
            omit_uri_san: true,
            ..IssueOptions::default()
        };
        let bare = f.ca.issue_agent("edge-1", &opts).unwrap();
        let out = handshake(f.server_config(), f.client_config(&bare)).await;
        out.client.unwrap();
        let (_, identity) = out.server.unwrap();
        let err = identity.unwrap_err();
        assert_eq!(err, IdentityError::MissingUriSan);
        assert_eq!(err.reason(), "missing_uri_san");
    }

    #[tokio::test]
    async fn tls12_only_client_is_refused() {
        let f = fixture();
        let agent = f.agent("edge-1");
        let mut roots = RootCertStore::empty();
        roots
            .add(certs_from_pem(f.ca.cert_pem()).unwrap().remove(0))
            .unwrap();
        let tls12 = rustls::ClientConfig::builder_with_provider(crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS12])
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(
                certs_from_pem(&agent.cert_pem).unwrap(),
                key_from_pem(&agent.key_pem).unwrap(),
            )
            .unwrap();
        let out = handshake(f.server_config(), Arc::new(tls12)).await;
        let err = out.server.unwrap_err();
        assert!(
            matches!(
                rustls_error(&err),
                Some(rustls::Error::PeerIncompatible(
                    rustls::PeerIncompatible::Tls12NotOfferedOrEnabled
                ))
            ),
            "{err:?}"
        );
        let err = out.client.unwrap_err();
        assert!(
            matches!(
                rustls_error(&err),
                Some(rustls::Error::AlertReceived(
                    rustls::AlertDescription::ProtocolVersion
                ))
            ),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn client_without_alpn_handshakes_and_is_accepted() {
        let f = fixture();
        let agent = f.agent("edge-1");
        let mut config = (*f.client_config(&agent)).clone();
        config.alpn_protocols.clear();
        let out = handshake(f.server_config(), Arc::new(config)).await;
        out.client.unwrap();
        let (alpn, _) = out.server.unwrap();
        assert_eq!(alpn, None);
        assert!(alpn_ok(None));
        assert!(!alpn_ok(Some(b"h2")));
        assert!(alpn_ok(Some(b"http/1.1")));
    }

    #[tokio::test]
    async fn client_offering_only_h2_fails_the_handshake() {
        let f = fixture();
        let agent = f.agent("edge-1");
        let mut config = (*f.client_config(&agent)).clone();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let out = handshake(f.server_config(), Arc::new(config)).await;
        assert!(out.client.is_err());
        let err = out.server.unwrap_err();
        assert!(
            matches!(
                err.get_ref()
                    .and_then(|e| e.downcast_ref::<rustls::Error>()),
                Some(rustls::Error::NoApplicationProtocol)
            ),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn revoked_client_cert_is_refused() {
        let f = fixture();
        let revoked = f.agent("edge-1");
        let fine = f.agent("edge-2");
        let crl = f.ca.crl_pem(&[&revoked.cert_pem]).unwrap();
        let server = server_config_from_pem_with_crls(
            &f.server.cert_pem,
            &f.server.key_pem,
            f.ca.cert_pem(),
            &[&crl],
        )
        .unwrap();
        let out = handshake(server.clone(), f.client_config(&revoked)).await;
        let err = out.server.unwrap_err();
        assert!(
            is_cert_error(&err, |e| matches!(e, rustls::CertificateError::Revoked)),
            "{err:?}"
        );
        let out = handshake(server, f.client_config(&fine)).await;
        assert_eq!(out.server.unwrap().1.unwrap(), "edge-2");
    }

    #[test]
    fn configs_from_files() {
        let f = fixture();
        let agent = f.agent("edge-1");
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        write_file_public(&p("ca.pem"), f.ca.cert_pem()).unwrap();
        write_file_public(&p("server.pem"), &f.server.cert_pem).unwrap();
        write_file_private(&p("server-key.pem"), &f.server.key_pem).unwrap();
        write_file_public(&p("agent.pem"), &agent.cert_pem).unwrap();
        write_file_private(&p("agent-key.pem"), &agent.key_pem).unwrap();
        write_file_public(&p("crl.pem"), f.ca.crl_pem(&[]).unwrap()).unwrap();
        let server = server_config(&ServerTlsFiles {
            cert: p("server.pem"),
            key: p("server-key.pem"),
            client_ca: p("ca.pem"),
            crls: vec![p("crl.pem")],
        })
        .unwrap();
        assert_eq!(server.alpn_protocols, vec![b"http/1.1".to_vec()]);
        let client = client_config(&ClientTlsFiles {
            cert: p("agent.pem"),
            key: p("agent-key.pem"),
            server_ca: p("ca.pem"),
        })
        .unwrap();
        assert_eq!(client.alpn_protocols, vec![b"http/1.1".to_vec()]);

        // A CRL file that is not a CRL is named in the error.
        let err = server_config(&ServerTlsFiles {
            cert: p("server.pem"),
            key: p("server-key.pem"),
            client_ca: p("ca.pem"),
            crls: vec![p("ca.pem")],
        })
        .unwrap_err();
        assert!(
            matches!(
                err,
                TlsError::Missing {
                    expected: "CRL",
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("ca.pem"), "{err}");
    }

    #[test]
    fn load_errors_name_the_file_and_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.pem");
        let err = load_certs(&missing).unwrap_err();
        assert!(matches!(err, TlsError::Read { .. }));
        assert!(err.to_string().contains("nope.pem"), "{err}");

        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "just text\n").unwrap();
        let err = load_certs(&empty).unwrap_err();
        assert!(err.to_string().contains("empty.pem"), "{err}");
        assert!(err.to_string().contains("no certificate found"), "{err}");
        let err = load_private_key(&empty).unwrap_err();
        assert!(err.to_string().contains("no private key found"), "{err}");

        let broken = dir.path().join("broken.pem");
        std::fs::write(
            &broken,
            "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let err = load_certs(&broken).unwrap_err();
        assert!(matches!(err, TlsError::Pem { .. }), "{err}");
        assert!(err.to_string().contains("broken.pem"), "{err}");

        // A key file given where a certificate is expected.
        let f = fixture();
        let key_only = dir.path().join("key.pem");
        std::fs::write(&key_only, &f.server.key_pem).unwrap();
        assert!(matches!(
            load_certs(&key_only),
            Err(TlsError::Missing { .. })
        ));
        assert!(load_private_key(&key_only).is_ok());
    }

    #[test]
    fn mismatched_key_is_a_config_error() {
        let f = fixture();
        let agent = f.agent("edge-1");
        let err = server_config_from_pem(&f.server.cert_pem, &agent.key_pem, f.ca.cert_pem())
            .unwrap_err();
        assert!(matches!(err, TlsError::Config { .. }), "{err}");
    }

    #[test]
    fn not_after_is_reported() {
        let f = fixture();
        let der = certs_from_pem(&f.server.cert_pem).unwrap().remove(0);
        let not_after = cert_not_after(&der).unwrap();
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        assert!((now + 364 * 86400..=now + 366 * 86400).contains(&not_after));
        assert!(cert_not_after(b"junk").is_err());
    }

    /// A refused client certificate is still handed to the caller, inside
    /// `tls_presented::capture` only.
    #[tokio::test]
    async fn a_refused_client_certificate_is_captured() {
        let ca = Ca::generate("test CA").unwrap();
        let other = Ca::generate("other CA").unwrap();
        let server = ca
            .issue_server(&["localhost".into()], &[], &IssueOptions::default())
            .unwrap();
        let stranger = other
            .issue_agent("edge-9", &IssueOptions::default())
            .unwrap();
        let server_config =
            server_config_from_pem(&server.cert_pem, &server.key_pem, ca.cert_pem()).unwrap();
        let client_config =
            client_config_from_pem(&stranger.cert_pem, &stranger.key_pem, ca.cert_pem()).unwrap();

        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let accept = TlsAcceptor::from(server_config).accept(server_io);
        let connect = async move {
            let name = ServerName::try_from("localhost").unwrap();
            let mut tls = TlsConnector::from(client_config)
                .connect(name, client_io)
                .await?;
            tls.read_u8().await
        };
        let ((accepted, presented), _) = tokio::join!(capture(accept), connect);
        let err = accepted.err().unwrap();
        let rustls_err = err.get_ref().unwrap().downcast_ref::<rustls::Error>();
        assert!(
            matches!(rustls_err, Some(rustls::Error::InvalidCertificate(_))),
            "{err}"
        );
        let expected = certs_from_pem(&stranger.cert_pem).unwrap();
        assert_eq!(presented.as_ref(), expected.first());
    }
}
