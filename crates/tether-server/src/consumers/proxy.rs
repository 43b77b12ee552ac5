//! What the HTTP CONNECT and SOCKS5 proxies share once a consumer connection is accepted: the
//! running `Frontend` (context, consumer table, connection caps, refusal metrics and logs), the
//! `Admission` slots a connection holds, and its span fields.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::{debug, field, info};

use crate::admission::{Slot, SlotTable};
use crate::consumers::audit::{AuditEntry, Via};
use crate::consumers::context::ConsumerContext;
use crate::consumers::proxy_control::FrontendControl;
use crate::consumers::proxy_metrics::ProxyMetrics;
use tether_common::log_throttle::LogThrottle;

/// How often a repeated refusal of one reason may be logged at info per frontend.
const REFUSAL_LOG_WINDOW: Duration = Duration::from_secs(60);

/// Connections from one peer address (an IPv6 peer by its /64) still in their handshake: one
/// local process with idle sockets cannot hold every pre-auth slot.
pub(crate) const PREAUTH_PER_PEER: usize = 64;

/// Which proxy protocol a frontend speaks (the `frontend` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// HTTP/1.1 `CONNECT host:port`.
    HttpConnect,
    /// SOCKS5 (RFC 1928) with username/password authentication (RFC 1929).
    Socks5,
}

impl Kind {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Kind::HttpConnect => "http_connect",
            Kind::Socks5 => "socks5",
        }
    }
}

/// One running proxy listener and what its connection tasks share.
#[derive(Debug)]
pub(crate) struct Frontend {
    pub(crate) kind: Kind,
    /// The dialer, audit log and lifecycle all consumer listeners share.
    pub(crate) ctx: ConsumerContext,
    pub(crate) control: FrontendControl,
    pub(crate) metrics: ProxyMetrics,
    /// Established (authenticated) connections: `max_connections`.
    pub(crate) slots: Arc<Semaphore>,
    /// Connections still in their handshake, counted apart: `max_connections` of them too.
    pub(crate) preauth: Arc<Semaphore>,
    /// Handshakes per peer address ([`PREAUTH_PER_PEER`]).
    pub(crate) peers: Arc<SlotTable<IpAddr>>,
    pub(crate) log: LogThrottle,
}

impl Frontend {
    pub(crate) fn new(
        kind: Kind,
        ctx: ConsumerContext,
        control: FrontendControl,
        max_connections: usize,
        metrics: ProxyMetrics,
    ) -> Self {
        Self {
            kind,
            ctx,
            control,
            metrics,
            slots: Arc::new(Semaphore::new(max_connections)),
            preauth: Arc::new(Semaphore::new(max_connections)),
            peers: SlotTable::new(PREAUTH_PER_PEER),
            log: LogThrottle::new(REFUSAL_LOG_WINDOW),
        }
    }

    /// Counts a refusal and logs it: one line per refusal, at info for the first of its reason
    /// in a window (with the number skipped since), at debug otherwise. Never a token.
    pub(crate) fn refused(
        &self,
        reason: &'static str,
        consumer: Option<&str>,
        client: &str,
        detail: &dyn fmt::Display,
    ) {
        self.metrics
            .frontend_refusals
            .with_label_values(&[self.kind.label(), reason])
            .inc();
        let consumer = consumer.unwrap_or("-");
        match self.log.check(reason) {
            Some(suppressed) => info!(
                reason,
                consumer,
                agent.id = client,
                suppressed,
                detail = %detail,
                "consumer refused"
            ),
            None => {
                debug!(reason, consumer, agent.id = client, detail = %detail, "consumer refused")
            }
        }
    }
}

impl Frontend {
    /// Starts the audit record of an authorized consumer's connection.
    pub(crate) fn audit(
        &self,
        peer: SocketAddr,
        consumer: &str,
        client: &str,
        target: &tether_proto::TargetAddr,
    ) -> AuditEntry {
        self.ctx.audit.connection(
            Via::Frontend(self.kind.label()),
            peer,
            Some(consumer),
            client,
            target,
        )
    }
}

/// The slots a consumer connection holds: pre-auth ones (global and per peer) during its
/// handshake, then one of the `max_connections` established ones.
pub(crate) struct Admission {
    preauth: Option<(OwnedSemaphorePermit, Slot<IpAddr>)>,
    established: Option<OwnedSemaphorePermit>,
}

impl Admission {
    /// A connection in its handshake, holding a global and a per-peer pre-auth slot.
    pub(crate) fn preauth(permit: OwnedSemaphorePermit, peer_slot: Slot<IpAddr>) -> Self {
        Self {
            preauth: Some((permit, peer_slot)),
            established: None,
        }
    }

    /// The consumer is authorized: trades the pre-auth slots for an established one. False
    /// when `max_connections` established connections are open (the caller refuses).
    pub(crate) fn authorized(&mut self, frontend: &Frontend) -> bool {
        match frontend.slots.clone().try_acquire_owned() {
            Ok(permit) => {
                self.established = Some(permit);
                self.preauth = None;
                true
            }
            Err(_) => false,
        }
    }
}

/// Records who and what a connection is for on its span.
pub(crate) fn record_request(consumer: &str, client: &str, target: &dyn fmt::Display) {
    let span = tracing::Span::current();
    span.record("consumer", consumer);
    span.record("agent.id", client);
    span.record("target", field::display(target));
}
