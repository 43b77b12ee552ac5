//! Consumer frontends: the HTTP CONNECT and SOCKS5 proxy listeners, what they share (the
//! consumer table, the connection cap, refusal metrics and logs) and their in-place reload.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use prometheus::IntGauge;
use tether_common::config_error::ConfigErrors;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, debug_span, field, info};

use crate::accept::accept;
use crate::admission::{Slot, SlotTable, source_key};
use crate::config::FrontendsConfig;
use crate::consumers::auth::ConsumerTable;
use crate::consumers::dial::{TunnelDialer, reset};
use crate::server::metrics::ServerMetrics;
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

/// What reload can change without touching the listeners.
#[derive(Debug)]
pub(crate) struct Settings {
    pub(crate) consumers: ConsumerTable,
    pub(crate) handshake_timeout: Duration,
    /// The section these settings were built from (to tell a real change from none).
    config: FrontendsConfig,
}

impl Settings {
    fn from_config(config: &FrontendsConfig) -> Self {
        Self {
            consumers: ConsumerTable::from_config(config),
            handshake_timeout: config.handshake_timeout.0,
            config: config.clone(),
        }
    }
}

/// What a [`FrontendControl::reload`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FrontendReload {
    /// Keys of `frontends:` that changed and now apply to new consumer connections
    /// (`consumers`, `anonymous_clients`, `handshake_timeout`).
    pub applied: Vec<&'static str>,
    /// Keys that changed but only apply after a restart (`http_connect_listen`,
    /// `socks5_listen`, `max_connections`).
    pub needs_restart: Vec<&'static str>,
}

/// Reloads the frontends' consumers and settings in place; both listeners see the new table
/// on their next connection, connections already past their handshake are not touched.
#[derive(Debug, Clone)]
pub struct FrontendControl {
    settings: Arc<ArcSwap<Settings>>,
}

impl FrontendControl {
    pub(crate) fn new(config: &FrontendsConfig) -> Self {
        Self {
            settings: Arc::new(ArcSwap::from_pointee(Settings::from_config(config))),
        }
    }

    /// Applies the reloadable part of `new` if it differs from the current section; a section
    /// equal to the current one touches nothing. An invalid section changes nothing.
    pub fn reload(&self, new: &FrontendsConfig) -> Result<FrontendReload, ConfigErrors> {
        let mut errors = ConfigErrors::new();
        new.validate(&mut errors);
        errors.into_result(())?;
        let current = self.settings.load();
        let old = &current.config;
        let mut outcome = FrontendReload::default();
        for (key, changed) in [
            ("consumers", old.consumers != new.consumers),
            (
                "anonymous_clients",
                old.anonymous_clients != new.anonymous_clients,
            ),
            (
                "handshake_timeout",
                old.handshake_timeout != new.handshake_timeout,
            ),
        ] {
            if changed {
                outcome.applied.push(key);
            }
        }
        for (key, changed) in [
            (
                "http_connect_listen",
                old.http_connect_listen != new.http_connect_listen,
            ),
            ("socks5_listen", old.socks5_listen != new.socks5_listen),
            (
                "max_connections",
                old.max_connections != new.max_connections,
            ),
        ] {
            if changed {
                outcome.needs_restart.push(key);
            }
        }
        if !outcome.applied.is_empty() {
            // Keep the listener keys as they run, so a later reload still reports them.
            let mut applied = new.clone();
            applied.http_connect_listen = old.http_connect_listen.clone();
            applied.socks5_listen = old.socks5_listen.clone();
            applied.max_connections = old.max_connections;
            self.settings
                .store(Arc::new(Settings::from_config(&applied)));
            info!(changed = ?outcome.applied, "frontend consumers and settings reloaded");
        }
        if !outcome.needs_restart.is_empty() {
            info!(changed = ?outcome.needs_restart, "frontend listener settings change at the next restart");
        }
        Ok(outcome)
    }

    pub(crate) fn current(&self) -> Arc<Settings> {
        self.settings.load_full()
    }
}

/// One running proxy listener and what its connection tasks share.
#[derive(Debug)]
pub(crate) struct Frontend {
    pub(crate) kind: Kind,
    pub(crate) dialer: TunnelDialer,
    pub(crate) control: FrontendControl,
    pub(crate) metrics: ServerMetrics,
    /// Cancelled when shutdown starts: stop accepting.
    pub(crate) shutdown: CancellationToken,
    /// Cancelled when the drain deadline has passed: abort handshakes and pipes still running.
    pub(crate) hard_stop: CancellationToken,
    pub(crate) tracker: TaskTracker,
    /// Established (authenticated) connections: `max_connections`.
    pub(crate) slots: Arc<Semaphore>,
    /// Connections still in their handshake, counted apart: `max_connections` of them too.
    pub(crate) preauth: Arc<Semaphore>,
    /// Handshakes per peer address ([`PREAUTH_PER_PEER`]).
    pub(crate) peers: Arc<SlotTable<IpAddr>>,
    pub(crate) log: LogThrottle,
}

impl Frontend {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        kind: Kind,
        dialer: TunnelDialer,
        control: FrontendControl,
        max_connections: usize,
        metrics: ServerMetrics,
        shutdown: CancellationToken,
        hard_stop: CancellationToken,
        tracker: TaskTracker,
    ) -> Self {
        Self {
            kind,
            dialer,
            control,
            metrics,
            shutdown,
            hard_stop,
            tracker,
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
    ) -> crate::consumers::audit::AuditEntry {
        self.dialer.audit.connection(
            crate::consumers::audit::Via::Frontend(self.kind.label()),
            peer,
            Some(consumer),
            client,
            target,
        )
    }
}

/// Accepts consumer connections until shutdown; each one runs in its own tracked task.
pub(crate) async fn accept_loop(frontend: Arc<Frontend>, listener: TcpListener) {
    while let Some((tcp, peer)) = accept(&listener, &frontend.shutdown, &frontend.log).await {
        let Some(peer_slot) = frontend.peers.try_take(source_key(peer.ip())) else {
            frontend.refused("limit", None, "", &"too many handshakes from this peer");
            reset(&tcp);
            continue;
        };
        let Ok(permit) = frontend.preauth.clone().try_acquire_owned() else {
            frontend.refused("limit", None, "", &"too many consumer handshakes");
            reset(&tcp);
            continue;
        };
        let mut admission = Admission {
            preauth: Some((permit, peer_slot)),
            established: None,
        };
        // Per connection, so at debug (see forward.rs); refusals carry their own fields.
        let span = debug_span!(
            "frontend_conn",
            frontend = frontend.kind.label(),
            peer.addr = %peer,
            consumer = field::Empty,
            agent.id = field::Empty,
            target = field::Empty,
            stream.id = field::Empty
        );
        let conn = frontend.clone();
        let active = Active::new(
            frontend
                .metrics
                .frontend_active
                .with_label_values(&[frontend.kind.label()]),
        );
        frontend.tracker.spawn(
            async move {
                let _held = active;
                tokio::select! {
                    // Polled first: once splicing, `serve` ends itself on hard stop with a
                    // reset of the consumer, which dropping it here would turn into an EOF.
                    biased;
                    _ = serve(&conn, tcp, peer, &mut admission) => {}
                    // Ends handshakes and dials still running at hard stop.
                    _ = conn.hard_stop.cancelled() => {}
                }
            }
            .instrument(span),
        );
    }
    debug!(
        frontend = frontend.kind.label(),
        "frontend stopped accepting"
    );
}

/// The slots a consumer connection holds: pre-auth ones (global and per peer) during its
/// handshake, then one of the `max_connections` established ones.
pub(crate) struct Admission {
    preauth: Option<(OwnedSemaphorePermit, Slot<IpAddr>)>,
    established: Option<OwnedSemaphorePermit>,
}

impl Admission {
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

/// Counts a connection in `tether_frontend_connections_active` until dropped.
struct Active(IntGauge);

impl Active {
    fn new(gauge: IntGauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.dec();
    }
}

async fn serve(frontend: &Frontend, tcp: TcpStream, peer: SocketAddr, admission: &mut Admission) {
    let _ = tcp.set_nodelay(true);
    match frontend.kind {
        Kind::HttpConnect => {
            crate::consumers::http_connect::serve(frontend, tcp, peer, admission).await
        }
        Kind::Socks5 => crate::consumers::socks5::serve(frontend, tcp, peer, admission).await,
    }
}

/// Records who and what a connection is for on its span.
pub(crate) fn record_request(consumer: &str, client: &str, target: &dyn fmt::Display) {
    let span = tracing::Span::current();
    span.record("consumer", consumer);
    span.record("agent.id", client);
    span.record("target", field::display(target));
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use tether_common::duration::HumanDuration;

    use super::*;

    #[test]
    fn reload_applies_only_what_changed_and_reports_restart_keys() {
        let initial = FrontendsConfig {
            http_connect_listen: "127.0.0.1:3128".into(),
            ..FrontendsConfig::default()
        };
        let control = FrontendControl::new(&initial);
        let before = control.current();

        // Equal: nothing is swapped.
        let outcome = control.reload(&initial).unwrap();
        assert_eq!(outcome, FrontendReload::default());
        assert!(Arc::ptr_eq(&before, &control.current()));

        // Listener keys only: reported, not swapped.
        let moved = FrontendsConfig {
            http_connect_listen: "127.0.0.1:3129".into(),
            max_connections: 5,
            ..initial.clone()
        };
        let outcome = control.reload(&moved).unwrap();
        assert!(outcome.applied.is_empty());
        assert_eq!(
            outcome.needs_restart,
            ["http_connect_listen", "max_connections"]
        );
        assert!(Arc::ptr_eq(&before, &control.current()));

        // Reloadable keys: swapped; the running listener keys are kept, so they are still
        // reported as pending next time.
        let faster = FrontendsConfig {
            handshake_timeout: HumanDuration::secs(3),
            anonymous_clients: vec!["edge-*".into()],
            ..moved.clone()
        };
        let outcome = control.reload(&faster).unwrap();
        assert_eq!(outcome.applied, ["anonymous_clients", "handshake_timeout"]);
        let now = control.current();
        assert_eq!(now.handshake_timeout, Duration::from_secs(3));
        assert_eq!(now.config.http_connect_listen, "127.0.0.1:3128");
        let outcome = control.reload(&faster).unwrap();
        assert!(outcome.applied.is_empty());
        assert_eq!(
            outcome.needs_restart,
            ["http_connect_listen", "max_connections"]
        );

        // Invalid: refused with the key path, nothing changes.
        let invalid = FrontendsConfig {
            handshake_timeout: HumanDuration::secs(0),
            ..faster
        };
        let err = control.reload(&invalid).unwrap_err().to_string();
        assert!(err.contains("frontends.handshake_timeout"), "{err}");
        assert_eq!(control.current().handshake_timeout, Duration::from_secs(3));
    }
}
