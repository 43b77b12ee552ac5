//! The agent against an in-test server: byte-exact streams, policy denials that leave the
//! session up, refused targets, an untrusted server, reconnects, admin endpoints and shutdown.

// Helpers outside #[test] functions panic on failure too; that is what a test wants.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::Ordering;

use support::{TestAgent, TestServer, WAIT};
use tether_mux::OpenError;
use tether_proto::{GoAwayCode, Host, OpenErrorCode, TargetAddr};
use tether_testkit::assert_no_prior_connection;
use tether_testkit::http_get;
use tether_testkit::metrics::metric_sum;
use tether_testkit::{TestPki, echo_server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

fn allow_only(port: u16) -> String {
    format!("{{ allow: [ {{ cidrs: [\"127.0.0.1/32\"], ports: [\"{port}\"] }} ] }}")
}

fn target(host: Host, port: u16) -> TargetAddr {
    TargetAddr { host, port }
}

/// Writes `payload` through `stream`, half-closes, reads everything back.
async fn echo_through(stream: tether_mux::MuxStream, payload: &[u8]) -> Vec<u8> {
    let (mut read, mut write) = tokio::io::split(stream);
    let to_send = payload.to_vec();
    let writer = tokio::spawn(async move {
        write.write_all(&to_send).await.unwrap();
        write.shutdown().await.unwrap();
        write
    });
    let mut got = Vec::new();
    tokio::time::timeout(WAIT, read.read_to_end(&mut got))
        .await
        .expect("echo completes in time")
        .unwrap();
    writer.await.unwrap();
    got
}

#[tokio::test]
async fn allowed_target_echoes_one_mebibyte_byte_exact() {
    let pki = TestPki::new();
    let cert = pki.agent("edge-1");
    let (echo_addr, _echo) = echo_server().await;
    let mut server = TestServer::start(&pki).await;
    let mut agent = TestAgent::start(
        &pki,
        &cert,
        server.addr,
        &allow_only(echo_addr.port()),
        true,
    )
    .await;

    let session = server.next_session().await;
    let status = agent.wait_for(|s| s.connected).await;
    assert_eq!(status.server_id.as_deref(), Some("test-server"));
    assert_eq!(status.sessions, 1);

    // The handshake carried the agent's headers.
    let headers = server.headers.lock().unwrap()[0].clone();
    assert_eq!(headers["sec-websocket-protocol"], "tether.v1");
    assert_eq!(headers["x-tether-labels"], "cluster=eu-1,role=upstream");
    assert_eq!(headers["x-tether-version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(headers["x-tether-instance"], status.instance_id.as_str());

    let payload: Vec<u8> = (0..1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let stream = session
        .open(TargetAddr::from_socket_addr(echo_addr))
        .await
        .expect("allowed target opens");
    let got = echo_through(stream, &payload).await;
    assert_eq!(got.len(), payload.len());
    assert!(got == payload, "echoed bytes differ");
    assert_eq!(
        metric_sum(
            &agent.registry,
            "tether_agent_dials_total",
            &[("outcome", "ok")]
        ),
        1.0
    );
    assert_eq!(
        metric_sum(&agent.registry, "tether_agent_connected", &[]),
        1.0
    );

    let admin = agent.admin.unwrap();
    assert_eq!(http_get(admin, "/healthz").await.0, 200);
    assert_eq!(http_get(admin, "/readyz").await.0, 200);
    let (code, body) = http_get(admin, "/metrics").await;
    assert_eq!(code, 200);
    assert!(body.contains("tether_agent_connected 1"), "{body}");
    assert!(body.contains("tether_build_info{version="), "{body}");

    agent.stop().await.expect("agent stops cleanly");
}

#[tokio::test]
async fn denied_targets_are_refused_and_the_session_survives() {
    let pki = TestPki::new();
    let cert = pki.agent("edge-1");
    let (echo_addr, _echo) = echo_server().await;
    // Reachable, but on a port the policy does not allow.
    let denied = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let denied_port = denied.local_addr().unwrap().port();
    let mut server = TestServer::start(&pki).await;
    let mut agent = TestAgent::start(
        &pki,
        &cert,
        server.addr,
        &allow_only(echo_addr.port()),
        false,
    )
    .await;
    let session = server.next_session().await;
    agent.wait_for(|s| s.connected).await;

    let mapped: Ipv6Addr = "::ffff:127.0.0.1".parse().unwrap();
    let attempts = [
        target(Host::Ip(IpAddr::V4(Ipv4Addr::LOCALHOST)), denied_port),
        target(Host::Name("127.1".into()), denied_port),
        target(Host::Ip(IpAddr::V6(mapped)), denied_port),
        target(Host::Ip("169.254.169.254".parse().unwrap()), denied_port),
        target(
            Host::Ip("169.254.169.254".parse().unwrap()),
            echo_addr.port(),
        ),
    ];
    for addr in &attempts {
        match session.open(addr.clone()).await {
            Err(OpenError::Refused { code, message }) => {
                assert_eq!(code, OpenErrorCode::Denied, "{addr}: {message}");
            }
            other => panic!("{addr}: expected a denial, got {other:?}"),
        }
    }
    assert_no_prior_connection(&denied).await;
    assert_eq!(
        metric_sum(&agent.registry, "tether_agent_policy_denials_total", &[]),
        attempts.len() as f64
    );
    assert_eq!(
        metric_sum(
            &agent.registry,
            "tether_agent_dials_total",
            &[("outcome", "denied")]
        ),
        attempts.len() as f64
    );

    // The same session still carries an allowed stream.
    assert!(!session.is_closed());
    let stream = session
        .open(TargetAddr::from_socket_addr(echo_addr))
        .await
        .expect("allowed target opens after denials");
    assert_eq!(echo_through(stream, b"still here").await, b"still here");
    assert_eq!(agent.status.borrow().sessions, 1, "no reconnect happened");
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn a_closed_port_is_refused() {
    let pki = TestPki::new();
    let cert = pki.agent("edge-1");
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let closed_addr = closed.local_addr().unwrap();
    drop(closed);
    let mut server = TestServer::start(&pki).await;
    let mut agent = TestAgent::start(
        &pki,
        &cert,
        server.addr,
        &allow_only(closed_addr.port()),
        false,
    )
    .await;
    let session = server.next_session().await;
    agent.wait_for(|s| s.connected).await;

    match session
        .open(TargetAddr::from_socket_addr(closed_addr))
        .await
    {
        Err(OpenError::Refused { code, .. }) => assert_eq!(code, OpenErrorCode::Refused),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(
        metric_sum(
            &agent.registry,
            "tether_agent_dials_total",
            &[("outcome", "refused")]
        ),
        1.0
    );
    assert!(!session.is_closed());
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn a_server_certificate_from_another_ca_is_refused() {
    let pki = TestPki::new();
    let cert = pki.agent("edge-1");
    let server = TestServer::start_impostor(&pki).await;
    let mut agent = TestAgent::start(&pki, &cert, server.addr, "{ allow: [] }", true).await;

    // Two failed attempts: the agent keeps trying, with backoff.
    let status = agent
        .wait_for(|s| s.attempts >= 2 && s.last_error_kind == Some("tls"))
        .await;
    assert!(!status.connected);
    assert!(
        status
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("tls handshake")),
        "{status:?}"
    );
    assert_eq!(server.established.load(Ordering::SeqCst), 0, "no session");
    assert!(server.tcp_accepted.load(Ordering::SeqCst) >= 2);
    assert!(
        metric_sum(
            &agent.registry,
            "tether_agent_connect_failures_total",
            &[("reason", "tls")]
        ) >= 2.0
    );

    let admin = agent.admin.unwrap();
    assert_eq!(http_get(admin, "/healthz").await.0, 200);
    let (code, body) = http_get(admin, "/readyz").await;
    assert_eq!(code, 503);
    assert!(body.contains("tls"), "{body}");
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn the_agent_reconnects_after_the_server_closes_the_session() {
    let pki = TestPki::new();
    let cert = pki.agent("edge-1");
    let (echo_addr, _echo) = echo_server().await;
    let mut server = TestServer::start(&pki).await;
    let mut agent = TestAgent::start(
        &pki,
        &cert,
        server.addr,
        &allow_only(echo_addr.port()),
        false,
    )
    .await;

    let first = server.next_session().await;
    let status = agent.wait_for(|s| s.connected).await;
    let first_id = status.session_id.clone().unwrap();
    first.close();
    drop(first);

    let second = server.next_session().await;
    let status = agent
        .wait_for(|s| s.connected && s.session_id.as_deref() != Some(first_id.as_str()))
        .await;
    assert_eq!(status.sessions, 2);
    assert_eq!(server.established.load(Ordering::SeqCst), 2);
    assert_eq!(
        metric_sum(&agent.registry, "tether_agent_reconnects_total", &[]),
        1.0
    );
    // The new session works.
    let stream = second
        .open(TargetAddr::from_socket_addr(echo_addr))
        .await
        .expect("open on the new session");
    assert_eq!(echo_through(stream, b"again").await, b"again");
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn shutdown_sends_goaway_and_closes_the_session() {
    let pki = TestPki::new();
    let cert = pki.agent("edge-1");
    let (echo_addr, _echo) = echo_server().await;
    let mut server = TestServer::start(&pki).await;
    let mut agent = TestAgent::start(
        &pki,
        &cert,
        server.addr,
        &allow_only(echo_addr.port()),
        false,
    )
    .await;
    let session = server.next_session().await;
    agent.wait_for(|s| s.connected).await;
    // A stream that is open at shutdown is reset, not left hanging.
    let mut stream = session
        .open(TargetAddr::from_socket_addr(echo_addr))
        .await
        .unwrap();

    let mut status = agent.status.clone();
    agent.stop().await.expect("run returns Ok");
    tokio::time::timeout(WAIT, session.closed())
        .await
        .expect("the server sees the session end");
    let goaway = session.peer_goaway().expect("GOAWAY received");
    assert_eq!(goaway.0, GoAwayCode::Shutdown);
    let mut buf = [0u8; 1];
    assert!(
        stream.read(&mut buf).await.is_err(),
        "the open stream errors, never a clean EOF"
    );
    let last = status.borrow_and_update().clone();
    assert!(!last.connected && last.stopping, "{last:?}");
}
