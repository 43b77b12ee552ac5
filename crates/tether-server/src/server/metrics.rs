//! `Metrics`: the metrics of every component, each registering its own series and label
//! sets into the registry the caller owns (no globals), composed here, plus the process's own
//! `tether_build_info` and certificate expiry series.

use prometheus::{IntGaugeVec, Opts, Registry};
use tether_common::cert_expiry::CertExpiry;

use crate::agents::health_metrics::HealthMetrics;
use crate::agents::metrics::AgentMetrics;
use crate::agents::registry_metrics::RegistryMetrics;
use crate::consumers::dial_metrics::DialMetrics;
use crate::consumers::proxy_metrics::ProxyMetrics;
use crate::remotedialer_metrics::RemotedialerMetrics;

/// The components' metrics. Cheap to clone; clones share the same series.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// The agents' listener and the multiplexer under its sessions.
    pub agents: AgentMetrics,
    /// The session registry.
    pub registry: RegistryMetrics,
    /// The health checker.
    pub health: HealthMetrics,
    /// Dials through agents (forwards and proxies).
    pub dial: DialMetrics,
    /// The HTTP CONNECT and SOCKS5 proxies.
    pub proxies: ProxyMetrics,
    /// `tether_build_info{version, server_id}`: always 1.
    pub build_info: IntGaugeVec,
    /// `tether_tls_cert_expiry_timestamp_seconds{cert}`: `server` and `client_ca`.
    pub cert_expiry: CertExpiry,
}

impl Metrics {
    /// Registers every component's series in `registry`; `remotedialer_compat` adds the
    /// `session_server_total_*` counters, shared by the registry and the dials.
    pub fn register(registry: &Registry, remotedialer_compat: bool) -> prometheus::Result<Self> {
        let compat = if remotedialer_compat {
            Some(RemotedialerMetrics::register(registry)?)
        } else {
            None
        };
        let metrics = Self {
            agents: AgentMetrics::register(registry)?,
            registry: RegistryMetrics::register(registry)?.with_remotedialer(compat.clone()),
            health: HealthMetrics::register(registry)?,
            dial: DialMetrics::register(registry, compat)?,
            proxies: ProxyMetrics::register(registry)?,
            build_info: IntGaugeVec::new(
                Opts::new(
                    "tether_build_info",
                    "Build information and this replica's id; the value is 1.",
                ),
                &["version", "server_id"],
            )?,
            cert_expiry: CertExpiry::unregistered()?,
        };
        registry.register(Box::new(metrics.build_info.clone()))?;
        registry.register(Box::new(metrics.cert_expiry.gauge.clone()))?;
        Ok(metrics)
    }

    /// Sets `tether_build_info{version, server_id}` for this replica.
    pub fn set_server_id(&self, server_id: &str) {
        self.build_info.reset();
        self.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION"), server_id])
            .set(1);
    }
}
