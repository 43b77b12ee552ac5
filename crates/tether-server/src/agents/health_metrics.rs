//! `HealthMetrics`: the health checker's series (`tether_session_rtt_seconds`,
//! `tether_health_probes_total`, `tether_health_sessions_tracked`,
//! `tether_health_unhealthy_sessions`).

use prometheus::{GaugeVec, IntCounterVec, IntGauge, Opts, Registry};

/// Labels of `tether_health_probes_total{result}`: answered, not answered within the timeout,
/// and the session ended while probing.
pub const PROBE_RESULTS: [&str; 3] = ["ok", "timeout", "closed"];

/// The health checker's metrics. Cheap to clone; clones share the same series.
#[derive(Debug, Clone)]
pub struct HealthMetrics {
    /// `tether_session_rtt_seconds{client}`: the last health-probe round-trip time of the
    /// client's newest probed session; absent while the client has no probed session.
    pub session_rtt: GaugeVec,
    /// `tether_health_probes_total{result}`: health probes by outcome (`ok`, `timeout`,
    /// `closed`).
    pub health_probes: IntCounterVec,
    /// `tether_health_sessions_tracked`: sessions the health checker is probing.
    pub health_tracked: IntGauge,
    /// `tether_health_unhealthy_sessions`: tracked sessions currently marked unhealthy (also
    /// by a dial that fails over).
    pub health_unhealthy: IntGauge,
}

impl HealthMetrics {
    /// Creates the series and registers them in `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let metrics = Self::unregistered()?;
        registry.register(Box::new(metrics.session_rtt.clone()))?;
        registry.register(Box::new(metrics.health_probes.clone()))?;
        registry.register(Box::new(metrics.health_tracked.clone()))?;
        registry.register(Box::new(metrics.health_unhealthy.clone()))?;
        Ok(metrics)
    }

    /// Series registered nowhere (unit tests of components).
    pub fn unregistered() -> prometheus::Result<Self> {
        let metrics = Self {
            session_rtt: GaugeVec::new(
                Opts::new(
                    "tether_session_rtt_seconds",
                    "Last health-probe round-trip time of the client's newest probed session.",
                ),
                &["client"],
            )?,
            health_probes: IntCounterVec::new(
                Opts::new(
                    "tether_health_probes_total",
                    "Health probes (PING) of agent sessions, by result: ok, timeout, closed.",
                ),
                &["result"],
            )?,
            health_tracked: IntGauge::new(
                "tether_health_sessions_tracked",
                "Sessions the health checker is probing.",
            )?,
            health_unhealthy: IntGauge::new(
                "tether_health_unhealthy_sessions",
                "Probed sessions currently marked unhealthy (missed too many pongs in a row).",
            )?,
        };
        for result in PROBE_RESULTS {
            metrics.health_probes.with_label_values(&[result]);
        }
        Ok(metrics)
    }
}
