//! The admin listener (plain HTTP): `/` (an index page, `index_page`), `/healthz`, `/readyz`,
//! `/metrics`, `GET /v1/clients` (the listing `tether status` reads) and `GET /v1/clients/{id}`.

pub mod index_page;
pub(crate) mod listener;
pub(crate) mod state;

use std::sync::Arc;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

pub(crate) use self::state::{AdminState, Phase, Readiness};
use crate::agents::registry::ClientSnapshot;
pub use crate::consumers::forward::ForwardError;
use crate::peers::view::PlacementView;

/// The body of `GET /v1/clients`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientsResponse {
    /// This server process's id (also sent to agents as `X-Tether-Server`).
    pub server_id: String,
    /// Known clients, sorted by agent id, each with its live sessions.
    pub clients: Vec<ClientSnapshot>,
    /// The running forwards, sorted by name (absent in listings of older servers).
    #[serde(default)]
    pub forwards: Vec<ForwardSnapshot>,
    /// The consumer frontends that are on (absent in listings of older servers).
    #[serde(default)]
    pub frontends: Vec<FrontendSnapshot>,
    /// With `peers:` set, this replica's view of the membership, over which every client's
    /// placement is ranked (absent on a lone server and in listings of older servers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<PlacementView>,
}

/// The body of `GET /v1/clients/{id}`: the client's live sessions, and why it last failed to
/// connect or lost its session (remembered per client id, bounded).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientDetail {
    /// The client id.
    pub client: String,
    /// Whether the server expects this id (in allowed_agents or a forward's client).
    pub declared: bool,
    /// Live sessions, oldest first.
    pub sessions: Vec<crate::agents::registry::SessionSnapshot>,
    /// The last refused connection attempt and the last session end.
    #[serde(flatten)]
    pub history: crate::agents::client_history::ClientRecord,
}

/// One running forward, for listings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardSnapshot {
    /// The forward's name.
    pub name: String,
    /// The bound listen address (the configured one when it is not known).
    pub listen: String,
    /// The agent id whose session carries the connections.
    pub client: String,
    /// Where the agent connects.
    pub target: String,
    /// The last failed dial through this forward, if any since it started (absent in listings
    /// of older servers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<ForwardError>,
}

/// One consumer frontend that is on, for listings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrontendSnapshot {
    /// `http_connect` or `socks5`.
    pub kind: String,
    /// The listen address.
    pub listen: String,
    /// Names of the consumers that authenticate with a token.
    pub consumers: Vec<String>,
}

pub(crate) fn router(state: Arc<AdminState>) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/clients", get(clients))
        .route("/v1/clients/{id}", get(client))
        .with_state(state)
}

async fn index(State(state): State<Arc<AdminState>>, headers: axum::http::HeaderMap) -> Response {
    index_page::index(&state, &headers)
}

async fn readyz(State(state): State<Arc<AdminState>>) -> Response {
    match state.readiness.phase() {
        Phase::Ready => (StatusCode::OK, "ready\n").into_response(),
        Phase::Draining => (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response(),
        Phase::Starting => (StatusCode::SERVICE_UNAVAILABLE, "starting\n").into_response(),
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
    Json(listing(&state))
}

async fn client(
    State(state): State<Arc<AdminState>>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    match client_detail(&state, &id) {
        Some(detail) => Json(detail).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            format!(
                "client \"{}\" is unknown: never connected, never refused, not declared\n",
                id.escape_default()
            ),
        )
            .into_response(),
    }
}

/// What the server knows about `id`, or `None` when it knows nothing.
pub(crate) fn client_detail(state: &AdminState, id: &str) -> Option<ClientDetail> {
    let listed = state
        .registry
        .snapshot()
        .into_iter()
        .find(|c| c.client == id);
    let history = state.registry.history().get(id);
    if listed.is_none() && history.is_none() {
        return None;
    }
    Some(ClientDetail {
        client: id.to_owned(),
        declared: listed.is_some(),
        sessions: listed.map(|c| c.sessions).unwrap_or_default(),
        history: history.unwrap_or_default(),
    })
}

/// The listing `GET /v1/clients` answers with.
pub(crate) fn listing(state: &AdminState) -> ClientsResponse {
    let config = state.reloader.current();
    let bound = state.reloader.forward_addrs();
    let mut errors = state.reloader.forward_errors();
    let mut forwards: Vec<ForwardSnapshot> = config
        .forwards
        .iter()
        .map(|f| ForwardSnapshot {
            name: f.name.clone(),
            listen: bound
                .get(&f.name)
                .map_or_else(|| f.listen.clone(), ToString::to_string),
            client: f.client.clone(),
            target: f.target.clone(),
            last_error: errors.remove(&f.name),
        })
        .collect();
    forwards.sort_by(|a, b| a.name.cmp(&b.name));
    let consumers: Vec<String> = config
        .frontends
        .consumers
        .iter()
        .map(|c| c.name.clone())
        .collect();
    let frontends = [
        ("http_connect", &config.frontends.http_connect_listen),
        ("socks5", &config.frontends.socks5_listen),
    ]
    .into_iter()
    .filter(|(_, listen)| !listen.is_empty())
    .map(|(kind, listen)| FrontendSnapshot {
        kind: kind.to_owned(),
        listen: listen.clone(),
        consumers: consumers.clone(),
    })
    .collect();
    ClientsResponse {
        server_id: state.server_id.clone(),
        clients: state.registry.snapshot(),
        forwards,
        frontends,
        placement: state.peers.as_ref().map(|links| links.view()),
    }
}
