//! Fair admission on the tunnel listener: one host holding thousands of silent connections
//! cannot keep a valid agent out, a certificate that never upgrades holds only a few slots, and
//! a certificate refused after TLS gets HTTP 403 with the reason.

#![allow(clippy::unwrap_used)] // test helpers panic on failure by design

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tether_common::pki::IssueOptions;
use tether_e2e::tether_testkit::{AgentCert, TestPki};
use tether_e2e::{TestAgent, TestServer, WAIT};
use tether_testkit::eventually;
use tether_testkit::metrics::metric;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::client::TlsStream;

/// The attacking host: a loopback address of its own.
const ATTACKER: &str = "127.0.0.9";
/// Silent connections the attacker keeps open.
const FLOOD: usize = 5_000;
/// How long a valid agent may take to connect during the flood.
const ADMITTED_WITHIN: Duration = Duration::from_secs(2);

/// One silent connection from the attacker, opened again a second after the server closes it.
async fn silent_connection(tunnel: SocketAddr, opened: Arc<AtomicUsize>) {
    loop {
        let socket = TcpSocket::new_v4().unwrap();
        socket
            .bind(SocketAddr::new(ATTACKER.parse().unwrap(), 0))
            .unwrap();
        if let Ok(mut tcp) = socket.connect(tunnel).await {
            opened.fetch_add(1, Ordering::Relaxed);
            let mut buf = [0u8; 64];
            // Silent: wait for the server to close (or reset) it.
            while let Ok(n) = tcp.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_agent_connects_while_one_host_holds_thousands_of_silent_connections() {
    let pki = TestPki::new();
    // The default handshake_timeout: a silent connection may hold a slot that long unless the
    // server tells it apart.
    let server = TestServer::start(&pki, &[], "handshake_timeout: 10s\n").await;
    let opened = Arc::new(AtomicUsize::new(0));
    let mut flood = JoinSet::new();
    for _ in 0..FLOOD {
        flood.spawn(silent_connection(server.tunnel_addr, opened.clone()));
    }
    eventually("the attacker opened its connections", || {
        opened.load(Ordering::Relaxed) >= FLOOD
    })
    .await;
    eventually("the attacker holds pre-auth slots", || {
        metric(&server.registry, "tether_preauth_handshakes_inflight", &[]).unwrap_or(0.0) >= 1.0
    })
    .await;

    let started = tokio::time::Instant::now();
    let mut agent = TestAgent::start(
        &pki,
        &pki.agent("edge-1"),
        server.tunnel_addr,
        "  allow: []\n",
        "",
    )
    .await;
    agent.wait_connected().await;
    let took = started.elapsed();
    eprintln!(
        "agent connected in {took:?} while the attacker had opened {} connections",
        opened.load(Ordering::Relaxed)
    );
    assert!(
        took <= ADMITTED_WITHIN,
        "the agent took {took:?} to connect during the flood"
    );
    flood.abort_all();
    agent.stop().await.unwrap();
    server.stop().await.unwrap();
}

/// A TLS connection to the tunnel listener with `cert`, ALPN http/1.1.
async fn tls_connect(pki: &TestPki, cert: &AgentCert, tunnel: SocketAddr) -> TlsStream<TcpStream> {
    let mut config = (*pki.client_config(cert)).clone();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(tunnel).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    connector.connect(name, tcp).await.unwrap()
}

/// Sends an upgrade request and reads the answer until the server closes.
async fn request(tls: &mut TlsStream<TcpStream>) -> String {
    tls.write_all(b"GET /v1/connect HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, tls.read_to_end(&mut answer))
        .await
        .expect("the server answers in time")
        .ok();
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_that_never_upgrades_holds_at_most_four_slots() {
    let pki = TestPki::new();
    let server = TestServer::start(&pki, &[], "").await;
    let thief = pki.agent("stolen");
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut tls = tls_connect(&pki, &thief, server.tunnel_addr).await;
        // A byte of a request head, never finished: the connection waits for its upgrade.
        tls.write_all(b"G").await.unwrap();
        tls.flush().await.unwrap();
        held.push(tls);
    }
    eventually("four connections wait for their upgrade", || {
        metric(&server.registry, "tether_preauth_handshakes_inflight", &[]) == Some(4.0)
    })
    .await;
    let mut fifth = tls_connect(&pki, &thief, server.tunnel_addr).await;
    let answer = request(&mut fifth).await;
    assert!(
        answer.starts_with("HTTP/1.1 429"),
        "the fifth connection is refused: {answer:?}"
    );
    assert!(answer.contains("waiting for their upgrade"), "{answer:?}");
    // Another identity is not affected.
    let mut agent = TestAgent::start(
        &pki,
        &pki.agent("edge-1"),
        server.tunnel_addr,
        "  allow: []\n",
        "",
    )
    .await;
    agent.wait_connected().await;
    drop(held);
    agent.stop().await.unwrap();
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_refused_after_tls_gets_403_with_the_reason() {
    let pki = TestPki::new();
    let server = TestServer::start(&pki, &[], "").await;
    let cert = pki.agent_with(
        "edge-1",
        IssueOptions {
            omit_uri_san: true,
            ..IssueOptions::default()
        },
    );
    let mut tls = tls_connect(&pki, &cert, server.tunnel_addr).await;
    let answer = request(&mut tls).await;
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer:?}");
    assert!(
        answer.contains("agent certificate refused: the client certificate has no URI SAN"),
        "{answer:?}"
    );
    assert_eq!(server.agents_connected(), 0.0);
    server.stop().await.unwrap();
}
