//! Leak-freedom on the failure paths: consumers that vanish mid-stream, targets that refuse, an
//! agent killed mid-transfer. After each, the stream counters of both sides balance and tasks,
//! heap and fds are back at baseline.

#![allow(clippy::unwrap_used)] // test helpers panic on failure by design

use std::net::SocketAddr;

use tether_e2e::at_rest::{Resources, wait_at_rest};
use tether_e2e::http::{HttpTarget, request_through};
use tether_e2e::tether_testkit::{TestPki, echo_server};
use tether_e2e::{ForwardSpec, TestAgent, TestServer, consumer_gets_error};
use tether_testkit::eventually;
use tether_testkit::metrics::{metric_or_zero, metric_sum};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// The heap numbers mean something only if everything in this process allocates through jemalloc.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const CONSUMERS: usize = 200;
const REFUSED: usize = 300;
const MID_TRANSFER: usize = 50;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_paths_leave_nothing_behind() {
    let pki = TestPki::new();
    let http = HttpTarget::start().await.unwrap();
    let (echo, _echo) = echo_server().await;
    let closed_port = {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap()
    };
    let server = TestServer::start(
        &pki,
        &[
            ForwardSpec::new("edge-1", http.addr),
            ForwardSpec::new("edge-1", echo),
            ForwardSpec::new("edge-1", closed_port),
        ],
        "",
    )
    .await;
    let policy = format!(
        "  allow:\n    - {{ cidrs: [\"127.0.0.1/32\"], ports: [\"{}\", \"{}\", \"{}\"] }}\n",
        http.addr.port(),
        echo.port(),
        closed_port.port()
    );
    let start_agent = || async {
        let mut agent =
            TestAgent::start(&pki, &pki.agent("edge-1"), server.tunnel_addr, &policy, "").await;
        agent.wait_connected().await;
        server.wait_agents(1).await;
        agent
    };
    let agent = start_agent().await;
    let [http_fwd, echo_fwd, refused_fwd] = server.forward_addrs[..] else {
        panic!("three forwards");
    };

    // Warm-up with every path once, then the baseline.
    let start = Resources::now();
    for _ in 0..200 {
        request_through(http_fwd).await.unwrap();
    }
    vanishing_consumers(echo_fwd, http_fwd).await;
    assert!(consumer_gets_error(refused_fwd).await);
    let baseline = wait_at_rest(
        "warm-up",
        &[("server", &server.registry), ("agent", &agent.registry)],
        start,
    )
    .await;

    // 1. Consumers that disconnect mid-stream (reset, close with data in flight, half a request).
    for _ in 0..3 {
        vanishing_consumers(echo_fwd, http_fwd).await;
    }
    wait_at_rest(
        "consumers that disconnect mid-stream",
        &[("server", &server.registry), ("agent", &agent.registry)],
        baseline,
    )
    .await;

    // 2. A target that refuses: every consumer gets an error, every dial is counted.
    let refused_before = metric_or_zero(
        &agent.registry,
        "tether_agent_dials_total",
        &[("outcome", "refused")],
    );
    let mut consumers = JoinSet::new();
    for _ in 0..REFUSED {
        consumers.spawn(consumer_gets_error(refused_fwd));
    }
    while let Some(got_error) = consumers.join_next().await {
        assert!(
            got_error.unwrap(),
            "a refused dial must reach the consumer as an error"
        );
    }
    let refused = metric_or_zero(
        &agent.registry,
        "tether_agent_dials_total",
        &[("outcome", "refused")],
    ) - refused_before;
    assert_eq!(refused, REFUSED as f64);
    wait_at_rest(
        "targets that refuse",
        &[("server", &server.registry), ("agent", &agent.registry)],
        baseline,
    )
    .await;

    // 3. The agent is killed while streams carry data: consumers get errors, the server drops
    //    the session and its streams, the dead agent's own tasks and sockets are released.
    let closed_before = metric_sum(&server.registry, "tether_streams_closed_total", &[]);
    let mut transfers = JoinSet::new();
    let (started_tx, mut started) = tokio::sync::mpsc::channel(MID_TRANSFER);
    for _ in 0..MID_TRANSFER {
        let started_tx = started_tx.clone();
        transfers.spawn(async move {
            let stream = TcpStream::connect(echo_fwd).await.unwrap();
            let (mut read, mut write) = stream.into_split();
            let writer = async move {
                let chunk = vec![7u8; 16 << 10];
                while write.write_all(&chunk).await.is_ok() {}
            };
            let reader = async move {
                let mut buf = vec![0u8; 64 << 10];
                let mut announced = false;
                loop {
                    match read.read(&mut buf).await {
                        Ok(0) => return false,
                        Ok(_) if !announced => {
                            announced = true;
                            let _ = started_tx.send(()).await;
                        }
                        Ok(_) => {}
                        Err(_) => return true,
                    }
                }
            };
            tokio::select! {
                got_error = reader => got_error,
                () = writer => true,
            }
        });
    }
    drop(started_tx);
    for _ in 0..MID_TRANSFER {
        started.recv().await.unwrap();
    }
    let dead_registry = agent.registry.clone();
    agent.kill().await;
    while let Some(got_error) = transfers.join_next().await {
        assert!(
            got_error.unwrap(),
            "a transfer cut by a dead agent must end in an error"
        );
    }
    server.wait_agents(0).await;
    // Closed as `session_lost`, or as `reset` when the dying agent's RST got out first.
    eventually("the server closes the cut streams", || {
        metric_sum(&server.registry, "tether_streams_closed_total", &[])
            >= closed_before + MID_TRANSFER as f64
    })
    .await;
    let agent = start_agent().await;
    for _ in 0..10 {
        request_through(http_fwd).await.unwrap();
    }
    wait_at_rest(
        "an agent killed mid-transfer",
        &[
            ("server", &server.registry),
            ("killed agent", &dead_registry),
            ("new agent", &agent.registry),
        ],
        baseline,
    )
    .await;

    agent.stop().await.unwrap();
    server.stop().await.unwrap();
    http.stop().await;
}

/// Consumers that give up: [`CONSUMERS`] that reset while writing, as many that close with
/// unread echo in flight, and as many that send half an HTTP request and leave.
async fn vanishing_consumers(echo_fwd: SocketAddr, http_fwd: SocketAddr) {
    let mut consumers = JoinSet::new();
    for i in 0..CONSUMERS * 3 {
        consumers.spawn(async move {
            match i % 3 {
                0 => {
                    let mut stream = TcpStream::connect(echo_fwd).await.unwrap();
                    let _ = stream.write_all(&[1u8; 64 << 10]).await;
                    let _ = stream.set_zero_linger();
                }
                1 => {
                    let mut stream = TcpStream::connect(echo_fwd).await.unwrap();
                    let _ = stream.write_all(b"x").await;
                    let mut byte = [0u8; 1];
                    let _ = stream.read_exact(&mut byte).await;
                    let _ = stream.write_all(&[2u8; 32 << 10]).await;
                }
                _ => {
                    let mut stream = TcpStream::connect(http_fwd).await.unwrap();
                    let _ = stream.write_all(b"GET / HT").await;
                }
            }
        });
    }
    while let Some(done) = consumers.join_next().await {
        done.unwrap();
    }
}
