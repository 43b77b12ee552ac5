//! The admin listener (plain HTTP): `/healthz`, `/readyz`, `/metrics` and `GET /v1/clients`
//! (the listing `tether status` reads).

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::registry::{ClientSnapshot, SessionRegistry};

/// The body of `GET /v1/clients`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientsResponse {
    /// This server process's id (also sent to agents as `X-Tether-Server`).
    pub server_id: String,
    /// Known clients, sorted by agent id, each with its live sessions.
    pub clients: Vec<ClientSnapshot>,
}

/// Lifecycle phase reported by `/readyz`.
#[derive(Debug)]
pub(crate) struct Readiness(AtomicU8);

const STARTING: u8 = 0;
const READY: u8 = 1;
const DRAINING: u8 = 2;

impl Default for Readiness {
    fn default() -> Self {
        Self(AtomicU8::new(STARTING))
    }
}

impl Readiness {
    pub(crate) fn set_ready(&self) {
        self.0.store(READY, Ordering::Release);
    }

    pub(crate) fn set_draining(&self) {
        self.0.store(DRAINING, Ordering::Release);
    }
}

/// What the admin routes read.
#[derive(Debug)]
pub(crate) struct AdminState {
    pub(crate) registry: Arc<SessionRegistry>,
    pub(crate) prometheus: prometheus::Registry,
    pub(crate) readiness: Arc<Readiness>,
    pub(crate) server_id: String,
}

pub(crate) fn router(state: Arc<AdminState>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/clients", get(clients))
        .with_state(state)
}

async fn readyz(State(state): State<Arc<AdminState>>) -> Response {
    match state.readiness.0.load(Ordering::Acquire) {
        READY => (StatusCode::OK, "ready\n").into_response(),
        DRAINING => (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response(),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "starting\n").into_response(),
    }
}

async fn metrics(State(state): State<Arc<AdminState>>) -> Response {
    let families = state.prometheus.gather();
    match prometheus::TextEncoder::new().encode_to_string(&families) {
        Ok(text) => ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], text).into_response(),
        Err(err) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode metrics: {err}\n"),
        )
            .into_response(),
    }
}

async fn clients(State(state): State<Arc<AdminState>>) -> Json<ClientsResponse> {
    Json(ClientsResponse {
        server_id: state.server_id.clone(),
        clients: state.registry.snapshot(),
    })
}
