//! The peering's Prometheus series: peer sessions, relayed streams by outcome on both ends,
//! the time a relayed open takes and the reloads of the peer TLS material.

use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGaugeVec, Opts, Registry};

/// Outcomes of a relayed dial on the replica that relays it.
pub(crate) const RELAY_OUTCOMES: [&str; 4] = ["opened", "refused", "no_session", "failed"];
/// Outcomes of a relayed dial on the replica that holds the agent.
pub(crate) const SERVED_OUTCOMES: [&str; 4] = ["opened", "refused", "no_session", "bad_request"];
/// Results of a reload of the peer TLS material.
pub(crate) const TLS_RELOAD_RESULTS: [&str; 3] = ["applied", "unchanged", "rejected"];

/// The peering's metrics. Cheap to clone; clones share the series.
#[derive(Debug, Clone)]
pub struct PeerMetrics {
    /// `tether_peer_sessions{direction}`: `out` (this replica dialed) and `in`.
    pub(crate) sessions: IntGaugeVec,
    /// `tether_relay_streams_total{outcome}`: dials this replica relayed to a peer.
    pub(crate) relayed: IntCounterVec,
    /// `tether_relay_served_total{outcome}`: relayed dials this replica served for a peer.
    pub(crate) served: IntCounterVec,
    /// `tether_relay_open_seconds`: from the relay's first attempt to the opened stream.
    pub(crate) open_seconds: Histogram,
    /// `tether_peer_tls_reloads_total{result}`: reloads of the peer TLS material.
    pub(crate) tls_reloads: IntCounterVec,
}

impl PeerMetrics {
    /// Creates the series and registers them in `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<PeerMetrics> {
        let sessions = IntGaugeVec::new(
            Opts::new(
                "tether_peer_sessions",
                "Sessions between server replicas, by direction (out: dialed by this replica)",
            ),
            &["direction"],
        )?;
        let relayed = IntCounterVec::new(
            Opts::new(
                "tether_relay_streams_total",
                "Dials for agents without a session here, relayed to a peer replica, by outcome",
            ),
            &["outcome"],
        )?;
        let served = IntCounterVec::new(
            Opts::new(
                "tether_relay_served_total",
                "Relayed dials served for a peer replica through a local agent session, by outcome",
            ),
            &["outcome"],
        )?;
        let open_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "tether_relay_open_seconds",
                "Time to open a relayed stream (every attempt at every peer included)",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0,
            ]),
        )?;
        let tls_reloads = IntCounterVec::new(
            Opts::new(
                "tether_peer_tls_reloads_total",
                "Reloads of the peer TLS material (peer certificate, key and CA; the listener's \
                 server certificate) by result: applied, unchanged, rejected (the old material \
                 stays in use; the same bad files are counted once).",
            ),
            &["result"],
        )?;
        for result in TLS_RELOAD_RESULTS {
            tls_reloads.with_label_values(&[result]);
        }
        for direction in ["out", "in"] {
            sessions.with_label_values(&[direction]);
        }
        for outcome in RELAY_OUTCOMES {
            relayed.with_label_values(&[outcome]);
        }
        for outcome in SERVED_OUTCOMES {
            served.with_label_values(&[outcome]);
        }
        registry.register(Box::new(sessions.clone()))?;
        registry.register(Box::new(relayed.clone()))?;
        registry.register(Box::new(served.clone()))?;
        registry.register(Box::new(open_seconds.clone()))?;
        registry.register(Box::new(tls_reloads.clone()))?;
        Ok(PeerMetrics {
            sessions,
            relayed,
            served,
            open_seconds,
            tls_reloads,
        })
    }
}
