//! The HTTP side of the tunnel listener: the axum router whose `GET /v1/connect` checks the
//! request (Origin, allow-list, subprotocol `tether.v1`, `max_agents`) and hands the upgraded
//! WebSocket back to the connection task that owns it.

use arc_swap::ArcSwap;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{WebSocket, WebSocketUpgrade};
use axum::extract::{Extension, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::metrics::ServerMetrics;
use crate::registry::sanitize_instance;
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
const WS_MESSAGE_OVERHEAD: usize = 16;

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
pub(crate) struct ConnectState {
    /// Allowed agent ids; empty admits every verified agent.
    pub(crate) allowed: Arc<ArcSwap<HashSet<String>>>,
    /// One permit per live agent session (`max_agents`).
    pub(crate) agent_slots: Arc<Semaphore>,
    pub(crate) metrics: ServerMetrics,
    pub(crate) server_id: HeaderValue,
    /// Cancelled when the server starts shutting down.
    pub(crate) shutdown: CancellationToken,
    /// Largest DATA payload (`session.max_frame`).
    pub(crate) max_frame: usize,
    pub(crate) log: LogThrottle,
    /// The remotedialer route's path and checks; `None` when `remotedialer.enabled` is off.
    pub(crate) remotedialer: Option<(String, crate::remotedialer_connect::RdAuth)>,
    /// Where refused attempts are remembered per client id.
    pub(crate) history: Arc<crate::client_history::ClientHistory>,
    /// The enrollment and renewal routes; `None` without an `enrollment:` section.
    pub(crate) enrollment: Option<Arc<crate::enrollment::Enrollment>>,
    /// The capabilities this server offers (`x-tether-caps`, issue 27).
    pub(crate) caps: tether_proto::Caps,
}

/// Per-connection facts the connection task puts into every request's extensions.
#[derive(Debug, Clone)]
pub(crate) struct ConnContext {
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
    pub(crate) labels: std::collections::BTreeMap<String, String>,
    /// The `max_agents` permit, held for the life of the session.
    pub(crate) slot: OwnedSemaphorePermit,
    /// Which protocol the upgrade speaks.
    pub(crate) protocol: crate::registry::Protocol,
    /// The capabilities the agent offered (`x-tether-caps`; empty from older agents).
    pub(crate) peer_caps: tether_proto::Caps,
}

/// The tunnel listener's router: `GET /v1/connect`, the remotedialer route, the enrollment
/// routes when configured, 404 for everything else.
pub(crate) fn router(state: Arc<ConnectState>) -> Router {
    let mut router = Router::new().route(CONNECT_PATH, get(connect));
    if let Some((path, _)) = &state.remotedialer {
        router = router.route(path, get(crate::remotedialer_connect::connect));
    }
    // The only routes a client without a certificate gets an answer from (besides a
    // token-only remotedialer route); every other route refuses it.
    if let Some(enrollment) = &state.enrollment {
        router = router.merge(crate::enrollment::routes(enrollment.clone()));
    }
    router
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found\n") })
        .with_state(state)
}

async fn connect(
    State(state): State<Arc<ConnectState>>,
    Extension(ctx): Extension<ConnContext>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    if headers.contains_key(header::ORIGIN) {
        debug!("refused a request with an Origin header");
        return (
            StatusCode::FORBIDDEN,
            "requests from browsers (with an Origin header) are not accepted\n",
        )
            .into_response();
    }
    let Some(agent_id) = ctx.agent_id.clone() else {
        state
            .metrics
            .auth_failures
            .with_label_values(&[NO_CLIENT_CERT])
            .inc();
        match state.log.check(NO_CLIENT_CERT) {
            Some(suppressed) => warn!(
                peer.addr = %ctx.peer_addr,
                reason = NO_CLIENT_CERT,
                suppressed,
                "agent refused: tether.v1 agents need a client certificate"
            ),
            None => debug!(reason = NO_CLIENT_CERT, "agent refused"),
        }
        return (
            StatusCode::UNAUTHORIZED,
            format!("{CONNECT_PATH} requires a client certificate\n"),
        )
            .into_response();
    };
    let allowed = state.allowed.load();
    if !allowed.is_empty() && !allowed.contains(&*agent_id) {
        state
            .metrics
            .auth_failures
            .with_label_values(&["not_allowed"])
            .inc();
        match state.log.check("not_allowed") {
            Some(suppressed) => warn!(
                peer.addr = %ctx.peer_addr,
                reason = "not_allowed",
                suppressed,
                "agent refused: its id is not in allowed_agents"
            ),
            None => debug!(reason = "not_allowed", "agent refused"),
        }
        let detail = format!("agent \"{agent_id}\" is not allowed to connect");
        state.history.refused(
            &agent_id,
            "not_allowed",
            &format!("{detail} (not in allowed_agents)"),
            &ctx.peer_addr.to_string(),
        );
        return (StatusCode::FORBIDDEN, format!("{detail}\n")).into_response();
    }
    let ws = match ws {
        Ok(ws) => ws,
        Err(
            WebSocketUpgradeRejection::InvalidConnectionHeader(_)
            | WebSocketUpgradeRejection::InvalidUpgradeHeader(_),
        ) => {
            return (
                StatusCode::UPGRADE_REQUIRED,
                [(header::UPGRADE, HeaderValue::from_static("websocket"))],
                format!(
                    "{CONNECT_PATH} only accepts a WebSocket upgrade with \
                     `Sec-WebSocket-Protocol: {SUBPROTOCOL}`\n"
                ),
            )
                .into_response();
        }
        Err(rejection) => return rejection.into_response(),
    };
    let ws = ws.protocols([SUBPROTOCOL]);
    if ws.selected_protocol().is_none() {
        return (
            StatusCode::BAD_REQUEST,
            format!(
                "missing WebSocket subprotocol: send `Sec-WebSocket-Protocol: {SUBPROTOCOL}`\n"
            ),
        )
            .into_response();
    }
    if state.shutdown.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "server is shutting down\n").into_response();
    }
    if headers.contains_key(&DOCTOR_HEADER) {
        return doctor_verdict(&state, &agent_id);
    }
    let Ok(slot) = state.agent_slots.clone().try_acquire_owned() else {
        state.history.refused(
            &agent_id,
            "max_agents",
            "the server is at its agent limit (max_agents)",
            &ctx.peer_addr.to_string(),
        );
        if let Some(suppressed) = state.log.check("max_agents") {
            warn!(
                suppressed,
                "agent refused: max_agents sessions are connected"
            );
        }
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "server is at its agent limit (max_agents)\n",
        )
            .into_response();
    };
    let handoff = ctx.handoff.lock().unwrap_or_else(|e| e.into_inner()).take();
    let Some(handoff) = handoff else {
        return (StatusCode::BAD_REQUEST, "one upgrade per connection\n").into_response();
    };
    let instance = header_text(&headers, &INSTANCE_HEADER, sanitize_instance);
    let endpoint = header_text(&headers, &ENDPOINT_HEADER, sanitize_instance);
    let version = header_text(&headers, &VERSION_HEADER, sanitize_version);
    let labels = headers
        .get(&LABELS_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(crate::registry::parse_labels)
        .unwrap_or_default();
    // Capabilities (issue 27): answered only with what both offer.
    let peer_caps = headers
        .get(tether_proto::caps::CAPS_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(tether_proto::Caps::parse)
        .unwrap_or_default();
    let answer_caps = tether_proto::Caps {
        early_data: peer_caps.early_data.and(state.caps.early_data),
    };
    let mut response =
        sized(ws, state.max_frame + WS_MESSAGE_OVERHEAD).on_upgrade(move |socket| async move {
            // If the connection task is gone, the socket and the slot drop here.
            let _ = handoff.send(UpgradedAgent {
                socket,
                agent_id,
                instance,
                endpoint,
                version,
                labels,
                slot,
                protocol: crate::registry::Protocol::Tether,
                peer_caps,
            });
        });
    response
        .headers_mut()
        .insert(SERVER_ID_HEADER, state.server_id.clone());
    if let Ok(value) = HeaderValue::from_str(&answer_caps.to_header())
        && !answer_caps.is_empty()
    {
        response
            .headers_mut()
            .insert(tether_proto::caps::CAPS_HEADER, value);
    }
    response
}

/// The answer to a `tether doctor` dry run that passed the checks so far: what a real
/// upgrade would get now.
fn doctor_verdict(state: &ConnectState, agent_id: &str) -> Response {
    let mut response = if state.agent_slots.available_permits() == 0 {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "server is at its agent limit (max_agents)\n".to_owned(),
        )
            .into_response()
    } else {
        (
            StatusCode::OK,
            format!("agent \"{agent_id}\" is accepted: a session would be admitted now\n"),
        )
            .into_response()
    };
    response
        .headers_mut()
        .insert(SERVER_ID_HEADER, state.server_id.clone());
    response
}

fn header_text(headers: &HeaderMap, name: &HeaderName, clean: fn(&str) -> String) -> String {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(clean)
        .unwrap_or_default()
}

/// At most 64 characters of `[A-Za-z0-9.+_-]` (a semver string and a bit).
fn sanitize_version(raw: &str) -> String {
    raw.chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '+' | '_' | '-'))
        .take(64)
        .collect()
}
