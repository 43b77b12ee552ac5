//! tether server library: the agents' side, the consumers' side, and the server that runs both.
//!
//! Follow a byte: a consumer connects to a forward or a proxy listener (`consumers/`), which
//! picks the agent's newest session from the registry and opens a mux stream over the
//! WebSocket that the agents' listener accepted and upgraded (`agents/`). `server/` starts and
//! stops it all; `admin/` serves health, metrics and the client listing; `peers/` relays dials
//! between replicas.

mod accept;
pub mod admin;
mod admission;
pub mod agents;
pub mod config;
pub mod consumers;
pub mod enroll_tokens;
pub mod enrollment;
pub mod peers;
pub mod reload;
pub mod remotedialer_metrics;
mod rfc3339;
mod server;
pub mod tls_reload;

pub use admin::ClientsResponse;
pub use agents::health::HealthChecker;
pub use agents::health_metrics::HealthMetrics;
pub use agents::metrics::AgentMetrics;
pub use agents::registry::{
    NoSession, Protocol, RegistryNotice, SessionEntry, SessionEvent, SessionGuard, SessionRegistry,
    Subscriber,
};
pub use agents::registry_metrics::RegistryMetrics;
pub use agents::{client_history, health, registry, tls_refusals};
pub use config::{
    AuditLogConfig, AuditOutput, ConsumerConfig, EnrollmentConfig, ForwardConfig, FrontendsConfig,
    HealthConfig, MetricsConfig, RemotedialerConfig, ServerConfig, TlsConfig, TokenHash,
};
pub use consumers::audit::{self, AuditLog};
pub use consumers::dial_metrics::DialMetrics;
pub use consumers::proxy_control::{FrontendControl, FrontendReload};
pub use consumers::proxy_metrics::{FRONTEND_LABELS, ProxyMetrics, REFUSAL_REASONS};
pub use peers::config::PeersConfig;
pub use peers::view::PlacementView;
pub use reload::ServerReloader;
pub use server::metrics;
pub use server::{FrontendListeners, Listeners, Server, ServerError, run};
pub use tether_common::config_diff::ReloadOutcome;
pub use tls_reload::TlsReloader;

/// Whether client id `client` matches a consumer's client pattern (`*` stands for any run of
/// characters), as the proxy frontends decide (`tether doctor` checks patterns with it).
pub fn client_pattern_matches(pattern: &str, client: &str) -> bool {
    consumers::auth::matches(pattern, client)
}
