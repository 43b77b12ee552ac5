//! The agents' side: the tunnel listener (accept, TLS, the HTTP upgrade), the sessions it
//! runs, the registry that holds them and the health checker that probes them.

pub mod client_history;
pub(crate) mod framing;
pub mod health;
pub mod health_metrics;
pub(crate) mod listener;
pub mod metrics;
pub mod registry;
pub mod registry_metrics;
pub mod tls_refusals;
pub(crate) mod upgrade;
pub(crate) mod websocket;
