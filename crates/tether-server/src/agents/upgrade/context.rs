//! What every route of the upgrade shares: `UpgradeContext` (built once by the server), the
//! `X-Tether-*` headers and the WebSocket limits.

use std::collections::HashSet;
use std::sync::Arc;

use arc_swap::ArcSwap;
use axum::extract::ws::WebSocketUpgrade;
use http::{HeaderName, HeaderValue};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::agents::client_history::ClientHistory;
use crate::agents::metrics::AgentMetrics;
use crate::agents::upgrade::remotedialer_auth::RdAuth;
use crate::enrollment::Enrollment;
use tether_common::log_throttle::LogThrottle;

/// The WebSocket subprotocol of the native protocol.
pub(crate) const SUBPROTOCOL: &str = "tether.v1";
/// The path agents upgrade on.
pub(crate) const CONNECT_PATH: &str = "/v1/connect";
/// Response header naming this server process (for agents that connect to every replica).
pub(crate) const SERVER_ID_HEADER: HeaderName = HeaderName::from_static("x-tether-server");
/// Request header with the agent's labels (`key=value,...`).
pub(crate) const LABELS_HEADER: HeaderName = HeaderName::from_static("x-tether-labels");
/// Request header with the agent's per-process instance id.
pub(crate) const INSTANCE_HEADER: HeaderName = HeaderName::from_static("x-tether-instance");
/// Request header with the agent's endpoint tag (server URL and address it dialed).
pub(crate) const ENDPOINT_HEADER: HeaderName = HeaderName::from_static("x-tether-endpoint");
/// Request header with the agent's version.
pub(crate) const VERSION_HEADER: HeaderName = HeaderName::from_static("x-tether-version");

/// Request header of `tether doctor`: run every check of the upgrade, then answer 200 with the
/// verdict instead of upgrading (no session is registered, no slot taken).
pub(crate) const DOCTOR_HEADER: HeaderName = HeaderName::from_static("x-tether-doctor");

/// `tether_auth_failures_total` reason of a client without a certificate on a route that needs
/// one.
pub(crate) const NO_CLIENT_CERT: &str = "no_client_cert";

/// Bytes tungstenite buffers before writing to the socket.
const WS_WRITE_BUFFER: usize = 64 * 1024;

/// Room for the frame header in a WebSocket message beyond the largest DATA payload.
pub(crate) const WS_MESSAGE_OVERHEAD: usize = 16;

/// The WebSocket buffer and message limits of an agent session (either protocol), for
/// messages of at most `message_max` bytes.
pub(crate) fn sized(ws: WebSocketUpgrade, message_max: usize) -> WebSocketUpgrade {
    ws.max_message_size(message_max)
        .max_frame_size(message_max)
        .write_buffer_size(WS_WRITE_BUFFER)
        .read_buffer_size(tether_common::session_settings::WS_READ_BUFFER)
        // Above write_buffer_size plus a message and a queued pong (tungstenite asserts it).
        .max_write_buffer_size(WS_WRITE_BUFFER + 4 * message_max)
}

/// Shared by every request on the tunnel listener.
#[derive(Debug)]
pub(crate) struct UpgradeContext {
    /// Allowed agent ids; empty admits every verified agent.
    pub(crate) allowed: Arc<ArcSwap<HashSet<String>>>,
    /// One permit per live agent session (`max_agents`).
    pub(crate) agent_slots: Arc<Semaphore>,
    pub(crate) metrics: AgentMetrics,
    pub(crate) server_id: HeaderValue,
    /// Cancelled when the server starts shutting down.
    pub(crate) shutdown: CancellationToken,
    /// Largest DATA payload (`session.max_frame`).
    pub(crate) max_frame: usize,
    pub(crate) log: LogThrottle,
    /// The remotedialer route's path and checks; `None` when `remotedialer.enabled` is off.
    pub(crate) remotedialer: Option<(String, RdAuth)>,
    /// Where refused attempts are remembered per client id.
    pub(crate) history: Arc<ClientHistory>,
    /// The enrollment and renewal routes; `None` without an `enrollment:` section.
    pub(crate) enrollment: Option<Arc<Enrollment>>,
    /// The capabilities this server offers (`x-tether-caps`).
    pub(crate) caps: tether_proto::Caps,
}
