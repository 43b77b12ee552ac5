//! The native route, `GET /v1/connect`: checks the request (Origin, client certificate,
//! allow-list, subprotocol `tether.v1`, shutdown, `max_agents`), answers `tether doctor` dry
//! runs, and hands the upgraded WebSocket back to the connection task that owns it.

use std::sync::Arc;

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::{Extension, State};
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use tracing::{debug, warn};

use crate::agents::registry::{Protocol, parse_labels, sanitize_instance};
use crate::agents::upgrade::context::{
    CONNECT_PATH, DOCTOR_HEADER, ENDPOINT_HEADER, INSTANCE_HEADER, LABELS_HEADER, NO_CLIENT_CERT,
    SERVER_ID_HEADER, SUBPROTOCOL, UpgradeContext, VERSION_HEADER, WS_MESSAGE_OVERHEAD, sized,
};
use crate::agents::upgrade::handoff::{ConnFacts, UpgradedAgent};

/// `GET /v1/connect`: the checks in order, then the upgrade.
pub(crate) async fn upgrade(
    State(state): State<Arc<UpgradeContext>>,
    Extension(ctx): Extension<ConnFacts>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    match admit(&state, &ctx, &headers, ws) {
        Ok(response) => response,
        Err(refusal) => *refusal,
    }
}

/// A refusal to answer instead of the upgrade (boxed: a response is large).
type Refused = Box<Response>;

fn refused(response: impl IntoResponse) -> Refused {
    Box::new(response.into_response())
}

/// Every check, then the upgrade whose socket goes to the connection task; `Err` is the
/// refusal to answer.
fn admit(
    state: &UpgradeContext,
    ctx: &ConnFacts,
    headers: &HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, Refused> {
    if headers.contains_key(header::ORIGIN) {
        debug!("refused a request with an Origin header");
        return Err(refused((
            StatusCode::FORBIDDEN,
            "requests from browsers (with an Origin header) are not accepted\n",
        )));
    }
    let agent_id = certified_agent(state, ctx)?;
    allowed(state, ctx, &agent_id)?;
    let ws = native_upgrade(ws)?;
    if state.shutdown.is_cancelled() {
        return Err(refused((
            StatusCode::SERVICE_UNAVAILABLE,
            "server is shutting down\n",
        )));
    }
    if headers.contains_key(&DOCTOR_HEADER) {
        return Ok(doctor_verdict(state, &agent_id));
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
        return Err(refused((
            StatusCode::SERVICE_UNAVAILABLE,
            "server is at its agent limit (max_agents)\n",
        )));
    };
    let handoff = ctx.handoff.lock().unwrap_or_else(|e| e.into_inner()).take();
    let Some(handoff) = handoff else {
        return Err(refused((
            StatusCode::BAD_REQUEST,
            "one upgrade per connection\n",
        )));
    };
    let instance = header_text(headers, &INSTANCE_HEADER, sanitize_instance);
    let endpoint = header_text(headers, &ENDPOINT_HEADER, sanitize_instance);
    let version = header_text(headers, &VERSION_HEADER, sanitize_version);
    let labels = headers
        .get(&LABELS_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(parse_labels)
        .unwrap_or_default();
    // Capabilities: answered only with what both sides offer.
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
                protocol: Protocol::Tether,
                peer_caps,
            });
        });
    response
        .headers_mut()
        .insert(SERVER_ID_HEADER, state.server_id.clone());
    if !answer_caps.is_empty()
        && let Ok(value) = HeaderValue::from_str(&answer_caps.to_header())
    {
        response
            .headers_mut()
            .insert(tether_proto::caps::CAPS_HEADER, value);
    }
    Ok(response)
}

/// The agent id of the client certificate; a client without one is refused here.
fn certified_agent(state: &UpgradeContext, ctx: &ConnFacts) -> Result<Arc<str>, Refused> {
    if let Some(agent_id) = ctx.agent_id.clone() {
        return Ok(agent_id);
    }
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
    Err(refused((
        StatusCode::UNAUTHORIZED,
        format!("{CONNECT_PATH} requires a client certificate\n"),
    )))
}

/// Refuses an agent outside a non-empty `allowed_agents`.
fn allowed(state: &UpgradeContext, ctx: &ConnFacts, agent_id: &str) -> Result<(), Refused> {
    let allowed = state.allowed.load();
    if allowed.is_empty() || allowed.contains(agent_id) {
        return Ok(());
    }
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
        agent_id,
        "not_allowed",
        &format!("{detail} (not in allowed_agents)"),
        &ctx.peer_addr.to_string(),
    );
    Err(refused((StatusCode::FORBIDDEN, format!("{detail}\n"))))
}

/// A WebSocket upgrade that selects the `tether.v1` subprotocol.
fn native_upgrade(
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<WebSocketUpgrade, Refused> {
    let ws = match ws {
        Ok(ws) => ws,
        Err(
            WebSocketUpgradeRejection::InvalidConnectionHeader(_)
            | WebSocketUpgradeRejection::InvalidUpgradeHeader(_),
        ) => {
            return Err(refused((
                StatusCode::UPGRADE_REQUIRED,
                [(header::UPGRADE, HeaderValue::from_static("websocket"))],
                format!(
                    "{CONNECT_PATH} only accepts a WebSocket upgrade with \
                     `Sec-WebSocket-Protocol: {SUBPROTOCOL}`\n"
                ),
            )));
        }
        Err(rejection) => return Err(refused(rejection)),
    };
    let ws = ws.protocols([SUBPROTOCOL]);
    if ws.selected_protocol().is_none() {
        return Err(refused((
            StatusCode::BAD_REQUEST,
            format!(
                "missing WebSocket subprotocol: send `Sec-WebSocket-Protocol: {SUBPROTOCOL}`\n"
            ),
        )));
    }
    Ok(ws)
}

/// The answer to a `tether doctor` dry run that passed the checks so far: what a real
/// upgrade would get now.
fn doctor_verdict(state: &UpgradeContext, agent_id: &str) -> Response {
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
