//! The remotedialer route of the tunnel listener: an upgrade on `remotedialer.path` without the
//! `tether.v1` subprotocol, from a client whose certificate was verified like a native agent's,
//! optionally narrowed by a tunnel-id header that must match the identity and a shared token
//! (compared in constant time); or, with `allow_without_client_cert`, from a certless client
//! named by the tunnel-id header and authenticated by the token.

use std::sync::Arc;

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::{Extension, State};
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, StatusCode, header};
use tracing::{debug, warn};

use tether_common::identity::validate_agent_id;

use crate::agents::registry::{Protocol, sanitize_instance};
use crate::agents::upgrade::context::{
    ENDPOINT_HEADER, INSTANCE_HEADER, NO_CLIENT_CERT, SUBPROTOCOL, UpgradeContext, sized,
};
use crate::agents::upgrade::handoff::{ConnFacts, UpgradedAgent};
use crate::agents::upgrade::remotedialer_auth::{RdAuth, constant_time_eq};

/// Largest remotedialer message accepted: a Data payload of 1 MiB (Go writes 32 KiB) and its
/// header.
pub(crate) const MAX_RD_MESSAGE: usize = tether_proto::remotedialer::DEFAULT_MAX_DATA + 64;

fn refuse(
    state: &UpgradeContext,
    ctx: &ConnFacts,
    status: StatusCode,
    reason: &'static str,
    body: &str,
) -> Response {
    state
        .metrics
        .auth_failures
        .with_label_values(&[reason])
        .inc();
    match state.log.check(reason) {
        Some(suppressed) => warn!(
            peer.addr = %ctx.peer_addr,
            reason,
            suppressed,
            "remotedialer client refused"
        ),
        None => debug!(reason, "remotedialer client refused"),
    }
    (status, format!("{body}\n")).into_response()
}

pub(crate) async fn upgrade(
    State(state): State<Arc<UpgradeContext>>,
    Extension(ctx): Extension<ConnFacts>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let Some((_, auth)) = state.remotedialer.as_ref() else {
        return (StatusCode::NOT_FOUND, "not found\n").into_response();
    };
    if headers.contains_key(header::ORIGIN) {
        return (
            StatusCode::FORBIDDEN,
            "requests from browsers (with an Origin header) are not accepted\n",
        )
            .into_response();
    }
    if let Some((name, expected)) = &auth.token {
        let given = headers.get(name).map(|v| v.as_bytes()).unwrap_or_default();
        if !constant_time_eq(given.trim_ascii(), expected) {
            // Go's answer to a failed Authorizer.
            return refuse(
                &state,
                &ctx,
                StatusCode::UNAUTHORIZED,
                "bad_token",
                "failed authentication",
            );
        }
    }
    let Some(agent_id) = ctx.agent_id.clone() else {
        return match certless_id(auth, &headers) {
            Ok(agent_id) => admit(&state, &ctx, agent_id, &headers, ws),
            Err((status, reason, body)) => refuse(&state, &ctx, status, reason, &body),
        };
    };
    if let Some(name) = &auth.tunnel_id_header {
        match headers.get(name) {
            Some(value) if value.as_bytes() != agent_id.as_bytes() => {
                return refuse(
                    &state,
                    &ctx,
                    StatusCode::FORBIDDEN,
                    "tunnel_id_mismatch",
                    &format!(
                        "{name} does not match the client certificate's identity \"{agent_id}\""
                    ),
                );
            }
            None if auth.require_tunnel_id => {
                return refuse(
                    &state,
                    &ctx,
                    StatusCode::UNAUTHORIZED,
                    "missing_tunnel_id",
                    &format!("missing {name} header"),
                );
            }
            _ => {}
        }
    }
    admit(&state, &ctx, agent_id, &headers, ws)
}

/// A refusal: status, closed-set reason, body.
type Refusal = (StatusCode, &'static str, String);

/// The id of a client without a certificate (the token has already been checked): the
/// tunnel-id header, mandatory and validated like an agent id.
fn certless_id(auth: &RdAuth, headers: &HeaderMap) -> Result<Arc<str>, Refusal> {
    let (true, Some(name), Some(_)) = (
        auth.allow_without_client_cert,
        &auth.tunnel_id_header,
        &auth.token,
    ) else {
        return Err((
            StatusCode::UNAUTHORIZED,
            NO_CLIENT_CERT,
            "a client certificate is required".to_owned(),
        ));
    };
    let Some(value) = headers.get(name) else {
        return Err((
            StatusCode::UNAUTHORIZED,
            "missing_tunnel_id",
            format!("missing {name} header (required without a client certificate)"),
        ));
    };
    let id = value.to_str().map_err(|_| {
        (
            StatusCode::BAD_REQUEST,
            "invalid_tunnel_id",
            format!("{name} is not visible ASCII"),
        )
    })?;
    validate_agent_id(id).map_err(|err| {
        (
            StatusCode::BAD_REQUEST,
            "invalid_tunnel_id",
            format!("{name}: {err}"),
        )
    })?;
    Ok(Arc::from(id))
}

/// The checks shared by both kinds of client once `agent_id` is known: the allow-list, the
/// upgrade itself, shutdown and `max_agents`.
fn admit(
    state: &UpgradeContext,
    ctx: &ConnFacts,
    agent_id: Arc<str>,
    headers: &HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let allowed = state.allowed.load();
    if !allowed.is_empty() && !allowed.contains(&*agent_id) {
        return refuse(
            state,
            ctx,
            StatusCode::FORBIDDEN,
            "not_allowed",
            &format!("agent \"{agent_id}\" is not allowed to connect"),
        );
    }
    let ws = match ws {
        Ok(ws) => ws,
        Err(rejection) => {
            debug!(%rejection, "remotedialer request without a WebSocket upgrade");
            return (
                StatusCode::BAD_REQUEST,
                "Error during upgrade: a WebSocket upgrade is required\n",
            )
                .into_response();
        }
    };
    let asks_native = headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|p| p.trim() == SUBPROTOCOL));
    if asks_native {
        return (
            StatusCode::BAD_REQUEST,
            format!("{SUBPROTOCOL} agents connect on /v1/connect\n"),
        )
            .into_response();
    }
    if state.shutdown.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "server is shutting down\n").into_response();
    }
    let Ok(slot) = state.agent_slots.clone().try_acquire_owned() else {
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
    // A tether agent in remotedialer mode still names its process, so that a reconnect
    // replaces its stale session; Go clients send nothing and coexist, as in Go.
    let instance = headers
        .get(&INSTANCE_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(sanitize_instance)
        .unwrap_or_default();
    let endpoint = headers
        .get(&ENDPOINT_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(sanitize_instance)
        .unwrap_or_default();
    sized(ws, MAX_RD_MESSAGE).on_upgrade(move |socket| async move {
        let _ = handoff.send(UpgradedAgent {
            socket,
            agent_id,
            instance,
            endpoint,
            version: String::new(),
            labels: Default::default(),
            slot,
            protocol: Protocol::Remotedialer,
            peer_caps: Default::default(),
        });
    })
}
