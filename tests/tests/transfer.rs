//! Byte-exact transfers through a forward, the tunnel and an agent to an echo target: sizes from
//! 0 B to 64 MiB, and 200 concurrent streams with sequence-numbered chunks.

#![allow(clippy::unwrap_used)] // test helpers panic on failure by design

use std::net::SocketAddr;

use tether_e2e::connected_pair;
use tether_e2e::tether_testkit::{TestPki, echo_server};
use tether_testkit::eventually;
use tether_testkit::metrics::metric_or_zero;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends `payload` through `forward` to the echo target and returns what came back.
async fn echo_through(forward: SocketAddr, payload: Vec<u8>) -> Vec<u8> {
    let stream = TcpStream::connect(forward).await.expect("connect forward");
    stream.set_nodelay(true).expect("nodelay");
    let (mut read, mut write) = stream.into_split();
    let writer = tokio::spawn(async move {
        write.write_all(&payload).await.expect("write");
        write.shutdown().await.expect("shutdown");
    });
    let mut back = Vec::new();
    read.read_to_end(&mut back).await.expect("read echo to EOF");
    writer.await.expect("writer");
    back
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn byte_exact_sizes_both_directions() {
    let pki = TestPki::new();
    let (target, _echo) = echo_server().await;
    let (server, agent) = connected_pair(&pki, target).await;
    let forward = server.forward_addrs[0];
    for size in [0usize, 1, 4095, 65_535, 65_536, 65_537, 1 << 20, 64 << 20] {
        let mut payload = vec![0u8; size];
        fastrand::Rng::with_seed(size as u64).fill(&mut payload);
        let back = echo_through(forward, payload.clone()).await;
        assert_eq!(back.len(), size, "length for size {size}");
        assert!(back == payload, "content for size {size}");
    }
    eventually("server streams closed", || {
        metric_or_zero(&server.registry, "tether_streams_active", &[]) == 0.0
    })
    .await;
    let opened = metric_or_zero(&server.registry, "tether_streams_opened_total", &[]);
    assert_eq!(opened, 8.0);
    agent.stop().await.expect("agent stops cleanly");
    server.stop().await.expect("server stops cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_streams_in_order() {
    let pki = TestPki::new();
    let (target, _echo) = echo_server().await;
    let (server, agent) = connected_pair(&pki, target).await;
    let forward = server.forward_addrs[0];
    let mut tasks = tokio::task::JoinSet::new();
    for stream_no in 0..200u32 {
        tasks.spawn(async move {
            // 64 chunks of 1 KiB, each starting with (stream, sequence).
            let mut payload = Vec::with_capacity(64 * 1024);
            for seq in 0..64u32 {
                let mut chunk = vec![(stream_no % 251) as u8; 1024];
                chunk[..4].copy_from_slice(&stream_no.to_be_bytes());
                chunk[4..8].copy_from_slice(&seq.to_be_bytes());
                payload.extend_from_slice(&chunk);
            }
            let back = echo_through(forward, payload.clone()).await;
            assert_eq!(back.len(), payload.len(), "stream {stream_no} length");
            for (seq, chunk) in back.chunks(1024).enumerate() {
                assert_eq!(&chunk[..4], &stream_no.to_be_bytes(), "stream id in chunk");
                assert_eq!(&chunk[4..8], &(seq as u32).to_be_bytes(), "sequence");
            }
            assert!(back == payload);
        });
    }
    while let Some(result) = tasks.join_next().await {
        result.expect("stream task");
    }
    eventually("all streams closed", || {
        metric_or_zero(&server.registry, "tether_streams_active", &[]) == 0.0
            && metric_or_zero(&agent.registry, "tether_streams_active", &[]) == 0.0
    })
    .await;
    assert_eq!(
        metric_or_zero(&server.registry, "tether_streams_opened_total", &[]),
        200.0
    );
    agent.stop().await.expect("agent stops");
    server.stop().await.expect("server stops");
}
