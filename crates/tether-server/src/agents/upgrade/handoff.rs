//! One agent connection's way through the upgrade: the facts its connection task puts into
//! each request (`ConnFacts`), and the upgraded agent a route hands back (`UpgradedAgent`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::ws::WebSocket;
use tokio::sync::{OwnedSemaphorePermit, oneshot};

use crate::agents::registry::Protocol;

/// Per-connection facts the connection task puts into every request's extensions.
#[derive(Debug, Clone)]
pub(crate) struct ConnFacts {
    /// The agent id from the verified client certificate; `None` for a client that presented
    /// none (only possible with `remotedialer.allow_without_client_cert`).
    pub(crate) agent_id: Option<Arc<str>>,
    pub(crate) peer_addr: SocketAddr,
    /// Where the upgraded socket goes; taken by the first successful upgrade.
    pub(crate) handoff: Arc<Mutex<Option<oneshot::Sender<UpgradedAgent>>>>,
}

/// An upgraded agent connection on its way back to the connection task.
#[derive(Debug)]
pub(crate) struct UpgradedAgent {
    pub(crate) socket: WebSocket,
    /// The client id the session registers under (certificate identity, or the remotedialer
    /// tunnel-id header of a certless client).
    pub(crate) agent_id: Arc<str>,
    /// `X-Tether-Instance`, sanitized (may be empty).
    pub(crate) instance: String,
    /// `X-Tether-Endpoint`, sanitized (may be empty).
    pub(crate) endpoint: String,
    /// `X-Tether-Version`, sanitized (may be empty).
    pub(crate) version: String,
    /// `X-Tether-Labels`, parsed and sanitized (may be empty).
    pub(crate) labels: BTreeMap<String, String>,
    /// The `max_agents` permit, held for the life of the session.
    pub(crate) slot: OwnedSemaphorePermit,
    /// Which protocol the upgrade speaks.
    pub(crate) protocol: Protocol,
    /// The capabilities the agent offered (`x-tether-caps`; empty from older agents).
    pub(crate) peer_caps: tether_proto::Caps,
}
