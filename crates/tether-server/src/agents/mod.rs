//! The agents' side: the tunnel listener (accept, TLS, the HTTP upgrade), the sessions it
//! runs, the registry that holds them and the health checker that probes them.

pub mod client_history;
pub(crate) mod framing;
pub(crate) mod handshake;
pub mod health;
pub mod health_metrics;
pub(crate) mod listener;
pub(crate) mod listener_context;
pub mod metrics;
pub mod registry;
pub mod registry_metrics;
pub(crate) mod session;
pub mod tls_refusals;
pub(crate) mod upgrade;
pub(crate) mod websocket;
