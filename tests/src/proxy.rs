//! Helpers of the consumer-frontend tests: an HTTP server on an address only the agent's side
//! dials, `curl` run as a child process, a target whose connects hang, and frontend YAML.

use std::net::SocketAddr;
use std::process::Output;
use std::time::Duration;

use tether_testkit::eventually;
use tether_testkit::metrics::metric_or_zero;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinSet;

use crate::{TestServer, WAIT};

/// Token of consumer `ops` (may reach `edge-1`).
pub const OPS_TOKEN: &str = "ops-token";
/// SHA-256 of [`OPS_TOKEN`] (`printf %s ops-token | sha256sum`).
pub const OPS_SHA256: &str = "d9310c002af91822beb0b3487d8b04f85bf6bf1f8a5496bff7d35fc7c5a29def";
/// Token of consumer `fleet` (may reach `edge-*`).
pub const FLEET_TOKEN: &str = "fleet-token";
/// SHA-256 of [`FLEET_TOKEN`].
pub const FLEET_SHA256: &str = "233a1f78caac55c3cde9d5b2e2b5b001b018c84de79ef9a1819e46678e275749";
/// A token no consumer has until a reload adds it.
pub const ROTATED_TOKEN: &str = "rotated-token";
/// SHA-256 of [`ROTATED_TOKEN`].
pub const ROTATED_SHA256: &str = "950141f5143d92b8f45b56cf546a3bef20e359c018127d87e656bd2ba2d1d842";

/// The `frontends:` section of the tests: both proxies on `127.0.0.1:0`, a short handshake
/// timeout, consumers `ops` (`edge-1`) and `fleet` (`edge-*`), and `anonymous_clients`.
pub fn frontends_yaml(anonymous_clients: &str) -> String {
    format!(
        "frontends:\n  http_connect_listen: \"127.0.0.1:0\"\n  socks5_listen: \"127.0.0.1:0\"\n  \
         handshake_timeout: 500ms\n  consumers:\n    \
         - {{ name: ops, token_sha256: \"{OPS_SHA256}\", clients: [edge-1] }}\n    \
         - {{ name: fleet, token_sha256: \"{FLEET_SHA256}\", clients: [\"edge-*\"] }}\n  \
         anonymous_clients: {anonymous_clients}\n"
    )
}

/// An HTTP/1.1 server answering every request with the same body, then closing.
pub struct BodyServer {
    /// Where it listens.
    pub addr: SocketAddr,
    /// What it answers.
    pub body: Vec<u8>,
    _tasks: JoinSet<()>,
}

impl BodyServer {
    /// Serves `len` deterministic bytes on `ip:0` (e.g. `127.0.0.2`, which only the agent's
    /// policy allows and which the frontends never dial themselves).
    pub async fn start(ip: &str, len: usize) -> Self {
        let listener = TcpListener::bind((ip, 0)).await.expect("bind body server");
        Self::serve(listener, len)
    }

    /// Serves on a bound listener.
    pub fn serve(listener: TcpListener, len: usize) -> Self {
        let addr = listener.local_addr().expect("addr");
        let body: Vec<u8> = (0..len).map(|i| (i * 7 + i / 251) as u8).collect();
        let mut tasks = JoinSet::new();
        let shared = std::sync::Arc::new(body.clone());
        tasks.spawn(async move {
            let mut conns = JoinSet::new();
            while let Ok((tcp, _)) = listener.accept().await {
                conns.spawn(answer(tcp, shared.clone()));
                while conns.try_join_next().is_some() {}
            }
        });
        Self {
            addr,
            body,
            _tasks: tasks,
        }
    }
}

async fn answer(mut tcp: TcpStream, body: std::sync::Arc<Vec<u8>>) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 16 * 1024 {
        match tcp.read(&mut byte).await {
            Ok(1) => head.push(byte[0]),
            _ => return,
        }
    }
    let header = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    );
    if tcp.write_all(header.as_bytes()).await.is_ok() && tcp.write_all(&body).await.is_ok() {
        let _ = tcp.shutdown().await;
    }
}

/// Runs `curl` with `args` (bounded by [`WAIT`]); stdout is the body.
pub async fn curl(args: &[&str]) -> Output {
    let mut command = tokio::process::Command::new("curl");
    command
        .args(["--silent", "--show-error", "--max-time", "20"])
        .args(args)
        .kill_on_drop(true);
    tokio::time::timeout(WAIT + Duration::from_secs(10), command.output())
        .await
        .expect("curl finishes in time")
        .expect("curl runs (is it installed?)")
}

/// A target on loopback whose connects hang: a listener with a full accept queue, so that the
/// kernel drops further SYNs. Keep it alive as long as connects must hang.
pub struct HangingTarget {
    /// Where connects hang.
    pub addr: SocketAddr,
    _listener: TcpListener,
    _fillers: Vec<TcpStream>,
}

impl HangingTarget {
    /// Binds with a backlog of 0 and fills the queue.
    pub async fn start() -> Self {
        let socket = TcpSocket::new_v4().expect("socket");
        socket
            .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .expect("bind");
        let listener = socket.listen(0).expect("listen");
        let addr = listener.local_addr().expect("addr");
        let mut fillers = Vec::new();
        for _ in 0..8 {
            match tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(addr)).await {
                Ok(Ok(stream)) => fillers.push(stream),
                // The queue is full: this connect hangs, which is the point.
                _ => break,
            }
        }
        assert!(
            fillers.len() < 8,
            "connects to a listener with a full accept queue do not hang on this kernel"
        );
        Self {
            addr,
            _listener: listener,
            _fillers: fillers,
        }
    }
}

/// Waits until the server's streams have all closed (`opened == sum(closed)`, none active)
/// and the frontends hold no consumer connection.
pub async fn streams_balance(server: &TestServer) {
    eventually("server streams opened == closed", || {
        let opened = metric_or_zero(&server.registry, "tether_streams_opened_total", &[]);
        let closed = tether_testkit::metrics::metric_sum(
            &server.registry,
            "tether_streams_closed_total",
            &[],
        );
        let active = metric_or_zero(&server.registry, "tether_streams_active", &[]);
        opened == closed && active == 0.0
    })
    .await;
    eventually("no consumer connection held by the frontends", || {
        tether_testkit::metrics::metric_sum(
            &server.registry,
            "tether_frontend_connections_active",
            &[],
        ) == 0.0
    })
    .await;
}

/// `tether_frontend_refusals_total{frontend, reason}`.
pub fn refusals(server: &TestServer, frontend: &str, reason: &str) -> f64 {
    metric_or_zero(
        &server.registry,
        "tether_frontend_refusals_total",
        &[("frontend", frontend), ("reason", reason)],
    )
}

/// `tether_agent_dials_total{outcome="ok"}` of an agent.
pub fn agent_dials_ok(agent: &crate::TestAgent) -> f64 {
    metric_or_zero(
        &agent.registry,
        "tether_agent_dials_total",
        &[("outcome", "ok")],
    )
}

/// Standard base64 with padding (for `Proxy-Authorization: Basic`).
pub fn base64_encode(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
