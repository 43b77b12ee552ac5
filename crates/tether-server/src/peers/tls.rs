//! The TLS of peer sessions: ALPN `tether-peer/1` on both ends, this replica's peer
//! certificate as the client, its server certificate (client certificate required) as the
//! listener, and the peer identity check after the handshake.

use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use tether_common::identity::{IdentityError, server_id_from_peer_cert};
use tether_common::tls::{self, ClientCertPolicy, ClientTlsFiles, ServerTlsFiles, TlsError};

use super::config::PeersConfig;

/// The ALPN protocol of peer sessions: a peer listener speaks nothing else.
pub(crate) const ALPN_PEER: &[u8] = b"tether-peer/1";

/// Both TLS configs of the peering.
#[derive(Clone)]
pub(crate) struct PeerTls {
    pub(crate) client: Arc<rustls::ClientConfig>,
    pub(crate) server: Arc<rustls::ServerConfig>,
}

impl std::fmt::Debug for PeerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerTls").finish_non_exhaustive()
    }
}

impl PeerTls {
    /// Loads the peer certificate (client side) and this server's TLS files with a required
    /// client certificate (listener side).
    pub(crate) fn load(peers: &PeersConfig, server: &ServerTlsFiles) -> Result<PeerTls, TlsError> {
        let mut client = (*tls::client_config(&ClientTlsFiles {
            cert: peers.cert.clone(),
            key: peers.key.clone(),
            server_ca: peers.server_ca.clone(),
        })?)
        .clone();
        client.alpn_protocols = vec![ALPN_PEER.to_vec()];
        let mut listener = (*tls::server_tls(server, ClientCertPolicy::Required)?.config).clone();
        listener.alpn_protocols = vec![ALPN_PEER.to_vec()];
        Ok(PeerTls {
            client: Arc::new(client),
            server: Arc::new(listener),
        })
    }
}

/// The server id of a verified peer chain (end entity first).
pub(crate) fn peer_id(chain: Option<&[CertificateDer<'_>]>) -> Result<String, IdentityError> {
    let leaf = chain
        .and_then(|c| c.first())
        .ok_or(IdentityError::NoPeerCertificate)?;
    server_id_from_peer_cert(leaf)
}
