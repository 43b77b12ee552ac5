//! `RegistryMetrics`: the session registry's series (`tether_sessions`,
//! `tether_agents_connected`, `tether_session_events_total`) and, when on, the
//! remotedialer-compatible session counters.

use prometheus::{IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

use crate::remotedialer_metrics::RemotedialerMetrics;

/// Labels of `tether_session_events_total{event}`.
pub const SESSION_EVENTS: [&str; 4] = ["added", "removed", "stale_removed", "revoked"];

/// The registry's metrics. Cheap to clone; clones share the same series.
#[derive(Debug, Clone)]
pub struct RegistryMetrics {
    /// `tether_sessions{client}`: live sessions per agent id.
    pub sessions: IntGaugeVec,
    /// `tether_agents_connected`: agent ids with at least one live session.
    pub agents_connected: IntGauge,
    /// `tether_session_events_total{event}`: added, removed, stale_removed, revoked.
    pub session_events: IntCounterVec,
    /// `session_server_total_*_websocket_session`, when `metrics.remotedialer_compat` is on.
    pub remotedialer: Option<RemotedialerMetrics>,
}

impl RegistryMetrics {
    /// Creates the series and registers them in `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let metrics = Self::unregistered()?;
        registry.register(Box::new(metrics.sessions.clone()))?;
        registry.register(Box::new(metrics.agents_connected.clone()))?;
        registry.register(Box::new(metrics.session_events.clone()))?;
        Ok(metrics)
    }

    /// Also exports the remotedialer-compatible counters, registered in `registry`.
    pub fn with_remotedialer_compat(self, registry: &Registry) -> prometheus::Result<Self> {
        Ok(self.with_remotedialer(Some(RemotedialerMetrics::register(registry)?)))
    }

    /// Counts sessions in `compat` too (the counters the server registered once).
    pub fn with_remotedialer(mut self, compat: Option<RemotedialerMetrics>) -> Self {
        self.remotedialer = compat;
        self
    }

    /// Series registered nowhere (unit tests of components).
    pub fn unregistered() -> prometheus::Result<Self> {
        let metrics = Self {
            sessions: IntGaugeVec::new(
                Opts::new("tether_sessions", "Live agent sessions, by agent id."),
                &["client"],
            )?,
            agents_connected: IntGauge::new(
                "tether_agents_connected",
                "Agent ids with at least one live session.",
            )?,
            session_events: IntCounterVec::new(
                Opts::new(
                    "tether_session_events_total",
                    "Session registry events: added, removed, stale_removed (replaced by a \
                     newer session of the same agent instance).",
                ),
                &["event"],
            )?,
            remotedialer: None,
        };
        for event in SESSION_EVENTS {
            metrics.session_events.with_label_values(&[event]);
        }
        Ok(metrics)
    }
}
