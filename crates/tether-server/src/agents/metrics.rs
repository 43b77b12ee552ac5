//! `AgentMetrics`: the agents' listener's series, from the TCP accept to the end of a session
//! (`tether_tls_*`, `tether_auth_failures_total`, `tether_preauth_handshakes_inflight`,
//! `tether_protocol_sessions`), and the multiplexer's that its sessions report into.

use prometheus::{IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use tether_mux::MuxMetrics;

use crate::agents::registry::Protocol;
use crate::agents::tls_refusals;

/// The agents' listener's metrics. Cheap to clone; clones share the same series.
#[derive(Debug, Clone)]
pub struct AgentMetrics {
    /// Stream counters of the multiplexer (`tether_streams_*`, `tether_stream_bytes_total`).
    pub mux: MuxMetrics,
    /// `tether_tls_handshake_failures_total{reason}`.
    pub tls_handshake_failures: IntCounterVec,
    /// `tether_auth_failures_total{reason}`: certificates without a usable identity, agents
    /// outside the allow-list, remotedialer header checks, and clients without a certificate
    /// where one is needed (`no_client_cert`).
    pub auth_failures: IntCounterVec,
    /// `tether_tls_refusals_total{reason}`: handshakes refused for a certificate reason
    /// (`tls_refusals::REASONS`), each also remembered per client id.
    pub tls_refusals: IntCounterVec,
    /// `tether_preauth_handshakes_inflight`: connections in the TLS/upgrade phase.
    pub preauth_inflight: IntGauge,
    /// `tether_protocol_sessions{protocol}`: live agent sessions by wire protocol
    /// (`tether.v1`, `remotedialer`).
    pub protocol_sessions: IntGaugeVec,
}

impl AgentMetrics {
    /// Creates the series and registers them (and the multiplexer's) in `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let metrics = Self::build(MuxMetrics::register(registry)?)?;
        registry.register(Box::new(metrics.tls_handshake_failures.clone()))?;
        registry.register(Box::new(metrics.auth_failures.clone()))?;
        registry.register(Box::new(metrics.tls_refusals.clone()))?;
        registry.register(Box::new(metrics.preauth_inflight.clone()))?;
        registry.register(Box::new(metrics.protocol_sessions.clone()))?;
        Ok(metrics)
    }

    /// Series registered nowhere (unit tests of components).
    pub fn unregistered() -> prometheus::Result<Self> {
        Self::build(MuxMetrics::unregistered())
    }

    fn build(mux: MuxMetrics) -> prometheus::Result<Self> {
        let counter =
            |name: &str, help: &str| IntCounterVec::new(Opts::new(name, help), &["reason"]);
        let metrics = Self {
            mux,
            tls_handshake_failures: counter(
                "tether_tls_handshake_failures_total",
                "Tunnel connections that failed before the HTTP upgrade, by reason.",
            )?,
            auth_failures: counter(
                "tether_auth_failures_total",
                "Agents refused after the TLS handshake, by reason.",
            )?,
            tls_refusals: counter(
                "tether_tls_refusals_total",
                "TLS handshakes refused over a certificate, by reason: expired, \
                 not_yet_valid, unknown_issuer, revoked, bad_certificate, no_certificate, \
                 client_refused_server (the client did not accept this server's \
                 certificate).",
            )?,
            preauth_inflight: IntGauge::new(
                "tether_preauth_handshakes_inflight",
                "Tunnel connections in the TLS handshake or HTTP upgrade.",
            )?,
            protocol_sessions: IntGaugeVec::new(
                Opts::new(
                    "tether_protocol_sessions",
                    "Live agent sessions, by wire protocol: tether.v1 or remotedialer.",
                ),
                &["protocol"],
            )?,
        };
        for protocol in Protocol::ALL {
            metrics
                .protocol_sessions
                .with_label_values(&[protocol.label()]);
        }
        for reason in tls_refusals::REASONS {
            metrics.tls_refusals.with_label_values(&[reason]);
        }
        Ok(metrics)
    }
}
