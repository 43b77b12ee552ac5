//! Scale to zero: every agent of a client goes away while streams are open. Consumers get
//! errors, the client is listed with zero sessions, dials fail fast with the "no agent
//! connected" error, and when an agent returns dials work again with nothing restarted.

#![allow(clippy::unwrap_used)] // test helpers panic on failure by design

use std::time::Duration;

use tether_e2e::tether_testkit::{TestPki, echo_server};
use tether_e2e::{
    ForwardSpec, TestAgent, TestServer, allow_only, consumer_gets_error, ends_with_error,
    wait_forward_echo,
};
use tether_testkit::eventually;
use tether_testkit::metrics::metric_or_zero;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// A consumer connection through `forward` with one echo round trip done (the stream is open).
async fn open_consumer(forward: std::net::SocketAddr) -> TcpStream {
    let mut tcp = TcpStream::connect(forward).await.unwrap();
    tcp.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(10), tcp.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"ping");
    tcp
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_agents_leave_with_open_streams_then_one_returns() {
    let pki = TestPki::new();
    let (echo, _echo) = echo_server().await;
    let server = TestServer::start(&pki, &[ForwardSpec::new("edge-1", echo)], "").await;
    let forward = server.forward_addrs[0];
    let cert = pki.agent("edge-1");
    let policy = allow_only(echo);
    let graceful = TestAgent::start(&pki, &cert, server.tunnel_addr, &policy, "").await;
    let abrupt = TestAgent::start(&pki, &cert, server.tunnel_addr, &policy, "").await;
    eventually("two sessions", || {
        server.sessions.sessions("edge-1").len() == 2
    })
    .await;
    wait_forward_echo(forward).await;

    let mut consumers = Vec::new();
    for _ in 0..4 {
        consumers.push(open_consumer(forward).await);
    }
    assert!(server.sessions.active_streams() >= 4);

    // Every agent of edge-1 goes: one shuts down, the other just dies.
    graceful.stop().await.unwrap();
    abrupt.kill().await;
    for consumer in &mut consumers {
        assert!(
            ends_with_error(consumer).await,
            "a consumer saw a clean EOF"
        );
    }

    // Zero sessions is an ordinary, listed state.
    eventually("edge-1 has no session", || {
        server.sessions.sessions("edge-1").is_empty()
    })
    .await;
    let listing = server.clients().await;
    assert_eq!(listing.clients.len(), 1);
    assert_eq!(listing.clients[0].client, "edge-1");
    assert!(listing.clients[0].sessions.is_empty());
    assert_eq!(
        metric_or_zero(&server.registry, "tether_sessions", &[("client", "edge-1")]),
        0.0
    );
    assert_eq!(server.agents_connected(), 0.0);
    eventually("the health checker tracks nothing", || {
        metric_or_zero(&server.registry, "tether_health_sessions_tracked", &[]) == 0.0
    })
    .await;

    // Dials fail fast with the message (known and unknown clients alike), well inside the
    // 2 s dial timeout.
    // The message names the replica (server_id: the host name by default).
    let replica = tether_common::host::host_name();
    let err = server.sessions.pick("edge-1").unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("no agent connected for client \"edge-1\" on replica \"{replica}\"")
    );
    let err = server.sessions.pick("nobody").unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("no agent connected for client \"nobody\" on replica \"{replica}\"")
    );
    let no_session = || {
        metric_or_zero(
            &server.registry,
            "tether_dial_errors_total",
            &[("code", "no_session")],
        )
    };
    let before = no_session();
    for _ in 0..5 {
        let started = Instant::now();
        assert!(consumer_gets_error(forward).await);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "a dial without a session took {:?}",
            started.elapsed()
        );
    }
    assert_eq!(no_session(), before + 5.0);

    // An agent comes back: dials work again, nothing restarted.
    let back = TestAgent::start(&pki, &cert, server.tunnel_addr, &policy, "").await;
    server.wait_agents(1).await;
    wait_forward_echo(forward).await;
    let mut consumer = open_consumer(forward).await;
    consumer.write_all(b"more").await.unwrap();
    let mut buf = [0u8; 4];
    consumer.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"more");
    assert_eq!(server.clients().await.clients[0].sessions.len(), 1);
    drop(consumer);

    back.stop().await.unwrap();
    server.stop().await.unwrap();
}
