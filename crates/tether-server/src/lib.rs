//! tether server library: accept, authenticate, registry, forwards, admin.
//!
//! Follow a byte: a consumer connects to a [`forward`](ServerConfig::forwards) listener
//! (`forward.rs`), which picks the agent's newest session from the [`SessionRegistry`]
//! (`registry.rs`) and opens a mux stream over the WebSocket that `tunnel.rs` accepted and
//! `connect.rs` upgraded (`ws_transport.rs` adapts it to frames). `server.rs` starts and stops
//! it all; `health.rs` pings every session (dials prefer healthy ones); `admin.rs` serves
//! health, metrics and the client listing. The consumer frontends (`frontend/`: HTTP CONNECT
//! and SOCKS5) authorize a consumer for a client and dial through `tunnel_dial.rs`, as the
//! forwards do.

mod accept;
pub mod admin;
mod admin_listener;
mod admission;
pub mod audit;
pub mod client_history;
pub mod config;
mod connect;
pub mod enroll_tokens;
pub mod enrollment;
mod forward;
mod frontend;
pub mod health;
pub mod index_page;
pub mod metrics;
pub mod peers;
pub mod registry;
pub mod reload;
mod remotedialer_connect;
pub mod remotedialer_metrics;
mod remotedialer_ws;
mod server;
pub mod tls_refusals;
pub mod tls_reload;
mod tunnel;
mod tunnel_dial;
mod ws_transport;

pub use admin::ClientsResponse;
pub use audit::AuditLog;
pub use config::{
    AuditLogConfig, AuditOutput, ConsumerConfig, EnrollmentConfig, ForwardConfig, FrontendsConfig,
    HealthConfig, MetricsConfig, RemotedialerConfig, ServerConfig, TlsConfig, TokenHash,
};
pub use frontend::{FRONTEND_LABELS, FrontendControl, FrontendReload, REFUSAL_REASONS};
pub use health::HealthChecker;
pub use metrics::ServerMetrics;
pub use peers::config::PeersConfig;
pub use registry::{
    NoSession, Protocol, RegistryNotice, SessionEntry, SessionEvent, SessionGuard, SessionRegistry,
    Subscriber,
};
pub use reload::ServerReloader;
pub use server::{FrontendListeners, Listeners, Server, ServerError, run};
pub use tether_common::config_diff::ReloadOutcome;
pub use tls_reload::TlsReloader;

/// Whether client id `client` matches a consumer's client pattern (`*` stands for any run of
/// characters), as the proxy frontends decide (`tether doctor` checks patterns with it).
pub fn client_pattern_matches(pattern: &str, client: &str) -> bool {
    frontend::consumers::matches(pattern, client)
}
