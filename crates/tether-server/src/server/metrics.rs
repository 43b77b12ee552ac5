//! `ServerMetrics`: every Prometheus series of the server, registered into the registry that the
//! caller owns (no globals).

use prometheus::{
    GaugeVec, Histogram, HistogramOpts, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};
use tether_common::cert_expiry::CertExpiry;
use tether_mux::MuxMetrics;

use crate::remotedialer_metrics::RemotedialerMetrics;

/// Labels of `tether_session_events_total{event}`.
pub const SESSION_EVENTS: [&str; 4] = ["added", "removed", "stale_removed", "revoked"];

/// Labels of `tether_health_probes_total{result}`: answered, not answered within the timeout,
/// and the session ended while probing.
pub const PROBE_RESULTS: [&str; 3] = ["ok", "timeout", "closed"];

/// The `code` label of `tether_dial_errors_total` when the client has no live session.
pub const NO_SESSION: &str = "no_session";

/// Server metrics. Cheap to clone; clones share the same series.
#[derive(Debug, Clone)]
pub struct ServerMetrics {
    /// Stream counters of the multiplexer (`tether_streams_*`, `tether_stream_bytes_total`).
    pub mux: MuxMetrics,
    /// `tether_sessions{client}`: live sessions per agent id.
    pub sessions: IntGaugeVec,
    /// `tether_agents_connected`: agent ids with at least one live session.
    pub agents_connected: IntGauge,
    /// `tether_session_events_total{event}`: added, removed, stale_removed.
    pub session_events: IntCounterVec,
    /// `tether_tls_handshake_failures_total{reason}`.
    pub tls_handshake_failures: IntCounterVec,
    /// `tether_auth_failures_total{reason}`: certificates without a usable identity, agents
    /// outside the allow-list, remotedialer header checks, and clients without a certificate
    /// where one is needed (`no_client_cert`).
    pub auth_failures: IntCounterVec,
    /// `tether_tls_refusals_total{reason}`: handshakes refused for a certificate reason
    /// (`tls_refusals::REASONS`), each also remembered per client id.
    pub tls_refusals: IntCounterVec,
    /// `tether_dial_duration_seconds`: time from OPEN to OPEN_OK or failure.
    pub dial_duration: Histogram,
    /// `tether_dial_errors_total{code}`.
    pub dial_errors: IntCounterVec,
    /// `tether_preauth_handshakes_inflight`: connections in the TLS/upgrade phase.
    pub preauth_inflight: IntGauge,
    /// `tether_build_info{version, server_id}`: always 1.
    pub build_info: IntGaugeVec,
    /// `tether_session_rtt_seconds{client}`: the last health-probe round-trip time of the
    /// client's newest probed session; absent while the client has no probed session.
    pub session_rtt: GaugeVec,
    /// `tether_health_probes_total{result}`: health probes by outcome (`ok`, `timeout`,
    /// `closed`).
    pub health_probes: IntCounterVec,
    /// `tether_health_sessions_tracked`: sessions the health checker is probing.
    pub health_tracked: IntGauge,
    /// `tether_health_unhealthy_sessions`: tracked sessions currently marked unhealthy.
    pub health_unhealthy: IntGauge,
    /// `tether_tls_cert_expiry_timestamp_seconds{cert}`: `server` and `client_ca`.
    pub cert_expiry: CertExpiry,
    /// `tether_frontend_refusals_total{frontend, reason}`: consumers refused by the proxy
    /// frontends.
    pub frontend_refusals: IntCounterVec,
    /// `tether_frontend_connections_active{frontend}`: consumer connections a proxy frontend
    /// holds (handshake, dial or splice).
    pub frontend_active: IntGaugeVec,
    /// `session_server_total_*`, when `metrics.remotedialer_compat` is on.
    pub remotedialer: Option<RemotedialerMetrics>,
    /// `tether_protocol_sessions{protocol}`: live agent sessions by wire protocol
    /// (`tether.v1`, `remotedialer`).
    pub protocol_sessions: IntGaugeVec,
}

impl ServerMetrics {
    /// Sets `tether_build_info{version, server_id}` for this replica.
    pub fn set_server_id(&self, server_id: &str) {
        self.build_info.reset();
        self.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION"), server_id])
            .set(1);
    }

    /// Creates the metrics and registers them (and the multiplexer's) in `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let metrics = Self::build(MuxMetrics::register(registry)?)?;
        registry.register(Box::new(metrics.sessions.clone()))?;
        registry.register(Box::new(metrics.agents_connected.clone()))?;
        registry.register(Box::new(metrics.session_events.clone()))?;
        registry.register(Box::new(metrics.tls_handshake_failures.clone()))?;
        registry.register(Box::new(metrics.auth_failures.clone()))?;
        registry.register(Box::new(metrics.tls_refusals.clone()))?;
        registry.register(Box::new(metrics.dial_duration.clone()))?;
        registry.register(Box::new(metrics.dial_errors.clone()))?;
        registry.register(Box::new(metrics.preauth_inflight.clone()))?;
        registry.register(Box::new(metrics.build_info.clone()))?;
        registry.register(Box::new(metrics.session_rtt.clone()))?;
        registry.register(Box::new(metrics.health_probes.clone()))?;
        registry.register(Box::new(metrics.health_tracked.clone()))?;
        registry.register(Box::new(metrics.health_unhealthy.clone()))?;
        registry.register(Box::new(metrics.cert_expiry.gauge.clone()))?;
        registry.register(Box::new(metrics.protocol_sessions.clone()))?;
        registry.register(Box::new(metrics.frontend_refusals.clone()))?;
        registry.register(Box::new(metrics.frontend_active.clone()))?;
        Ok(metrics)
    }

    /// Also exports the remotedialer-compatible counters, registered in `registry`.
    pub fn with_remotedialer_compat(mut self, registry: &Registry) -> prometheus::Result<Self> {
        self.remotedialer = Some(RemotedialerMetrics::register(registry)?);
        Ok(self)
    }

    /// Metrics registered nowhere (unit tests of components).
    pub fn unregistered() -> prometheus::Result<Self> {
        Self::build(MuxMetrics::unregistered())
    }

    fn build(mux: MuxMetrics) -> prometheus::Result<Self> {
        let metrics = Self {
            mux,
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
            tls_handshake_failures: IntCounterVec::new(
                Opts::new(
                    "tether_tls_handshake_failures_total",
                    "Tunnel connections that failed before the HTTP upgrade, by reason.",
                ),
                &["reason"],
            )?,
            auth_failures: IntCounterVec::new(
                Opts::new(
                    "tether_auth_failures_total",
                    "Agents refused after the TLS handshake, by reason.",
                ),
                &["reason"],
            )?,
            tls_refusals: IntCounterVec::new(
                Opts::new(
                    "tether_tls_refusals_total",
                    "TLS handshakes refused over a certificate, by reason: expired, \
                     not_yet_valid, unknown_issuer, revoked, bad_certificate, no_certificate, \
                     client_refused_server (the client did not accept this server's \
                     certificate).",
                ),
                &["reason"],
            )?,
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
            preauth_inflight: IntGauge::new(
                "tether_preauth_handshakes_inflight",
                "Tunnel connections in the TLS handshake or HTTP upgrade.",
            )?,
            build_info: IntGaugeVec::new(
                Opts::new(
                    "tether_build_info",
                    "Build information and this replica's id; the value is 1.",
                ),
                &["version", "server_id"],
            )?,
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
            cert_expiry: CertExpiry::unregistered()?,
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
            remotedialer: None,
            protocol_sessions: IntGaugeVec::new(
                Opts::new(
                    "tether_protocol_sessions",
                    "Live agent sessions, by wire protocol: tether.v1 or remotedialer.",
                ),
                &["protocol"],
            )?,
        };
        for protocol in crate::agents::registry::Protocol::ALL {
            metrics
                .protocol_sessions
                .with_label_values(&[protocol.label()]);
        }
        for result in PROBE_RESULTS {
            metrics.health_probes.with_label_values(&[result]);
        }
        for event in SESSION_EVENTS {
            metrics.session_events.with_label_values(&[event]);
        }
        metrics.dial_errors.with_label_values(&[NO_SESSION]);
        for reason in crate::agents::tls_refusals::REASONS {
            metrics.tls_refusals.with_label_values(&[reason]);
        }
        for frontend in crate::consumers::proxy::FRONTEND_LABELS {
            metrics.frontend_active.with_label_values(&[frontend]);
            for reason in crate::consumers::proxy::REFUSAL_REASONS {
                metrics
                    .frontend_refusals
                    .with_label_values(&[frontend, reason]);
            }
        }
        Ok(metrics)
    }
}
