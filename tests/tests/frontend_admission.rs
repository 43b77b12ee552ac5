//! The HTTP CONNECT frontend under idle connections from one peer: they hold at most the
//! per-peer share of the handshake slots, so a real consumer still gets its tunnel at once.

#![allow(clippy::unwrap_used)] // test helpers panic on failure by design

use std::net::SocketAddr;
use std::time::Duration;

use tether_e2e::tether_testkit::{TestPki, echo_server};
use tether_e2e::{TestAgent, TestServer, WAIT, allow_only};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// The idle peer: a loopback address of its own.
const IDLE_PEER: &str = "127.0.0.9";
/// Idle connections it opens (more than `max_connections` below).
const IDLE: usize = 300;

async fn idle_connection(proxy: SocketAddr) -> Option<TcpStream> {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(IDLE_PEER.parse().unwrap(), 0))
        .unwrap();
    socket.connect(proxy).await.ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_from_one_peer_do_not_lock_consumers_out() {
    let pki = TestPki::new();
    let (echo, _echo) = echo_server().await;
    let server = TestServer::start(
        &pki,
        &[],
        "frontends:\n  http_connect_listen: \"127.0.0.1:0\"\n  handshake_timeout: 10s\n  \
         max_connections: 200\n  anonymous_clients: [edge-1]\n",
    )
    .await;
    let proxy = server.http_connect_addr.unwrap();
    let mut agent = TestAgent::start(
        &pki,
        &pki.agent("edge-1"),
        server.tunnel_addr,
        &allow_only(echo),
        "",
    )
    .await;
    agent.wait_connected().await;
    let mut idle = Vec::new();
    for _ in 0..IDLE {
        idle.extend(idle_connection(proxy).await);
    }
    // The proxy resets what it does not admit; some of those fail already in connect.
    assert!(
        idle.len() >= 64,
        "the idle peer connected {} times",
        idle.len()
    );

    let started = tokio::time::Instant::now();
    let consumer = async {
        let mut tcp = TcpStream::connect(proxy).await?;
        tcp.write_all(
            format!("CONNECT {echo} HTTP/1.1\r\nHost: {echo}\r\nX-Tether-Client: edge-1\r\n\r\n")
                .as_bytes(),
        )
        .await?;
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if tcp.read(&mut byte).await? == 0 {
                break;
            }
            head.push(byte[0]);
        }
        tcp.write_all(b"ping").await?;
        let mut back = [0u8; 4];
        tcp.read_exact(&mut back).await?;
        Ok::<_, std::io::Error>((String::from_utf8_lossy(&head).into_owned(), back))
    };
    let (head, back) = tokio::time::timeout(WAIT, consumer)
        .await
        .expect("the consumer is answered in time")
        .expect("the consumer's tunnel works");
    let took = started.elapsed();
    assert!(head.starts_with("HTTP/1.1 200"), "{head:?}");
    assert_eq!(&back, b"ping");
    assert!(
        took < Duration::from_secs(2),
        "the consumer waited {took:?}"
    );
    drop(idle);
    agent.stop().await.unwrap();
    server.stop().await.unwrap();
}
