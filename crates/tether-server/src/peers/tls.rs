//! The TLS of peer sessions: ALPN `tether-peer/1` on both ends, this replica's peer
//! certificate as the client, its server certificate (client certificate required) as the
//! listener, the peer identity check after the handshake, and the hot reload of both (loaded
//! and checked by `tls_check` as the agent listener's material is; swapped only when good and
//! changed; live peer sessions untouched).

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::ArcSwap;
use rustls::pki_types::CertificateDer;
use tether_common::identity::{IdentityError, server_id_from_peer_cert};
use tether_common::pki_ops::serial_hex;
use tether_common::tls::{ClientCertPolicy, ClientTlsFiles, ServerTlsFiles, TlsError};
use tether_common::tls_check::{self, LoadedClientTls, LoadedServerTls};
use tracing::{info, warn};

use super::config::PeersConfig;
use super::metrics::PeerMetrics;

/// The ALPN protocol of peer sessions: a peer listener speaks nothing else.
pub(crate) const ALPN_PEER: &[u8] = b"tether-peer/1";

/// The fingerprints of the files as read: (listener side, client side); `None` when a file
/// cannot be read.
type Fingerprints = (Option<u64>, Option<u64>);

/// Both TLS configs in force and the fingerprints of what they were loaded from.
struct Active {
    client: Arc<rustls::ClientConfig>,
    server: Arc<rustls::ServerConfig>,
    fingerprints: Fingerprints,
}

/// The peering's TLS material in force, and how to replace it. Cheap to clone; clones share
/// the material, so a reload reaches the listener and the dialer at once.
#[derive(Clone)]
pub(crate) struct PeerTls {
    inner: Arc<Inner>,
}

struct Inner {
    active: ArcSwap<Active>,
    /// The peer certificate, key and CA files (`peers:` needs a restart to change them).
    client_files: ClientTlsFiles,
    /// Files last refused: the same bytes are not logged or counted again.
    refused: Mutex<Option<Fingerprints>>,
    metrics: PeerMetrics,
}

impl std::fmt::Debug for PeerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerTls").finish_non_exhaustive()
    }
}

impl PeerTls {
    /// Loads the peer certificate (client side) and this server's TLS files with a required
    /// client certificate (listener side).
    pub(crate) fn load(
        peers: &PeersConfig,
        server: &ServerTlsFiles,
        metrics: PeerMetrics,
    ) -> Result<PeerTls, TlsError> {
        let client_files = ClientTlsFiles {
            cert: peers.cert.clone(),
            key: peers.key.clone(),
            server_ca: peers.server_ca.clone(),
        };
        let active = load_checked(&client_files, server)?;
        Ok(PeerTls {
            inner: Arc::new(Inner {
                active: ArcSwap::from_pointee(active),
                client_files,
                refused: Mutex::new(None),
                metrics,
            }),
        })
    }

    /// The client config for the next peer dial.
    pub(crate) fn client(&self) -> Arc<rustls::ClientConfig> {
        self.inner.active.load().client.clone()
    }

    /// The server config for the next peer handshake on the listener.
    pub(crate) fn server(&self) -> Arc<rustls::ServerConfig> {
        self.inner.active.load().server.clone()
    }

    /// The peer certificate, key and CA files (the listener's are the server's `tls:` files,
    /// watched already).
    pub(crate) fn watched_files(&self) -> Vec<PathBuf> {
        let files = &self.inner.client_files;
        vec![
            files.cert.clone(),
            files.key.clone(),
            files.server_ca.clone(),
        ]
    }

    /// Reloads both sides when their files changed (the listener's from `server`, the
    /// server's `tls:` files in force): new peer handshakes use the new material, live peer
    /// sessions stay. Bad material is logged and counted once per content and the material
    /// in force stays. Returns whether new material was applied.
    pub(crate) fn reload(&self, server: &ServerTlsFiles) -> bool {
        let client_files = &self.inner.client_files;
        let now = (
            tls_check::server_files_fingerprint(server),
            tls_check::client_files_fingerprint(client_files),
        );
        if now == self.inner.active.load().fingerprints {
            self.count("unchanged");
            return false;
        }
        let mut refused = self
            .inner
            .refused
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if *refused == Some(now) {
            return false;
        }
        match load_checked(client_files, server) {
            Ok(active) => {
                *refused = None;
                self.inner.active.store(Arc::new(active));
                self.count("applied");
                info!("peer TLS material reloaded; new peer sessions use it");
                true
            }
            Err(err) => {
                *refused = Some(now);
                self.count("rejected");
                warn!(error = %err, "new peer TLS material refused; the material in force stays");
                false
            }
        }
    }

    fn count(&self, result: &str) {
        self.inner
            .metrics
            .tls_reloads
            .with_label_values(&[result])
            .inc();
    }
}

/// Loads and checks both sides (`tls_check`: expiry, CA bundles, key match) and that the
/// client certificate is a peer certificate (`tether://server/<id>`).
fn load_checked(
    client_files: &ClientTlsFiles,
    server: &ServerTlsFiles,
) -> Result<Active, TlsError> {
    let LoadedClientTls {
        config: client,
        cert_chain,
        fingerprint: client_fp,
        ..
    } = tls_check::load_client_tls(client_files)?;
    if let Err(err) = server_id_from_peer_cert(&cert_chain[0]) {
        return Err(TlsError::BadCertificate(format!(
            "{}: not a server peer certificate: {err}",
            client_files.cert.display()
        )));
    }
    let LoadedServerTls {
        tls,
        fingerprint: server_fp,
        ..
    } = tls_check::load_server_tls(server, ClientCertPolicy::Required)?;
    let mut client = (*client).clone();
    client.alpn_protocols = vec![ALPN_PEER.to_vec()];
    let mut listener = (*tls.config).clone();
    listener.alpn_protocols = vec![ALPN_PEER.to_vec()];
    Ok(Active {
        client: Arc::new(client),
        server: Arc::new(listener),
        fingerprints: (Some(server_fp), Some(client_fp)),
    })
}

/// The server id of a verified peer chain (end entity first).
pub(crate) fn peer_id(chain: Option<&[CertificateDer<'_>]>) -> Result<String, IdentityError> {
    let leaf = chain
        .and_then(|c| c.first())
        .ok_or(IdentityError::NoPeerCertificate)?;
    server_id_from_peer_cert(leaf)
}

/// The serial number (hex) of a peer chain's leaf, for the log.
pub(crate) fn peer_serial(chain: Option<&[CertificateDer<'_>]>) -> String {
    chain
        .and_then(|c| c.first())
        .and_then(|leaf| serial_hex(leaf))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use tether_common::duration::HumanDuration;
    use tether_common::pki::{self, IssueOptions};

    use super::*;

    fn fixture(dir: &Path) -> (PeersConfig, ServerTlsFiles) {
        pki::init_dir(dir, &["localhost".to_owned()], &[]).expect("pki");
        pki::issue_server_peer_files(dir, "r1", &IssueOptions::default()).expect("peer cert");
        let peers = PeersConfig {
            listen: "127.0.0.1:0".into(),
            members: vec!["127.0.0.1:1".into()],
            cert: dir.join("server-peer-r1.pem"),
            key: dir.join("server-peer-r1-key.pem"),
            server_ca: dir.join("ca.pem"),
            server_name: String::new(),
            interval: HumanDuration::secs(10),
            relay_timeout: HumanDuration::secs(10),
        };
        let server = ServerTlsFiles {
            cert: dir.join("server.pem"),
            key: dir.join("server-key.pem"),
            client_ca: dir.join("ca.pem"),
            crls: Vec::new(),
        };
        (peers, server)
    }

    fn counted(tls: &PeerTls, result: &str) -> u64 {
        tls.inner
            .metrics
            .tls_reloads
            .with_label_values(&[result])
            .get()
    }

    #[test]
    fn new_files_are_swapped_in_and_bad_ones_refused_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (peers, server) = fixture(dir.path());
        let metrics = PeerMetrics::register(&prometheus::Registry::new()).expect("metrics");
        let tls = PeerTls::load(&peers, &server, metrics).expect("load");
        let (client, listener) = (tls.client(), tls.server());

        assert!(!tls.reload(&server), "same files: nothing applied");
        assert_eq!(counted(&tls, "unchanged"), 1);
        assert!(Arc::ptr_eq(&client, &tls.client()));

        // A renewed peer certificate (same id, new key and serial) is swapped in.
        pki::issue_server_peer_files(dir.path(), "r1", &IssueOptions::default()).expect("renew");
        assert!(tls.reload(&server));
        assert_eq!(counted(&tls, "applied"), 1);
        assert!(!Arc::ptr_eq(&client, &tls.client()));
        assert!(!Arc::ptr_eq(&listener, &tls.server()));
        assert_eq!(tls.client().alpn_protocols, vec![ALPN_PEER.to_vec()]);
        assert_eq!(tls.server().alpn_protocols, vec![ALPN_PEER.to_vec()]);

        // An agent certificate in the peer certificate's place is refused, once per content.
        let in_force = tls.client();
        pki::issue_agent_files(dir.path(), "edge-1").expect("agent cert");
        std::fs::copy(dir.path().join("agent-edge-1.pem"), &peers.cert).expect("copy");
        std::fs::copy(dir.path().join("agent-edge-1-key.pem"), &peers.key).expect("copy");
        assert!(!tls.reload(&server));
        assert!(!tls.reload(&server));
        assert_eq!(counted(&tls, "rejected"), 1);
        assert!(
            Arc::ptr_eq(&in_force, &tls.client()),
            "the old material stays"
        );

        // Garbage is new content: refused and counted again; then good files apply.
        std::fs::write(&peers.cert, "not a certificate").expect("write");
        assert!(!tls.reload(&server));
        assert_eq!(counted(&tls, "rejected"), 2);
        pki::issue_server_peer_files(dir.path(), "r1", &IssueOptions::default()).expect("renew");
        assert!(tls.reload(&server));
        assert_eq!(counted(&tls, "applied"), 2);
        assert_eq!(
            tls.watched_files(),
            vec![
                peers.cert.clone(),
                peers.key.clone(),
                peers.server_ca.clone()
            ]
        );
    }
}
