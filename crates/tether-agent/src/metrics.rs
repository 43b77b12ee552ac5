//! `AgentMetrics`: the agent's Prometheus series (connection state, reconnects, connect
//! failures, dials by outcome, policy denials, certificate expiry, build info) plus the
//! multiplexer's stream metrics.

use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use tether_common::cert_expiry::CertExpiry;
use tether_common::config_diff::ReloadMetrics;
use tether_mux::MuxMetrics;

use crate::connector::ConnectError;

/// The outcome of one OPEN from the server, for `tether_agent_dials_total{outcome}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DialOutcome {
    /// The target was connected and the stream accepted.
    Ok,
    /// The policy refused the target.
    Denied,
    /// The name did not resolve.
    ResolveFailed,
    /// The target refused the connection.
    Refused,
    /// The dial timed out.
    TimedOut,
    /// No route to the target.
    Unreachable,
    /// Any other failure.
    Error,
}

impl DialOutcome {
    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            DialOutcome::Ok => "ok",
            DialOutcome::Denied => "denied",
            DialOutcome::ResolveFailed => "resolve_failed",
            DialOutcome::Refused => "refused",
            DialOutcome::TimedOut => "timed_out",
            DialOutcome::Unreachable => "unreachable",
            DialOutcome::Error => "error",
        }
    }

    const ALL: [DialOutcome; 7] = [
        DialOutcome::Ok,
        DialOutcome::Denied,
        DialOutcome::ResolveFailed,
        DialOutcome::Refused,
        DialOutcome::TimedOut,
        DialOutcome::Unreachable,
        DialOutcome::Error,
    ];
}

/// The agent's metrics. Cheap to clone; clones share the same series.
#[derive(Debug, Clone)]
pub struct AgentMetrics {
    /// Stream metrics of the multiplexer (`tether_streams_*`, `tether_stream_bytes_total`).
    pub mux: MuxMetrics,
    /// `tether_agent_connected`: 1 while a session to the server is up.
    pub connected: IntGauge,
    /// `tether_agent_reconnects_total`: sessions established after the first one.
    pub reconnects: IntCounter,
    /// `tether_agent_connect_failures_total{reason}`: failed attempts by `ConnectError::label`.
    pub connect_failures: IntCounterVec,
    /// `tether_agent_dials_total{outcome}`: OPENs from the server by outcome.
    pub dials: IntCounterVec,
    /// `tether_agent_policy_denials_total`: OPENs refused by the dial policy.
    pub policy_denials: IntCounter,
    /// `tether_build_info{version}`: always 1.
    pub build_info: IntGaugeVec,
    /// `tether_tls_cert_expiry_timestamp_seconds{cert}`: `agent` and `server_ca`.
    pub cert_expiry: CertExpiry,
    /// `tether_agent_gate{state}`: 1 on the activation gate's current state (`enabled` or
    /// `disabled`), 0 on the other.
    pub gate: IntGaugeVec,
    /// `tether_config_reloads_total{result}`.
    pub reloads: ReloadMetrics,
    /// `tether_agent_replicas{state}`: server replicas (endpoints) `discovered`, `placed`
    /// (in this agent's placement) and `connected`.
    pub replicas: IntGaugeVec,
    /// `tether_agent_placement_moves_total`: sessions drained because their replica left this
    /// agent's placement (a better-ranked replica joined or came back).
    pub placement_moves: IntCounter,
}

impl AgentMetrics {
    /// Creates the metrics and registers them (and the multiplexer's) into `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<AgentMetrics> {
        let metrics = AgentMetrics::new(MuxMetrics::register(registry)?)?;
        registry.register(Box::new(metrics.connected.clone()))?;
        registry.register(Box::new(metrics.reconnects.clone()))?;
        registry.register(Box::new(metrics.connect_failures.clone()))?;
        registry.register(Box::new(metrics.dials.clone()))?;
        registry.register(Box::new(metrics.policy_denials.clone()))?;
        registry.register(Box::new(metrics.build_info.clone()))?;
        registry.register(Box::new(metrics.cert_expiry.gauge.clone()))?;
        registry.register(Box::new(metrics.gate.clone()))?;
        registry.register(Box::new(metrics.replicas.clone()))?;
        registry.register(Box::new(metrics.placement_moves.clone()))?;
        let reloads = ReloadMetrics::register(registry)?;
        Ok(AgentMetrics { reloads, ..metrics })
    }

    fn new(mux: MuxMetrics) -> prometheus::Result<AgentMetrics> {
        let connected = IntGauge::new(
            "tether_agent_connected",
            "1 while the agent has a live session to the server, else 0",
        )?;
        let reconnects = IntCounter::new(
            "tether_agent_reconnects_total",
            "Sessions established after the first one",
        )?;
        let connect_failures = IntCounterVec::new(
            Opts::new(
                "tether_agent_connect_failures_total",
                "Failed connection attempts to the server, by reason",
            ),
            &["reason"],
        )?;
        let dials = IntCounterVec::new(
            Opts::new(
                "tether_agent_dials_total",
                "Stream open requests from the server, by outcome",
            ),
            &["outcome"],
        )?;
        let policy_denials = IntCounter::new(
            "tether_agent_policy_denials_total",
            "Stream open requests refused by the dial policy",
        )?;
        let build_info = IntGaugeVec::new(
            Opts::new("tether_build_info", "Build information; always 1"),
            &["version"],
        )?;
        // Every series exists from the start, so rates and alerts work before the first event.
        for reason in ConnectError::LABELS {
            connect_failures.with_label_values(&[reason]);
        }
        for outcome in DialOutcome::ALL {
            dials.with_label_values(&[outcome.label()]);
        }
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let gate = IntGaugeVec::new(
            Opts::new(
                "tether_agent_gate",
                "Activation gate: 1 on the current state (enabled or disabled), 0 on the other",
            ),
            &["state"],
        )?;
        let replicas = IntGaugeVec::new(
            Opts::new(
                "tether_agent_replicas",
                "Server replicas (endpoints of the server URLs): discovered, placed, connected",
            ),
            &["state"],
        )?;
        for state in ["discovered", "placed", "connected"] {
            replicas.with_label_values(&[state]);
        }
        let placement_moves = IntCounter::new(
            "tether_agent_placement_moves_total",
            "Sessions drained because their replica left the agent's placement",
        )?;
        Ok(AgentMetrics {
            replicas,
            placement_moves,
            gate,
            reloads: ReloadMetrics::unregistered()?,
            mux,
            connected,
            reconnects,
            connect_failures,
            dials,
            policy_denials,
            build_info,
            cert_expiry: CertExpiry::unregistered()?,
        })
    }

    /// Counts one dial outcome (and a policy denial for `Denied`).
    pub fn dial(&self, outcome: DialOutcome) {
        self.dials.with_label_values(&[outcome.label()]).inc();
        if outcome == DialOutcome::Denied {
            self.policy_denials.inc();
        }
    }

    /// Sets `tether_agent_connected` and `tether_agent_replicas` from `status`.
    pub fn replica_state(&self, status: &crate::status::AgentStatus) {
        let connected = status.connected_replicas();
        self.connected.set(i64::from(connected > 0));
        self.replicas
            .with_label_values(&["discovered"])
            .set(status.replicas.len() as i64);
        self.replicas
            .with_label_values(&["connected"])
            .set(connected as i64);
        let placed = status.replicas.values().filter(|r| r.placed).count();
        self.replicas
            .with_label_values(&["placed"])
            .set(placed as i64);
    }

    /// Counts one session drained because its replica left the placement.
    pub fn placement_move(&self) {
        self.placement_moves.inc();
    }

    /// Counts one failed connection attempt.
    pub fn connect_failure(&self, err: &ConnectError) {
        self.connect_failures
            .with_label_values(&[err.label()])
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_every_family_once() {
        let registry = Registry::new();
        let metrics = AgentMetrics::register(&registry).unwrap();
        metrics.dial(DialOutcome::Denied);
        let names: Vec<String> = registry
            .gather()
            .iter()
            .map(|f| f.name().to_owned())
            .collect();
        for name in [
            "tether_agent_connected",
            "tether_agent_replicas",
            "tether_agent_reconnects_total",
            "tether_agent_connect_failures_total",
            "tether_agent_dials_total",
            "tether_agent_policy_denials_total",
            "tether_build_info",
            "tether_streams_opened_total",
            "tether_config_reloads_total",
        ] {
            assert!(names.iter().any(|n| n == name), "{name} missing: {names:?}");
        }
        assert_eq!(metrics.policy_denials.get(), 1);
        assert_eq!(metrics.dials.with_label_values(&["denied"]).get(), 1);
        // A second registration into the same registry fails instead of double counting.
        assert!(AgentMetrics::register(&registry).is_err());
    }
}
