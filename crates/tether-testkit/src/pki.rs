//! A throwaway PKI for tests: a CA, a `localhost` server certificate, agent certificates and an
//! unrelated second CA, all written to a temporary directory that is removed on drop.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tempfile::TempDir;
use tether_common::pki::{
    Ca, CertifiedKeyPem, IssueOptions, write_file_private, write_file_public,
};
use tether_common::tls::{self, ClientTlsFiles, ServerTlsFiles};

/// An agent certificate issued by a [`TestPki`], as PEM and as files.
#[derive(Debug, Clone)]
pub struct AgentCert {
    /// The agent id it was issued for.
    pub id: String,
    /// Certificate, PEM.
    pub cert_pem: String,
    /// Private key, PEM.
    pub key_pem: String,
    /// Certificate file.
    pub cert_path: PathBuf,
    /// Private key file (mode 0600).
    pub key_path: PathBuf,
}

/// CA, server certificate and agent certificates in a temporary directory.
///
/// The server certificate is valid for `localhost`, `127.0.0.1` and `::1`. Panics on failure:
/// it is only for tests.
pub struct TestPki {
    dir: TempDir,
    ca: Ca,
    ca_path: PathBuf,
    other_ca: Ca,
    other_ca_path: PathBuf,
    server: CertifiedKeyPem,
    server_cert_path: PathBuf,
    server_key_path: PathBuf,
    /// Makes every issued agent's file names unique.
    issued: AtomicUsize,
}

impl std::fmt::Debug for TestPki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestPki")
            .field("dir", &self.dir.path())
            .finish_non_exhaustive()
    }
}

impl Default for TestPki {
    fn default() -> Self {
        Self::new()
    }
}

impl TestPki {
    /// Generates the CAs and the server certificate and writes them out.
    pub fn new() -> TestPki {
        let dir = tempfile::tempdir().expect("create a temporary PKI directory");
        let ca = Ca::generate("tether test CA").expect("generate the test CA");
        let other_ca = Ca::generate("unrelated test CA").expect("generate the other CA");
        let ips: [IpAddr; 2] = [[127, 0, 0, 1].into(), std::net::Ipv6Addr::LOCALHOST.into()];
        let server = ca
            .issue_server(&["localhost".to_owned()], &ips, &IssueOptions::default())
            .expect("issue the test server certificate");
        let pki = TestPki {
            ca_path: dir.path().join("ca.pem"),
            other_ca_path: dir.path().join("other-ca.pem"),
            server_cert_path: dir.path().join("server.pem"),
            server_key_path: dir.path().join("server-key.pem"),
            dir,
            ca,
            other_ca,
            server,
            issued: AtomicUsize::new(0),
        };
        write_file_public(&pki.ca_path, pki.ca.cert_pem()).expect("write ca.pem");
        write_file_public(&pki.other_ca_path, pki.other_ca.cert_pem()).expect("write other-ca.pem");
        write_file_public(&pki.server_cert_path, &pki.server.cert_pem).expect("write server.pem");
        write_file_private(&pki.server_key_path, &pki.server.key_pem)
            .expect("write server-key.pem");
        pki
    }

    /// The temporary directory holding every file.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The CA that signs the server and agent certificates.
    pub fn ca(&self) -> &Ca {
        &self.ca
    }

    /// The CA certificate, PEM.
    pub fn ca_pem(&self) -> &str {
        self.ca.cert_pem()
    }

    /// The CA certificate file (`ca.pem`).
    pub fn ca_path(&self) -> &Path {
        &self.ca_path
    }

    /// A second CA that nothing trusts.
    pub fn other_ca(&self) -> &Ca {
        &self.other_ca
    }

    /// The other CA's certificate file (`other-ca.pem`).
    pub fn other_ca_path(&self) -> &Path {
        &self.other_ca_path
    }

    /// Server certificate, PEM.
    pub fn server_cert_pem(&self) -> &str {
        &self.server.cert_pem
    }

    /// Server private key, PEM.
    pub fn server_key_pem(&self) -> &str {
        &self.server.key_pem
    }

    /// Server certificate file (`server.pem`).
    pub fn server_cert_path(&self) -> &Path {
        &self.server_cert_path
    }

    /// Server private key file (`server-key.pem`).
    pub fn server_key_path(&self) -> &Path {
        &self.server_key_path
    }

    /// A valid agent certificate for `id` from the CA.
    pub fn agent(&self, id: &str) -> AgentCert {
        self.agent_with(id, IssueOptions::default())
    }

    /// An agent certificate for `id` from the CA with custom options (expired, no URI SAN, ...).
    pub fn agent_with(&self, id: &str, opts: IssueOptions) -> AgentCert {
        let issued = self
            .ca
            .issue_agent(id, &opts)
            .expect("issue an agent certificate");
        self.store_agent(id, issued)
    }

    /// A replica's peer certificate (`tether://server/<server_id>`) from the CA; `id` of the
    /// returned files is the server id.
    pub fn server_peer(&self, server_id: &str) -> AgentCert {
        let issued = self
            .ca
            .issue_server_peer(server_id, &IssueOptions::default())
            .expect("issue a server peer certificate");
        self.store_agent(&format!("peer-{server_id}"), issued)
    }

    /// An agent certificate for `id` from the untrusted other CA.
    pub fn agent_from_other_ca(&self, id: &str) -> AgentCert {
        let issued = self
            .other_ca
            .issue_agent(id, &IssueOptions::default())
            .expect("issue an agent certificate from the other CA");
        self.store_agent(id, issued)
    }

    /// Writes `contents` to `name` in the PKI directory (mode 0644) and returns the path.
    pub fn write_file(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        write_file_public(&path, contents).expect("write a test file");
        path
    }

    /// Server files: server certificate and key, agents verified against the CA, no CRL.
    pub fn server_files(&self) -> ServerTlsFiles {
        ServerTlsFiles {
            cert: self.server_cert_path.clone(),
            key: self.server_key_path.clone(),
            client_ca: self.ca_path.clone(),
            crls: Vec::new(),
        }
    }

    /// Agent files: `agent`'s certificate and key, the server pinned to the CA.
    pub fn client_files(&self, agent: &AgentCert) -> ClientTlsFiles {
        ClientTlsFiles {
            cert: agent.cert_path.clone(),
            key: agent.key_path.clone(),
            server_ca: self.ca_path.clone(),
        }
    }

    /// The server's rustls config built from [`server_files`](Self::server_files).
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        tls::server_config(&self.server_files()).expect("build the test server TLS config")
    }

    /// `agent`'s rustls config built from [`client_files`](Self::client_files).
    pub fn client_config(&self, agent: &AgentCert) -> Arc<rustls::ClientConfig> {
        tls::client_config(&self.client_files(agent)).expect("build the test client TLS config")
    }

    fn store_agent(&self, id: &str, issued: CertifiedKeyPem) -> AgentCert {
        let n = self.issued.fetch_add(1, Ordering::Relaxed);
        let cert_path = self.dir.path().join(format!("agent-{id}-{n}.pem"));
        let key_path = self.dir.path().join(format!("agent-{id}-{n}-key.pem"));
        write_file_public(&cert_path, &issued.cert_pem).expect("write an agent certificate");
        write_file_private(&key_path, &issued.key_pem).expect("write an agent key");
        AgentCert {
            id: id.to_owned(),
            cert_pem: issued.cert_pem,
            key_pem: issued.key_pem,
            cert_path,
            key_path,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_common::identity::IdentityMode;
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    #[test]
    fn files_exist_and_match_pem() {
        let pki = TestPki::new();
        assert_eq!(
            std::fs::read_to_string(pki.ca_path()).unwrap(),
            pki.ca_pem()
        );
        assert_eq!(
            std::fs::read_to_string(pki.server_key_path()).unwrap(),
            pki.server_key_pem()
        );
        let a = pki.agent("edge-1");
        let b = pki.agent("edge-1");
        assert_ne!(a.cert_path, b.cert_path, "repeated ids get distinct files");
        assert_eq!(std::fs::read_to_string(&b.cert_path).unwrap(), b.cert_pem);
        assert!(pki.other_ca_path().exists());
        let dir = pki.dir().to_owned();
        drop(pki);
        assert!(!dir.exists(), "the directory goes away with the TestPki");
    }

    #[tokio::test]
    async fn configs_handshake_and_identify_the_agent() {
        let pki = TestPki::new();
        let agent = pki.agent("edge-1");
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let acceptor = TlsAcceptor::from(pki.server_config());
        let connector = TlsConnector::from(pki.client_config(&agent));
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let (server, client) = tokio::join!(
            acceptor.accept(server_io),
            connector.connect(name, client_io)
        );
        client.unwrap();
        let server = server.unwrap();
        let id = tls::peer_identity(server.get_ref().1, IdentityMode::UriSan).unwrap();
        assert_eq!(id, "edge-1");
    }

    #[tokio::test]
    async fn other_ca_agent_is_refused() {
        let pki = TestPki::new();
        let stranger = pki.agent_from_other_ca("edge-1");
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let acceptor = TlsAcceptor::from(pki.server_config());
        let connector = TlsConnector::from(pki.client_config(&stranger));
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let (server, _client) = tokio::join!(
            acceptor.accept(server_io),
            connector.connect(name, client_io)
        );
        assert!(server.is_err());
    }
}
