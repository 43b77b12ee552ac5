//! Half-close and reset through the whole path (consumer, server, tunnel, agent, target): FIN
//! travels after the data and leaves the other direction open; RST arrives as an error, never EOF.

#![allow(clippy::unwrap_used)] // test helpers panic on failure by design

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::time::Duration;

use tether_e2e::tether_testkit::TestPki;
use tether_e2e::{TestAgent, TestServer, connected_pair};
use tether_testkit::eventually;
use tether_testkit::metrics::metric_or_zero;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

struct Rig {
    server: TestServer,
    agent: TestAgent,
    forward: SocketAddr,
    target: TcpListener,
}

async fn rig(pki: &TestPki) -> Rig {
    let target = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target_addr = target.local_addr().unwrap();
    let (server, agent) = connected_pair(pki, target_addr).await;
    let forward = server.forward_addrs[0];
    Rig {
        server,
        agent,
        forward,
        target,
    }
}

impl Rig {
    async fn finish(self) {
        let Rig { server, agent, .. } = self;
        eventually("streams closed on both sides", || {
            metric_or_zero(&server.registry, "tether_streams_active", &[]) == 0.0
                && metric_or_zero(&agent.registry, "tether_streams_active", &[]) == 0.0
        })
        .await;
        agent.stop().await.unwrap();
        server.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_client_first() {
    let pki = TestPki::new();
    let rig = rig(&pki).await;
    let target = async {
        let (mut socket, _) = rig.target.accept().await.unwrap();
        let mut request = Vec::new();
        socket.read_to_end(&mut request).await.unwrap();
        // The reply is written only after the request's EOF arrived.
        socket
            .write_all(format!("got {} bytes", request.len()).as_bytes())
            .await
            .unwrap();
        socket.shutdown().await.unwrap();
        request
    };
    let client = async {
        let mut stream = TcpStream::connect(rig.forward).await.unwrap();
        let request = vec![7u8; 1 << 20];
        stream.write_all(&request).await.unwrap();
        stream.shutdown().await.unwrap();
        let mut reply = String::new();
        stream.read_to_string(&mut reply).await.unwrap();
        reply
    };
    let (request, reply) = tokio::join!(target, client);
    assert_eq!(request, vec![7u8; 1 << 20]);
    assert_eq!(reply, format!("got {} bytes", 1 << 20));
    rig.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_target_first() {
    let pki = TestPki::new();
    let rig = rig(&pki).await;
    let (done_tx, done_rx) = oneshot::channel();
    let target = async {
        let (mut socket, _) = rig.target.accept().await.unwrap();
        socket.write_all(b"hello").await.unwrap();
        socket.shutdown().await.unwrap();
        let mut rest = Vec::new();
        socket.read_to_end(&mut rest).await.unwrap();
        let _ = done_tx.send(rest);
    };
    let client = async {
        let mut stream = TcpStream::connect(rig.forward).await.unwrap();
        let mut greeting = Vec::new();
        stream.read_to_end(&mut greeting).await.unwrap();
        assert_eq!(greeting, b"hello");
        // Our direction is still open after the target's FIN.
        let upload: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 253) as u8).collect();
        stream.write_all(&upload).await.unwrap();
        stream.shutdown().await.unwrap();
        upload
    };
    let ((), upload) = tokio::join!(target, client);
    let received = done_rx.await.unwrap();
    assert!(
        received == upload,
        "upload after the target's FIN arrives intact"
    );
    rig.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_immediately_after_data_delivers_everything() {
    let pki = TestPki::new();
    let rig = rig(&pki).await;
    let target = async {
        let (mut socket, _) = rig.target.accept().await.unwrap();
        // Read the request first: closing with unread input would make the kernel send RST.
        let mut go = [0u8; 2];
        socket.read_exact(&mut go).await.unwrap();
        let data: Vec<u8> = (0..(20u32 << 20)).map(|i| (i % 249) as u8).collect();
        socket.write_all(&data).await.unwrap();
        drop(socket);
        data
    };
    let client = async {
        let mut stream = TcpStream::connect(rig.forward).await.unwrap();
        stream.write_all(b"go").await.unwrap();
        let mut got = Vec::new();
        stream.read_to_end(&mut got).await.unwrap();
        got
    };
    let (sent, got) = tokio::join!(target, client);
    assert_eq!(got.len(), sent.len());
    assert!(got == sent);
    rig.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_reset_reaches_the_consumer_as_an_error() {
    let pki = TestPki::new();
    let rig = rig(&pki).await;
    let mut client = TcpStream::connect(rig.forward).await.unwrap();
    client.write_all(b"ping").await.unwrap();
    let (socket, _) = rig.target.accept().await.unwrap();
    socket.set_zero_linger().unwrap();
    drop(socket);
    let mut buf = [0u8; 16];
    let result = tokio::time::timeout(Duration::from_secs(2), client.read(&mut buf))
        .await
        .expect("the consumer learns of the reset within 2 s");
    match result {
        Err(err) => assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{err}"),
        Ok(n) => panic!("consumer saw a clean read of {n} bytes instead of a reset"),
    }
    rig.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_reset_reaches_the_target_as_an_error() {
    let pki = TestPki::new();
    let rig = rig(&pki).await;
    let client = TcpStream::connect(rig.forward).await.unwrap();
    let mut client = client;
    client.write_all(b"ping").await.unwrap();
    let (mut socket, _) = rig.target.accept().await.unwrap();
    let mut buf = [0u8; 4];
    socket.read_exact(&mut buf).await.unwrap();
    client.set_zero_linger().unwrap();
    drop(client);
    let result = tokio::time::timeout(Duration::from_secs(2), socket.read(&mut buf))
        .await
        .expect("the target learns of the reset within 2 s");
    match result {
        Err(err) => assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{err}"),
        Ok(n) => panic!("target saw a clean read of {n} bytes instead of a reset"),
    }
    rig.finish().await;
}
