//! `ProxyMetrics`: the series of the HTTP CONNECT and SOCKS5 proxies
//! (`tether_frontend_refusals_total`, `tether_frontend_connections_active`) and their label
//! sets.

use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};

/// Labels of `tether_frontend_refusals_total{frontend}`.
pub const FRONTEND_LABELS: [&str; 2] = ["http_connect", "socks5"];

/// Labels of `tether_frontend_refusals_total{reason}`: no or bad credentials, a consumer
/// not allowed for the client, a malformed, oversized, unsupported or too slow handshake, a
/// target that does not parse, no agent session, a failed dial, the connection cap.
pub const REFUSAL_REASONS: [&str; 11] = [
    "missing_credentials",
    "bad_credentials",
    "forbidden",
    "malformed",
    "too_large",
    "unsupported",
    "timeout",
    "bad_target",
    "no_session",
    "dial_failed",
    "limit",
];

/// The proxies' metrics. Cheap to clone; clones share the same series.
#[derive(Debug, Clone)]
pub struct ProxyMetrics {
    /// `tether_frontend_refusals_total{frontend, reason}`: consumers refused by the proxy
    /// frontends.
    pub frontend_refusals: IntCounterVec,
    /// `tether_frontend_connections_active{frontend}`: consumer connections a proxy frontend
    /// holds (handshake, dial or splice).
    pub frontend_active: IntGaugeVec,
}

impl ProxyMetrics {
    /// Creates the series and registers them in `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let metrics = Self::unregistered()?;
        registry.register(Box::new(metrics.frontend_refusals.clone()))?;
        registry.register(Box::new(metrics.frontend_active.clone()))?;
        Ok(metrics)
    }

    /// Series registered nowhere (unit tests of components).
    pub fn unregistered() -> prometheus::Result<Self> {
        let metrics = Self {
            frontend_refusals: IntCounterVec::new(
                Opts::new(
                    "tether_frontend_refusals_total",
                    "Consumer connections refused by the HTTP CONNECT and SOCKS5 frontends, by \
                     frontend and reason.",
                ),
                &["frontend", "reason"],
            )?,
            frontend_active: IntGaugeVec::new(
                Opts::new(
                    "tether_frontend_connections_active",
                    "Consumer connections held by the HTTP CONNECT and SOCKS5 frontends.",
                ),
                &["frontend"],
            )?,
        };
        for frontend in FRONTEND_LABELS {
            metrics.frontend_active.with_label_values(&[frontend]);
            for reason in REFUSAL_REASONS {
                metrics
                    .frontend_refusals
                    .with_label_values(&[frontend, reason]);
            }
        }
        Ok(metrics)
    }
}
