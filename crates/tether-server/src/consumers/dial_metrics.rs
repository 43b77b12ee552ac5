//! `DialMetrics`: the series of dials through an agent (`tether_dial_duration_seconds`,
//! `tether_dial_errors_total`) and, when on, the remotedialer-compatible connection counters.

use prometheus::{Histogram, HistogramOpts, IntCounterVec, Opts, Registry};

use crate::remotedialer_metrics::RemotedialerMetrics;

/// The `code` label of `tether_dial_errors_total` when the client has no live session.
pub const NO_SESSION: &str = "no_session";

/// The dials' metrics. Cheap to clone; clones share the same series.
#[derive(Debug, Clone)]
pub struct DialMetrics {
    /// `tether_dial_duration_seconds`: time from OPEN to OPEN_OK or failure.
    pub dial_duration: Histogram,
    /// `tether_dial_errors_total{code}`.
    pub dial_errors: IntCounterVec,
    /// `session_server_total_*_connections`, when `metrics.remotedialer_compat` is on.
    pub remotedialer: Option<RemotedialerMetrics>,
}

impl DialMetrics {
    /// Creates the series and registers them in `registry`; connections are also counted in
    /// `compat` when given.
    pub fn register(
        registry: &Registry,
        compat: Option<RemotedialerMetrics>,
    ) -> prometheus::Result<Self> {
        let mut metrics = Self::unregistered()?;
        registry.register(Box::new(metrics.dial_duration.clone()))?;
        registry.register(Box::new(metrics.dial_errors.clone()))?;
        metrics.remotedialer = compat;
        Ok(metrics)
    }

    /// Series registered nowhere (unit tests of components).
    pub fn unregistered() -> prometheus::Result<Self> {
        let metrics = Self {
            dial_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "tether_dial_duration_seconds",
                    "Time from OPEN to the agent's answer, successful or not.",
                )
                .buckets(vec![
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                    30.0,
                ]),
            )?,
            dial_errors: IntCounterVec::new(
                Opts::new("tether_dial_errors_total", "Failed dials, by error code."),
                &["code"],
            )?,
            remotedialer: None,
        };
        metrics.dial_errors.with_label_values(&[NO_SESSION]);
        Ok(metrics)
    }
}
