//! Registry events through real agents: a reconnect of the same instance through a cut proxy
//! (old session half-open on the server) is one `StaleSessionRemoved` and the health checker
//! stops probing it; two instances of one agent id coexist; a lagging subscriber gets a snapshot
//! equal to the registry.

#![allow(clippy::unwrap_used)] // test helpers panic on failure by design

use std::net::SocketAddr;
use std::time::Duration;

use tether_e2e::tether_testkit::{TestPki, echo_server};
use tether_e2e::{ForwardSpec, TestAgent, TestServer, allow_only, wait_forward_echo};
use tether_server::{RegistryNotice, SessionEvent};
use tether_testkit::eventually;
use tether_testkit::metrics::metric_or_zero;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// A TCP proxy in front of the server that the test can cut: `freeze` stops forwarding on the
/// existing connections but keeps their server-side sockets open (the server sees nothing:
/// a half-open session), and `refuse` makes it drop new connections at once.
struct CutProxy {
    addr: SocketAddr,
    frozen: watch::Sender<bool>,
    refuse: watch::Sender<bool>,
    _tasks: JoinSet<()>,
}

impl CutProxy {
    async fn start(upstream: SocketAddr) -> CutProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (frozen, frozen_rx) = watch::channel(false);
        let (refuse, refuse_rx) = watch::channel(false);
        let mut tasks = JoinSet::new();
        tasks.spawn(async move {
            // Connection tasks live as long as the proxy (the accept task owns them).
            let mut conns = JoinSet::new();
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                if *refuse_rx.borrow() {
                    drop(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(upstream).await else {
                    continue;
                };
                // Each connection belongs to the freeze state of the moment it was accepted:
                // later connections are not frozen.
                let (gate_tx, gate_rx) = watch::channel(true);
                let mut frozen_rx = frozen_rx.clone();
                conns.spawn(async move {
                    let _ = frozen_rx.wait_for(|f| *f).await;
                    let _ = gate_tx.send(false);
                    std::future::pending::<()>().await;
                });
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                conns.spawn(relay(cr, sw, gate_rx.clone()));
                conns.spawn(relay(sr, cw, gate_rx));
            }
        });
        CutProxy {
            addr,
            frozen,
            refuse,
            _tasks: tasks,
        }
    }

    /// Stops forwarding on the current connections and refuses new ones.
    fn cut(&self) {
        self.refuse.send_replace(true);
        self.frozen.send_replace(true);
    }

    /// Accepts (and forwards) new connections again; the frozen ones stay frozen.
    fn accept_again(&self) {
        // New connections must not inherit the frozen state.
        self.frozen.send_replace(false);
        self.refuse.send_replace(false);
    }
}

/// Copies while the gate is open. Once it closes, or either side ends, it holds both sockets
/// open (never sends FIN) until the proxy is dropped.
async fn relay(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    gate: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if !*gate.borrow() || to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    std::future::pending::<()>().await;
}

fn probes(server: &TestServer, result: &str) -> f64 {
    metric_or_zero(
        &server.registry,
        "tether_health_probes_total",
        &[("result", result)],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_instance_reconnect_through_a_cut_proxy_replaces_the_half_open_session() {
    let pki = TestPki::new();
    let (echo, _echo) = echo_server().await;
    // Server: fast health probes, a keepalive slow enough to keep the half-open session.
    let server = TestServer::start(
        &pki,
        &[ForwardSpec::new("edge-1", echo)],
        "health: { interval: 100ms, timeout: 200ms, unhealthy_after: 2 }\n\
         session: { ping_interval: 30s, idle_timeout: 60s }\n",
    )
    .await;
    let proxy = CutProxy::start(server.tunnel_addr).await;
    // Agent: notices the dead path after 1 s of silence and reconnects (same process, so the
    // same instance id).
    let agent = TestAgent::start(
        &pki,
        &pki.agent("edge-1"),
        proxy.addr,
        &allow_only(echo),
        "session: { ping_interval: 200ms, idle_timeout: 1s }\n",
    )
    .await;
    server.wait_agents(1).await;
    wait_forward_echo(server.forward_addrs[0]).await;
    let old = server.sessions.sessions("edge-1").remove(0);
    let (_, mut events) = server.sessions.subscribe();

    // Cut: the server's session is half-open now. Its probes time out and it turns unhealthy,
    // but dials still pick it rather than failing (no other session).
    proxy.cut();
    eventually("the half-open session turns unhealthy", || {
        !old.health.is_healthy()
    })
    .await;
    assert!(probes(&server, "timeout") >= 2.0);
    assert_eq!(
        server.sessions.pick_entry("edge-1").unwrap().session_id,
        old.session_id
    );
    assert_eq!(
        metric_or_zero(&server.registry, "tether_health_unhealthy_sessions", &[]),
        1.0
    );

    // The path heals: the agent reconnects with the same instance id.
    proxy.accept_again();
    eventually("a new session replaced the old one", || {
        let sessions = server.sessions.sessions("edge-1");
        sessions.len() == 1 && sessions[0].session_id != old.session_id
    })
    .await;
    let new = server.sessions.sessions("edge-1").remove(0);
    assert_eq!(new.instance, old.instance);
    // The registry closes the replaced session just after publishing the new one (outside its
    // lock), so this can lag the check above by a moment.
    eventually("the replaced session closes", || old.session.is_closed()).await;
    wait_forward_echo(server.forward_addrs[0]).await;

    // Exactly: one added (the new one), one stale removal (the old one), no plain removal.
    eventually("the health checker tracks only the new session", || {
        metric_or_zero(&server.registry, "tether_health_sessions_tracked", &[]) == 1.0
            && metric_or_zero(&server.registry, "tether_health_unhealthy_sessions", &[]) == 0.0
    })
    .await;
    let mut seen = Vec::new();
    while let Some(notice) = events.try_recv() {
        match notice {
            RegistryNotice::Event(SessionEvent::SessionAdded(e)) => {
                seen.push(format!("added {}", e.session_id))
            }
            RegistryNotice::Event(SessionEvent::SessionRemoved { session_id, .. }) => {
                seen.push(format!("removed {session_id}"))
            }
            RegistryNotice::Event(SessionEvent::StaleSessionRemoved {
                session_id,
                replaced_by,
                ..
            }) => seen.push(format!("stale {session_id} by {replaced_by}")),
            RegistryNotice::Event(SessionEvent::SessionRevoked { session_id, .. }) => {
                seen.push(format!("revoked {session_id}"))
            }
            RegistryNotice::Lagged { .. } => panic!("unexpected lag"),
        }
    }
    assert_eq!(
        seen,
        vec![
            format!("added {}", new.session_id),
            format!("stale {} by {}", old.session_id, new.session_id),
        ]
    );
    let event = |name| {
        metric_or_zero(
            &server.registry,
            "tether_session_events_total",
            &[("event", name)],
        )
    };
    assert_eq!(event("stale_removed"), 1.0);
    assert_eq!(event("removed"), 0.0);

    // The stale session is not probed any more: for 20 probe intervals, no timeout and no
    // probe of a closed session, while the new one keeps answering.
    let (timeouts, closed, ok) = (
        probes(&server, "timeout"),
        probes(&server, "closed"),
        probes(&server, "ok"),
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    eventually("the new session answers probes", || {
        probes(&server, "ok") >= ok + 5.0 && tokio::time::Instant::now() >= deadline
    })
    .await;
    assert_eq!(probes(&server, "timeout"), timeouts);
    assert_eq!(probes(&server, "closed"), closed);
    assert!(new.health.is_healthy());
    assert!(new.health.rtt().is_some());
    let listing = server.clients().await;
    assert_eq!(listing.clients[0].sessions.len(), 1);
    assert_eq!(listing.clients[0].sessions[0].session_id, new.session_id);
    assert!(listing.clients[0].sessions[0].healthy);

    agent.stop().await.unwrap();
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_of_one_agent_id_keep_both_sessions() {
    let pki = TestPki::new();
    let server = TestServer::start(&pki, &[], "").await;
    let cert = pki.agent("edge-1");
    let a = TestAgent::start(&pki, &cert, server.tunnel_addr, "  allow: []\n", "").await;
    let b = TestAgent::start(&pki, &cert, server.tunnel_addr, "  allow: []\n", "").await;
    eventually("two sessions for edge-1", || {
        server.sessions.sessions("edge-1").len() == 2
    })
    .await;
    let mut instances: Vec<String> = server
        .sessions
        .sessions("edge-1")
        .into_iter()
        .map(|e| e.instance)
        .collect();
    instances.sort();
    let mut expected = vec![
        a.status.borrow().instance_id.clone(),
        b.status.borrow().instance_id.clone(),
    ];
    expected.sort();
    assert_eq!(instances, expected);
    assert_eq!(
        metric_or_zero(
            &server.registry,
            "tether_session_events_total",
            &[("event", "stale_removed")]
        ),
        0.0
    );
    assert_eq!(
        metric_or_zero(&server.registry, "tether_sessions", &[("client", "edge-1")]),
        2.0
    );
    assert_eq!(server.clients().await.clients[0].sessions.len(), 2);

    // One instance leaves: the other stays.
    a.stop().await.unwrap();
    eventually("one session left", || {
        server.sessions.sessions("edge-1").len() == 1
    })
    .await;
    assert_eq!(
        server.sessions.sessions("edge-1")[0].instance,
        b.status.borrow().instance_id
    );
    b.stop().await.unwrap();
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_subscriber_gets_a_lag_notice_and_a_snapshot_equal_to_the_registry() {
    let pki = TestPki::new();
    let server = TestServer::start(&pki, &[], "").await;
    let (initial, mut slow) = server.sessions.subscribe_with_capacity(2);
    assert!(initial.is_empty());

    let mut agents = Vec::new();
    for id in ["edge-1", "edge-2", "edge-3", "edge-4"] {
        agents.push(
            TestAgent::start(
                &pki,
                &pki.agent(id),
                server.tunnel_addr,
                "  allow: []\n",
                "",
            )
            .await,
        );
    }
    server.wait_agents(4).await;
    agents.pop().unwrap().stop().await.unwrap();
    server.wait_agents(3).await;

    // Five events for a queue of two: the first notice is the lag, with the registry as it is.
    let notice = tokio::time::timeout(Duration::from_secs(5), slow.recv())
        .await
        .unwrap();
    let RegistryNotice::Lagged { missed, snapshot } = notice else {
        panic!("expected a lag notice, got {notice:?}");
    };
    assert!(missed >= 3, "missed {missed}");
    let ids = |entries: &[tether_server::SessionEntry]| {
        let mut ids: Vec<(String, u64)> = entries
            .iter()
            .map(|e| (e.client.clone(), e.session_id))
            .collect();
        ids.sort();
        ids
    };
    assert_eq!(ids(&snapshot), ids(&server.sessions.all_sessions()));
    let clients: Vec<String> = snapshot.iter().map(|e| e.client.clone()).collect();
    assert_eq!(clients, vec!["edge-1", "edge-2", "edge-3"]);

    // Then ordinary events again.
    let leaving = agents.pop().unwrap();
    let leaving_id = server.sessions.sessions("edge-3")[0].session_id;
    leaving.stop().await.unwrap();
    let notice = tokio::time::timeout(Duration::from_secs(5), slow.recv())
        .await
        .unwrap();
    match notice {
        RegistryNotice::Event(SessionEvent::SessionRemoved { client, session_id }) => {
            assert_eq!((client.as_str(), session_id), ("edge-3", leaving_id));
        }
        other => panic!("expected edge-3's removal, got {other:?}"),
    }
    for agent in agents {
        agent.stop().await.unwrap();
    }
    drop(slow);
    server.stop().await.unwrap();
}
