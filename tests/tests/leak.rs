//! The seed's leak scenario (DESIGN.md lesson 4): rounds of 10,000 short HTTP requests through a
//! forward (sequential, then 200 in flight) and 1,000 long-lived streams opened and closed. After
//! every round the stream counters balance and tasks, heap and fds are back at baseline, and
//! three rounds in a row show no growth.

#![allow(clippy::unwrap_used)] // test helpers panic on failure by design

use std::net::SocketAddr;
use std::sync::Arc;

use tether_e2e::at_rest::{Resources, wait_at_rest};
use tether_e2e::http::{HttpTarget, request_through};
use tether_e2e::tether_testkit::{TestPki, echo_server};
use tether_e2e::{ForwardSpec, TestAgent, TestServer};
use tether_testkit::eventually;
use tether_testkit::metrics::metric_or_zero;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

/// The heap numbers mean something only if everything in this process allocates through jemalloc.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Requests per round, half sequential and half with [`IN_FLIGHT`] at once.
const REQUESTS: usize = 10_000;
const IN_FLIGHT: usize = 200;
const LONG_LIVED: usize = 1_000;
/// Measured rounds after the warm-up round.
const ROUNDS: usize = 3;
/// Growth per round that, if every round shows it, counts as a trend.
const TREND_STEP: u64 = 256 << 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_requests_and_a_thousand_streams_leave_nothing_behind() {
    let pki = TestPki::new();
    let http = HttpTarget::start().await.unwrap();
    let (echo, _echo) = echo_server().await;
    let server = TestServer::start(
        &pki,
        &[
            ForwardSpec::new("edge-1", http.addr),
            ForwardSpec::new("edge-1", echo),
        ],
        "",
    )
    .await;
    let policy = format!(
        "  allow:\n    - {{ cidrs: [\"127.0.0.1/32\"], ports: [\"{}\", \"{}\"] }}\n",
        http.addr.port(),
        echo.port()
    );
    let mut agent =
        TestAgent::start(&pki, &pki.agent("edge-1"), server.tunnel_addr, &policy, "").await;
    agent.wait_connected().await;
    server.wait_agents(1).await;
    let (http_forward, echo_forward) = (server.forward_addrs[0], server.forward_addrs[1]);
    let daemons = [("server", &server.registry), ("agent", &agent.registry)];

    // Warm-up: buffers, tables and allocator caches reach their working size.
    let start = Resources::now();
    round(http_forward, echo_forward, &server).await;
    let baseline = wait_at_rest("warm-up round", &daemons, start).await;

    let mut heap = Vec::new();
    for i in 1..=ROUNDS {
        round(http_forward, echo_forward, &server).await;
        let rest = wait_at_rest(&format!("round {i}"), &daemons, baseline).await;
        eprintln!("round {i}: {rest:?} (baseline {baseline:?})");
        heap.push(rest.heap_allocated);
    }
    let opened = metric_or_zero(&server.registry, "tether_streams_opened_total", &[]);
    let expected = ((ROUNDS + 1) * (REQUESTS + LONG_LIVED)) as f64;
    assert!(opened >= expected, "server opened {opened} < {expected}");
    let growing = heap
        .windows(2)
        .all(|w| w[1] > w[0].saturating_add(TREND_STEP));
    assert!(!growing, "heap grows every round: {heap:?}");

    agent.stop().await.unwrap();
    server.stop().await.unwrap();
    http.stop().await;
}

/// One round: sequential requests, concurrent requests, then long-lived streams.
async fn round(http_forward: SocketAddr, echo_forward: SocketAddr, server: &TestServer) {
    for _ in 0..REQUESTS / 2 {
        request_through(http_forward).await.unwrap();
    }
    let mut workers = JoinSet::new();
    let per_worker = REQUESTS / 2 / IN_FLIGHT;
    for _ in 0..IN_FLIGHT {
        workers.spawn(async move {
            for _ in 0..per_worker {
                request_through(http_forward).await?;
            }
            Ok::<_, std::io::Error>(())
        });
    }
    while let Some(done) = workers.join_next().await {
        done.unwrap().unwrap();
    }
    long_lived_streams(echo_forward, server).await;
}

/// Opens [`LONG_LIVED`] streams, proves each one carries bytes, holds them all open at once,
/// then closes them.
async fn long_lived_streams(echo_forward: SocketAddr, server: &TestServer) {
    let mut streams = Vec::with_capacity(LONG_LIVED);
    let batch = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    let mut opening = JoinSet::new();
    for i in 0..LONG_LIVED {
        let batch = batch.clone();
        opening.spawn(async move {
            let _permit = batch.acquire_owned().await.unwrap();
            let mut stream = TcpStream::connect(echo_forward).await.unwrap();
            let byte = [i as u8];
            stream.write_all(&byte).await.unwrap();
            let mut back = [0u8; 1];
            stream.read_exact(&mut back).await.unwrap();
            assert_eq!(back, byte);
            stream
        });
    }
    while let Some(stream) = opening.join_next().await {
        streams.push(stream.unwrap());
    }
    eventually("all long-lived streams open at once", || {
        metric_or_zero(&server.registry, "tether_streams_active", &[]) >= LONG_LIVED as f64
    })
    .await;
    // For docs/BENCHMARKS.md (visible with --nocapture): what 1,000 open streams cost.
    eprintln!("{LONG_LIVED} streams open: {:?}", Resources::now());
    drop(streams);
}
