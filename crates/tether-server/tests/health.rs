//! The health checker over in-memory sessions with paused time: RTT, unhealthy after missed
//! pongs and healthy again on a pong, dials avoiding unhealthy sessions, no probes to removed
//! or replaced sessions, and remotedialer sessions whose peer answers with Go's empty pongs.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use tether_mux::TransportError;
use tether_mux::remotedialer::{self, RdTransport, WsMessage};
use tether_proto::remotedialer::RdLimits;

use tether_common::duration::HumanDuration;
use tether_mux::transport::framed;
use tether_mux::{MuxConfig, MuxMetrics, Role, Session};
use tether_server::{HealthChecker, HealthConfig, HealthMetrics, RegistryMetrics, SessionRegistry};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The sessions' own keepalive stays out of the way: only the health checker pings.
fn quiet_config() -> MuxConfig {
    MuxConfig {
        ping_interval: Duration::from_secs(3600),
        idle_timeout: Duration::from_secs(7200),
        ..MuxConfig::default()
    }
}

/// Copies `from` to `to` while `gate` is open; while it is closed, bytes wait.
async fn relay(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    mut gate: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if gate.wait_for(|open| *open).await.is_err() {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// A server-side session whose agent side answers through a relay that `gate` can stop
/// (both directions wait while it is closed; nothing is lost).
fn gated_pair() -> (Session, Session, watch::Sender<bool>) {
    let config = quiet_config();
    let metrics = MuxMetrics::unregistered();
    let (server_io, server_far) = tokio::io::duplex(256 * 1024);
    let (agent_io, agent_far) = tokio::io::duplex(256 * 1024);
    let (server_far_r, server_far_w) = tokio::io::split(server_far);
    let (agent_far_r, agent_far_w) = tokio::io::split(agent_far);
    let (gate, gate_rx) = watch::channel(true);
    tokio::spawn(relay(server_far_r, agent_far_w, gate_rx.clone()));
    tokio::spawn(relay(agent_far_r, server_far_w, gate_rx));
    let (server, _server_in, server_driver) = Session::new(
        framed(server_io, config.limits()),
        Role::Server,
        config.clone(),
        metrics.clone(),
    );
    let (agent, _agent_in, agent_driver) = Session::new(
        framed(agent_io, config.limits()),
        Role::Agent,
        config,
        metrics,
    );
    tokio::spawn(server_driver.run());
    tokio::spawn(agent_driver.run());
    (server, agent, gate)
}

fn health_config() -> HealthConfig {
    HealthConfig {
        interval: HumanDuration::secs(1),
        timeout: HumanDuration::millis(500),
        unhealthy_after: 2,
    }
}

fn probes(metrics: &HealthMetrics, result: &str) -> u64 {
    metrics.health_probes.with_label_values(&[result]).get()
}

/// Lets (paused) time run until `check` holds; fails after 10 virtual minutes.
async fn until(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..60_000 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("never happened: {what}");
}

struct Fixture {
    metrics: HealthMetrics,
    registry: Arc<SessionRegistry>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

fn start_checker() -> Fixture {
    let metrics = HealthMetrics::unregistered().unwrap();
    let registry = Arc::new(SessionRegistry::new(
        RegistryMetrics::unregistered().unwrap(),
    ));
    let checker = HealthChecker::new(registry.clone(), metrics.clone(), &health_config());
    let stop = CancellationToken::new();
    let task = tokio::spawn(checker.run(stop.clone()));
    Fixture {
        metrics,
        registry,
        stop,
        task,
    }
}

#[tokio::test(start_paused = true)]
async fn missed_pongs_make_a_session_unhealthy_and_a_pong_heals_it() {
    let f = start_checker();
    let peer: SocketAddr = "127.0.0.1:5000".parse().unwrap();
    let (s1, _a1, _gate1) = gated_pair();
    let (s2, _a2, gate2) = gated_pair();
    let g1 = f.registry.insert("edge-1", "inst-a", peer, s1);
    let g2 = f.registry.insert("edge-1", "inst-b", peer, s2);
    until("both tracked", || f.metrics.health_tracked.get() == 2).await;
    until("both probed", || {
        f.registry
            .all_sessions()
            .iter()
            .all(|e| e.health.rtt().is_some())
    })
    .await;
    let rtt = f.metrics.session_rtt.with_label_values(&["edge-1"]).get();
    assert!((0.0..0.5).contains(&rtt), "rtt {rtt}");
    assert_eq!(
        f.registry.pick_entry("edge-1").unwrap().session_id,
        g2.session_id()
    );

    // The newest session stops answering: after two missed pongs it is unhealthy and dials go
    // to the older, healthy one.
    gate2.send_replace(false);
    let newest = f.registry.sessions("edge-1")[1].clone();
    until("newest unhealthy", || !newest.health.is_healthy()).await;
    assert!(probes(&f.metrics, "timeout") >= 2);
    assert_eq!(f.metrics.health_unhealthy.get(), 1);
    assert_eq!(
        f.registry.pick_entry("edge-1").unwrap().session_id,
        g1.session_id()
    );
    let listed = f.registry.snapshot();
    assert_eq!(
        listed[0]
            .sessions
            .iter()
            .map(|s| s.healthy)
            .collect::<Vec<_>>(),
        vec![true, false]
    );

    // It answers again: healthy, and preferred again as the newest.
    gate2.send_replace(true);
    until("newest healthy again", || newest.health.is_healthy()).await;
    assert_eq!(f.metrics.health_unhealthy.get(), 0);
    assert_eq!(
        f.registry.pick_entry("edge-1").unwrap().session_id,
        g2.session_id()
    );

    drop(g1);
    drop(g2);
    until("nothing tracked", || f.metrics.health_tracked.get() == 0).await;
    // The client's RTT series goes with its last session.
    assert!(
        f.metrics
            .session_rtt
            .remove_label_values(&["edge-1"])
            .is_err()
    );
    f.stop.cancel();
    f.task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn removed_and_replaced_sessions_are_never_probed_again() {
    let f = start_checker();
    let peer: SocketAddr = "127.0.0.1:5000".parse().unwrap();
    // A session that never answers (half-open), then its replacement by the same instance.
    let (stale, _a1, gate1) = gated_pair();
    gate1.send_replace(false);
    let _g1 = f.registry.insert("edge-1", "inst-a", peer, stale.clone());
    until("stale one unhealthy", || {
        f.registry
            .all_sessions()
            .iter()
            .any(|e| !e.health.is_healthy())
    })
    .await;
    let (fresh, _a2, _gate2) = gated_pair();
    let g2 = f.registry.insert("edge-1", "inst-a", peer, fresh);
    assert!(stale.is_closed());
    until("only the new session tracked", || {
        f.metrics.health_tracked.get() == 1 && f.metrics.health_unhealthy.get() == 0
    })
    .await;

    // Ten intervals later: only answered probes, none to the replaced session.
    let timeouts = probes(&f.metrics, "timeout");
    let closed = probes(&f.metrics, "closed");
    let ok = probes(&f.metrics, "ok");
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(probes(&f.metrics, "timeout"), timeouts);
    assert_eq!(probes(&f.metrics, "closed"), closed);
    assert!(
        probes(&f.metrics, "ok") >= ok + 8,
        "new session keeps being probed"
    );

    // A removed session likewise.
    drop(g2);
    until("nothing tracked", || f.metrics.health_tracked.get() == 0).await;
    let total: u64 = ["ok", "timeout", "closed"]
        .iter()
        .map(|r| probes(&f.metrics, r))
        .sum();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let after: u64 = ["ok", "timeout", "closed"]
        .iter()
        .map(|r| probes(&f.metrics, r))
        .sum();
    assert_eq!(after, total);

    // Shutdown ends the checker and its subscription.
    f.stop.cancel();
    f.task.await.unwrap();
    assert_eq!(f.registry.subscriber_count(), 0);
}

#[tokio::test(start_paused = true)]
async fn sessions_present_before_the_checker_starts_are_probed() {
    let metrics = HealthMetrics::unregistered().unwrap();
    let registry = Arc::new(SessionRegistry::new(
        RegistryMetrics::unregistered().unwrap(),
    ));
    let peer: SocketAddr = "127.0.0.1:5000".parse().unwrap();
    let (s1, _a1, _gate) = gated_pair();
    let _g1 = registry.insert("edge-1", "inst-a", peer, s1);
    let checker = HealthChecker::new(registry.clone(), metrics.clone(), &health_config());
    let stop = CancellationToken::new();
    let task = tokio::spawn(checker.run(stop.clone()));
    until("probed", || probes(&metrics, "ok") >= 1).await;
    assert_eq!(metrics.health_tracked.get(), 1);
    stop.cancel();
    task.await.unwrap();
    assert_eq!(metrics.health_tracked.get(), 0);
}

/// One end of an in-memory WebSocket carrying remotedialer messages.
struct MemWs {
    tx: futures::channel::mpsc::Sender<WsMessage>,
    rx: futures::channel::mpsc::Receiver<WsMessage>,
}

impl futures::Stream for MemWs {
    type Item = Result<WsMessage, TransportError>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_next_unpin(cx).map(|m| m.map(Ok))
    }
}

impl futures::Sink<WsMessage> for MemWs {
    type Error = TransportError;
    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.tx
            .poll_ready(cx)
            .map_err(|e| TransportError::Other(e.to_string()))
    }
    fn start_send(mut self: Pin<&mut Self>, item: WsMessage) -> Result<(), Self::Error> {
        self.tx
            .start_send(item)
            .map_err(|e| TransportError::Other(e.to_string()))
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }
    fn poll_close(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Result<(), Self::Error>> {
        self.tx.close_channel();
        Poll::Ready(Ok(()))
    }
}

/// A server-side remotedialer session whose peer behaves like Go's: every WebSocket ping is
/// answered with an empty pong, and nothing else is sent. Returns the number of pings seen.
fn go_like_session() -> (Session, Arc<AtomicU64>) {
    let (to_peer, peer_rx) = futures::channel::mpsc::channel(16);
    let (peer_tx, from_peer) = futures::channel::mpsc::channel(16);
    let ws = MemWs {
        tx: to_peer,
        rx: from_peer,
    };
    let config = remotedialer::mux_config(Role::Server, &quiet_config());
    let transport = RdTransport::new(
        ws,
        Role::Server,
        remotedialer::settings_for(&config),
        RdLimits::default(),
    );
    let (session, _incoming, driver) =
        Session::new(transport, Role::Server, config, MuxMetrics::unregistered());
    tokio::spawn(driver.run());
    let pings = Arc::new(AtomicU64::new(0));
    let seen = pings.clone();
    tokio::spawn(async move {
        let mut rx = peer_rx;
        let mut tx = peer_tx;
        while let Some(message) = rx.next().await {
            if let WsMessage::Ping(_) = message {
                seen.fetch_add(1, Ordering::Relaxed);
                if tx.send(WsMessage::Pong(Bytes::new())).await.is_err() {
                    return;
                }
            }
        }
    });
    (session, pings)
}

/// Go answers pings with empty pongs: its sessions stay healthy and report an RTT.
#[tokio::test(start_paused = true)]
async fn go_like_empty_pongs_keep_a_remotedialer_session_healthy() {
    let f = start_checker();
    let peer: SocketAddr = "127.0.0.1:5000".parse().unwrap();
    let (session, pings) = go_like_session();
    let _guard = f.registry.insert("edge-go", "inst-go", peer, session);
    until("five probes answered", || probes(&f.metrics, "ok") >= 5).await;
    assert_eq!(probes(&f.metrics, "timeout"), 0);
    assert!(pings.load(Ordering::Relaxed) >= 5);
    assert_eq!(f.metrics.health_unhealthy.get(), 0);
    let entry = f.registry.pick_entry("edge-go").unwrap();
    assert!(entry.health.is_healthy());
    assert!(entry.health.rtt().is_some());
    let rtt = f.metrics.session_rtt.with_label_values(&["edge-go"]).get();
    assert!((0.0..0.5).contains(&rtt), "rtt {rtt}");
    f.stop.cancel();
    f.task.await.unwrap();
}

/// The TestPki's files, named relative to its directory.
const TLS_YAML: &str = "tls: { cert: server.pem, key: server-key.pem, client_ca: ca.pem }\n";

#[test]
fn health_config_defaults_and_validation() {
    let pki = tether_testkit::TestPki::new();
    let config = tether_server::ServerConfig::parse(TLS_YAML, "server.yaml", pki.dir()).unwrap();
    assert_eq!(config.health, HealthConfig::default());
    assert_eq!(config.health.interval.0, Duration::from_secs(10));
    assert_eq!(config.health.timeout.0, Duration::from_secs(5));
    assert_eq!(config.health.unhealthy_after, 3);

    let yaml = format!("{TLS_YAML}health: {{ interval: 0s, timeout: 2h, unhealthy_after: 0 }}\n");
    let err = tether_server::ServerConfig::parse(&yaml, "server.yaml", pki.dir()).unwrap_err();
    let tether_common::config_error::ConfigLoadError::Invalid { errors, .. } = err else {
        panic!("expected validation errors, got {err}");
    };
    let found: Vec<(String, String)> = errors.0.into_iter().map(|e| (e.path, e.message)).collect();
    assert_eq!(
        found,
        vec![
            (
                "health.interval".to_owned(),
                "0s must be above zero".to_owned()
            ),
            (
                "health.timeout".to_owned(),
                "2h must be at most 1h".to_owned()
            ),
            (
                "health.unhealthy_after".to_owned(),
                "0 is outside 1..=1000 missed pongs".to_owned()
            ),
        ]
    );

    let yaml = format!("{TLS_YAML}health: {{ intervall: 1s }}\n");
    let err = tether_server::ServerConfig::parse(&yaml, "server.yaml", pki.dir()).unwrap_err();
    assert!(err.to_string().contains("intervall"), "{err}");
}
