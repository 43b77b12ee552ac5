//! Stream counters shared by all sessions of a daemon: opened, closed by reason, active, bytes.

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// Why a stream ended, for `tether_streams_closed_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// Both directions finished with FIN.
    Fin,
    /// Reset by either side (RST, cancelled handle, protocol violation).
    Reset,
    /// The open was refused (OPEN_ERR, limit, timeout).
    Refused,
    /// The session died while the stream was open.
    SessionLost,
}

impl CloseReason {
    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            CloseReason::Fin => "fin",
            CloseReason::Reset => "reset",
            CloseReason::Refused => "refused",
            CloseReason::SessionLost => "session_lost",
        }
    }

    const ALL: [CloseReason; 4] = [
        CloseReason::Fin,
        CloseReason::Reset,
        CloseReason::Refused,
        CloseReason::SessionLost,
    ];
}

/// Stream metrics. Cheap to clone; clones share the same series.
#[derive(Debug, Clone)]
pub struct MuxMetrics {
    /// `tether_streams_opened_total`
    pub opened: IntCounter,
    /// `tether_streams_closed_total{reason}`
    pub closed: IntCounterVec,
    /// `tether_streams_active`
    pub active: IntGauge,
    /// `tether_stream_bytes_total{direction}`: the family of the two counters below.
    pub bytes: IntCounterVec,
    /// `tether_stream_bytes_total{direction="rx"}`: payload bytes received from peers.
    pub bytes_rx: IntCounter,
    /// `tether_stream_bytes_total{direction="tx"}`: payload bytes sent to peers.
    pub bytes_tx: IntCounter,
    /// `tether_protocol_errors_total{kind}`: malformed or unexpected frames from peers.
    pub protocol_errors: IntCounterVec,
}

impl MuxMetrics {
    /// Metrics that are not registered anywhere (tests, or a caller that reads them directly).
    pub fn unregistered() -> Self {
        let opened = IntCounter::new(
            "tether_streams_opened_total",
            "Streams opened, in either direction.",
        );
        let closed = IntCounterVec::new(
            Opts::new("tether_streams_closed_total", "Streams closed, by reason."),
            &["reason"],
        );
        let active = IntGauge::new("tether_streams_active", "Streams open now.");
        let bytes = IntCounterVec::new(
            Opts::new(
                "tether_stream_bytes_total",
                "Stream payload bytes, by direction (rx from peers, tx to peers).",
            ),
            &["direction"],
        );
        let protocol_errors = IntCounterVec::new(
            Opts::new(
                "tether_protocol_errors_total",
                "Malformed or unexpected frames received, by kind.",
            ),
            &["kind"],
        );
        // The names and labels above are constants, so construction cannot fail.
        let (Ok(opened), Ok(closed), Ok(active), Ok(bytes), Ok(protocol_errors)) =
            (opened, closed, active, bytes, protocol_errors)
        else {
            unreachable!("metric descriptors are static and valid");
        };
        for reason in CloseReason::ALL {
            closed.with_label_values(&[reason.label()]);
        }
        Self {
            bytes_rx: bytes.with_label_values(&["rx"]),
            bytes_tx: bytes.with_label_values(&["tx"]),
            bytes,
            opened,
            closed,
            active,
            protocol_errors,
        }
    }

    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let metrics = Self::unregistered();
        registry.register(Box::new(metrics.opened.clone()))?;
        registry.register(Box::new(metrics.closed.clone()))?;
        registry.register(Box::new(metrics.active.clone()))?;
        registry.register(Box::new(metrics.bytes.clone()))?;
        registry.register(Box::new(metrics.protocol_errors.clone()))?;
        Ok(metrics)
    }

    pub(crate) fn stream_opened(&self) {
        self.opened.inc();
        self.active.inc();
    }

    pub(crate) fn stream_closed(&self, reason: CloseReason) {
        self.closed.with_label_values(&[reason.label()]).inc();
        self.active.dec();
    }

    /// Streams closed for `reason` so far.
    pub fn closed_count(&self, reason: CloseReason) -> u64 {
        self.closed.with_label_values(&[reason.label()]).get()
    }

    /// Streams closed for any reason so far.
    pub fn closed_total(&self) -> u64 {
        CloseReason::ALL.iter().map(|r| self.closed_count(*r)).sum()
    }
}

impl Default for MuxMetrics {
    fn default() -> Self {
        Self::unregistered()
    }
}
