//! The agent's admin HTTP router: `/` (an index: a self-refreshing page for a browser, JSON
//! for `Accept: application/json`), `/healthz` (process up), `/readyz` (a session is up, or
//! the activation gate keeps the agent correctly idle: 200 with the reason; 503 saying so
//! once the agent certificate has expired), `/metrics` (Prometheus text format) and
//! `/v1/status` (the connection state as JSON).

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus::{Encoder, Registry, TextEncoder};
use tokio::sync::watch;

use std::sync::Arc;

use crate::cert_watch::CertWatch;
use crate::status::AgentStatus;

#[derive(Clone)]
struct AdminState {
    status: watch::Receiver<AgentStatus>,
    registry: Registry,
    cert: Arc<CertWatch>,
}

/// The admin routes, reading `status` and gathering `registry`.
pub fn router(status: watch::Receiver<AgentStatus>, registry: Registry) -> Router {
    router_with_cert(status, registry, CertWatch::new())
}

/// [`router`], with `/readyz` also saying when the certificate in `cert` has expired.
pub fn router_with_cert(
    status: watch::Receiver<AgentStatus>,
    registry: Registry,
    cert: Arc<CertWatch>,
) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/v1/status", get(status_json))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(AdminState {
            status,
            registry,
            cert,
        })
}

async fn status_json(State(state): State<AdminState>) -> Response {
    let status = state.status.borrow().clone();
    axum::Json(status).into_response()
}

async fn index(State(state): State<AdminState>, headers: axum::http::HeaderMap) -> Response {
    let json = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| accept.contains("application/json") && !accept.contains("text/html"));
    if json {
        let status = state.status.borrow().clone();
        let endpoints: Vec<serde_json::Value> = crate::index_page::ENDPOINTS
            .iter()
            .map(|(path, what)| serde_json::json!({ "path": path, "what": what }))
            .collect();
        return axum::Json(serde_json::json!({
            "service": "tether-agent",
            "version": env!("CARGO_PKG_VERSION"),
            "status": status,
            "endpoints": endpoints,
        }))
        .into_response();
    }
    axum::response::Html(crate::index_page::page()).into_response()
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<AdminState>) -> Response {
    if let Some(expired) = state.cert.expired_reason() {
        return (StatusCode::SERVICE_UNAVAILABLE, format!("{expired}\n")).into_response();
    }
    let (reason, idle) = {
        let status = state.status.borrow();
        (status.not_ready_reason(), status.idle_reason())
    };
    match reason {
        None => match idle {
            Some(idle) => (StatusCode::OK, format!("{idle}\n")).into_response(),
            None => (StatusCode::OK, "ready\n").into_response(),
        },
        Some(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")).into_response(),
    }
}

async fn metrics(State(state): State<AdminState>) -> Response {
    let encoder = TextEncoder::new();
    let mut body = Vec::new();
    match encoder.encode(&state.registry.gather(), &mut body) {
        Ok(()) => (
            [(header::CONTENT_TYPE, encoder.format_type().to_owned())],
            body,
        )
            .into_response(),
        Err(err) => {
            tracing::warn!(error = %err, "cannot encode metrics");
            (StatusCode::INTERNAL_SERVER_ERROR, "cannot encode metrics\n").into_response()
        }
    }
}
