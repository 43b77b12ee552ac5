//! Leak check of the real `tether server` binary through its own `/metrics`, as an operator
//! would see it: after rounds of short requests and long-lived streams, the scraped stream
//! counters balance and `tether_runtime_alive_tasks`, `process_open_fds` and
//! `tether_heap_allocated_bytes` are back at their baseline.

#![allow(clippy::unwrap_used)] // test helpers panic on failure by design

use std::net::SocketAddr;
use std::time::Duration;

use tether_e2e::at_rest::{HEAP_SLACK, SETTLE, TASK_SLACK, stream_imbalance};
use tether_e2e::http::{HttpTarget, get, request_through};
use tether_e2e::process::ServerProcess;
use tether_e2e::tether_testkit::{TestPki, echo_server};
use tether_e2e::{TestAgent, wait_forward_echo};
use tether_testkit::metrics::{family_sum, sample};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

const REQUESTS: usize = 2_000;
const IN_FLIGHT: usize = 100;
const LONG_LIVED: usize = 200;
const ROUNDS: usize = 3;

/// What the binary reports about itself at one scrape.
#[derive(Debug, Clone, Copy)]
struct Scraped {
    opened: f64,
    closed: f64,
    active: f64,
    tasks: f64,
    fds: f64,
    heap: f64,
}

async fn scrape(admin: SocketAddr) -> Scraped {
    let response = get(admin, "/metrics").await.unwrap();
    assert_eq!(response.status, 200);
    let text = response.body;
    let value = |series: &str| {
        sample(&text, series).unwrap_or_else(|| panic!("{series} missing from /metrics"))
    };
    Scraped {
        opened: value("tether_streams_opened_total"),
        closed: family_sum(&text, "tether_streams_closed_total"),
        active: value("tether_streams_active"),
        tasks: value("tether_runtime_alive_tasks"),
        fds: value("process_open_fds"),
        heap: value("tether_heap_allocated_bytes"),
    }
}

/// Polls the binary's `/metrics` until it is back at `baseline` (same thresholds as the
/// in-process leak tests); the agent's counters must balance too.
async fn wait_at_rest(
    what: &str,
    admin: SocketAddr,
    agent: &prometheus::Registry,
    baseline: Scraped,
) -> Scraped {
    let deadline = tokio::time::Instant::now() + SETTLE;
    loop {
        let now = scrape(admin).await;
        let mut unmet = Vec::new();
        if now.opened != now.closed || now.active != 0.0 {
            unmet.push(format!(
                "server: opened {}, closed {}, active {}",
                now.opened, now.closed, now.active
            ));
        }
        unmet.extend(stream_imbalance("agent", agent));
        if (now.tasks - baseline.tasks).abs() > TASK_SLACK as f64 {
            unmet.push(format!("tasks {} vs {}", now.tasks, baseline.tasks));
        }
        if now.fds > baseline.fds {
            unmet.push(format!("fds {} vs {}", now.fds, baseline.fds));
        }
        if now.heap > baseline.heap + HEAP_SLACK as f64 {
            unmet.push(format!("heap {} vs {}", now.heap, baseline.heap));
        }
        if unmet.is_empty() {
            return now;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: the server binary is not back at rest: {}",
            unmet.join("; ")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_binary_returns_to_rest_after_load() {
    let pki = TestPki::new();
    let http = HttpTarget::start().await.unwrap();
    let (echo, _echo) = echo_server().await;
    let config = pki.write_file(
        "server.yaml",
        &format!(
            "version: 1\n\
             listen: \"127.0.0.1:0\"\n\
             admin_listen: \"127.0.0.1:0\"\n\
             tls: {{ cert: \"{}\", key: \"{}\", client_ca: \"{}\" }}\n\
             forwards:\n\
             \x20 - {{ name: http, listen: \"127.0.0.1:0\", client: edge-1, target: \"{}\" }}\n\
             \x20 - {{ name: echo, listen: \"127.0.0.1:0\", client: edge-1, target: \"{echo}\" }}\n",
            pki.server_cert_path().display(),
            pki.server_key_path().display(),
            pki.ca_path().display(),
            http.addr,
        ),
    );
    let server = ServerProcess::start(&config, 2).await;
    let policy = format!(
        "  allow:\n    - {{ cidrs: [\"127.0.0.1/32\"], ports: [\"{}\", \"{}\"] }}\n",
        http.addr.port(),
        echo.port()
    );
    let mut agent =
        TestAgent::start(&pki, &pki.agent("edge-1"), server.tunnel_addr, &policy, "").await;
    agent.wait_connected().await;
    let (http_fwd, echo_fwd) = (server.forward_addrs[0], server.forward_addrs[1]);
    wait_forward_echo(echo_fwd).await;

    let start = scrape(server.admin_addr).await;
    round(http_fwd, echo_fwd).await;
    let baseline = wait_at_rest("warm-up", server.admin_addr, &agent.registry, start).await;
    let mut heap = Vec::new();
    for i in 1..=ROUNDS {
        round(http_fwd, echo_fwd).await;
        let rest = wait_at_rest(
            &format!("round {i}"),
            server.admin_addr,
            &agent.registry,
            baseline,
        )
        .await;
        eprintln!("round {i}: {rest:?} (baseline {baseline:?})");
        assert_eq!(
            rest.opened,
            baseline.opened + (i * (REQUESTS + LONG_LIVED)) as f64,
            "every request and stream of round {i} is counted"
        );
        heap.push(rest.heap);
    }
    assert!(
        no_growth_trend(&heap, baseline),
        "heap grows every round: {heap:?} from {}",
        baseline.heap
    );
    agent.stop().await.unwrap();
    server.kill().await;
    http.stop().await;
}

/// True unless every round's heap exceeds the previous one by more than 256 KiB.
fn no_growth_trend(heap: &[f64], baseline: Scraped) -> bool {
    let mut previous = baseline.heap;
    let mut growing = true;
    for &h in heap {
        growing &= h > previous + 262_144.0;
        previous = h;
    }
    !growing
}

async fn round(http_fwd: SocketAddr, echo_fwd: SocketAddr) {
    for _ in 0..REQUESTS / 2 {
        request_through(http_fwd).await.unwrap();
    }
    let mut workers = JoinSet::new();
    for _ in 0..IN_FLIGHT {
        workers.spawn(async move {
            for _ in 0..REQUESTS / 2 / IN_FLIGHT {
                request_through(http_fwd).await?;
            }
            Ok::<_, std::io::Error>(())
        });
    }
    while let Some(done) = workers.join_next().await {
        done.unwrap().unwrap();
    }
    let mut streams = Vec::with_capacity(LONG_LIVED);
    for i in 0..LONG_LIVED {
        let mut stream = TcpStream::connect(echo_fwd).await.unwrap();
        stream.write_all(&[i as u8]).await.unwrap();
        let mut back = [0u8; 1];
        stream.read_exact(&mut back).await.unwrap();
        assert_eq!(back[0], i as u8);
        streams.push(stream);
    }
    drop(streams);
}
