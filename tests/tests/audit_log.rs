//! The audit log end to end: one JSON line per tunnelled connection through a forward, the
//! HTTP CONNECT proxy and the SOCKS5 proxy, with the consumer, client, session, targets, exact
//! byte counts and close reason; a refused dial is a line too; no token ever appears; and
//! reopening the file (what SIGHUP does after logrotate moved it) under load loses no line.

#![allow(clippy::unwrap_used)] // test helpers panic on failure by design

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::Value;
use tether_e2e::proxy::{FLEET_TOKEN, OPS_SHA256, OPS_TOKEN, base64_encode, frontends_yaml};
use tether_e2e::tether_testkit::{TestPki, echo_server};
use tether_e2e::{ForwardSpec, TestAgent, TestServer, WAIT};
use tether_testkit::eventually;
use tether_testkit::metrics::metric_or_zero;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// The audit section writing to `path`.
fn audit_yaml(path: &Path, queue: usize) -> String {
    format!(
        "audit_log: {{ output: file, path: \"{}\", queue: {queue} }}\n",
        path.display()
    )
}

/// The lines of the audit files, parsed.
fn lines(paths: &[PathBuf]) -> Vec<Value> {
    paths
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .flat_map(|text| {
            text.lines()
                .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
                .collect::<Vec<_>>()
        })
        .collect()
}

async fn wait_lines(paths: &[PathBuf], n: usize) -> Vec<Value> {
    eventually(&format!("{n} audit lines"), || lines(paths).len() >= n).await;
    let found = lines(paths);
    assert_eq!(found.len(), n, "{found:#?}");
    found
}

/// Sends `len` bytes on an open tunnelled connection, half-closes, reads the echo to its end;
/// returns the bytes read back.
async fn echo_through(mut tcp: TcpStream, len: usize) -> usize {
    let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    let run = async {
        let (mut rd, mut wr) = tcp.split();
        let write = async {
            wr.write_all(&payload).await.unwrap();
            wr.shutdown().await.unwrap();
        };
        let mut back = Vec::new();
        let read = rd.read_to_end(&mut back);
        let (_, read) = tokio::join!(write, read);
        read.unwrap();
        assert_eq!(back, payload);
        back.len()
    };
    tokio::time::timeout(WAIT, run).await.unwrap()
}

/// `CONNECT target` with Basic credentials; the returned stream is past the 200 answer.
async fn http_connect(proxy: SocketAddr, target: &str, user: &str, token: &str) -> TcpStream {
    let mut tcp = TcpStream::connect(proxy).await.unwrap();
    let auth = base64_encode(format!("{user}:{token}").as_bytes());
    let head = format!(
        "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nProxy-Authorization: Basic {auth}\r\n\r\n"
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let mut byte = [0u8; 1];
    while !answer.ends_with(b"\r\n\r\n") {
        tcp.read_exact(&mut byte).await.unwrap();
        answer.push(byte[0]);
    }
    let answer = String::from_utf8(answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    tcp
}

/// A SOCKS5 CONNECT to `host:port` as a domain name; the stream is past the success reply.
async fn socks5_connect(
    proxy: SocketAddr,
    host: &str,
    port: u16,
    user: &str,
    token: &str,
) -> TcpStream {
    let mut tcp = TcpStream::connect(proxy).await.unwrap();
    tcp.write_all(&[5, 1, 2]).await.unwrap();
    let mut choice = [0u8; 2];
    tcp.read_exact(&mut choice).await.unwrap();
    assert_eq!(choice, [5, 2]);
    let mut auth = vec![1, user.len() as u8];
    auth.extend_from_slice(user.as_bytes());
    auth.push(token.len() as u8);
    auth.extend_from_slice(token.as_bytes());
    tcp.write_all(&auth).await.unwrap();
    let mut status = [0u8; 2];
    tcp.read_exact(&mut status).await.unwrap();
    assert_eq!(status, [1, 0]);
    let mut req = vec![5, 1, 0, 3, host.len() as u8];
    req.extend_from_slice(host.as_bytes());
    req.extend_from_slice(&port.to_be_bytes());
    tcp.write_all(&req).await.unwrap();
    let mut reply = [0u8; 10];
    tcp.read_exact(&mut reply).await.unwrap();
    assert_eq!(reply[..2], [5, 0]);
    tcp
}

fn find<'a>(lines: &'a [Value], via: &str) -> &'a Value {
    lines
        .iter()
        .find(|l| l["via"] == via && l["close"] == "closed")
        .unwrap_or_else(|| panic!("no closed {via} line: {lines:#?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_line_per_connection_through_forwards_connect_and_socks5() {
    let pki = TestPki::new();
    let (echo, _echo) = echo_server().await;
    let closed = {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap()
    };
    let path = pki.dir().join("audit.jsonl");
    let server = TestServer::start(
        &pki,
        &[
            ForwardSpec::new("edge-1", echo),
            ForwardSpec::new("edge-1", closed),
        ],
        &format!("{}{}", frontends_yaml("[]"), audit_yaml(&path, 64)),
    )
    .await;
    let policy = format!(
        "  allow:\n    - {{ cidrs: [\"127.0.0.1/32\"], ports: [\"{}\", \"{}\"] }}\n",
        echo.port(),
        closed.port()
    );
    let mut agent =
        TestAgent::start(&pki, &pki.agent("edge-1"), server.tunnel_addr, &policy, "").await;
    agent.wait_connected().await;
    server.wait_agents(1).await;
    let paths = [path.clone()];
    let clients = server.clients().await.clients;
    assert_eq!(clients.len(), 1);
    let session = clients[0].sessions[0].session_id;

    // A forward: 100,000 bytes each way.
    let tcp = TcpStream::connect(server.forward_addrs[0]).await.unwrap();
    let forward_consumer = tcp.local_addr().unwrap();
    assert_eq!(echo_through(tcp, 100_000).await, 100_000);

    // HTTP CONNECT as `ops`, 200,000 bytes each way.
    let proxy = server.http_connect_addr.unwrap();
    let tcp = http_connect(proxy, &echo.to_string(), "edge-1", OPS_TOKEN).await;
    let connect_consumer = tcp.local_addr().unwrap();
    assert_eq!(echo_through(tcp, 200_000).await, 200_000);

    // SOCKS5 as `fleet` with a domain name the agent resolves, 300,000 bytes each way.
    let socks = server.socks5_addr.unwrap();
    let tcp = socks5_connect(socks, "localhost", echo.port(), "edge-1", FLEET_TOKEN).await;
    let socks_consumer = tcp.local_addr().unwrap();
    assert_eq!(echo_through(tcp, 300_000).await, 300_000);

    // A forward whose target refuses: a line with the dial's error code.
    assert!(tether_e2e::consumer_gets_error(server.forward_addrs[1]).await);

    let all = wait_lines(&paths, 4).await;
    let forward = all
        .iter()
        .find(|l| l["consumer_addr"] == forward_consumer.to_string())
        .unwrap();
    let connect = find(&all, "http_connect");
    let socks5 = find(&all, "socks5");
    for (line, via, consumer, addr, requested, bytes) in [
        (
            forward,
            "forward",
            Value::Null,
            forward_consumer,
            echo.to_string(),
            100_000,
        ),
        (
            connect,
            "http_connect",
            "ops".into(),
            connect_consumer,
            echo.to_string(),
            200_000,
        ),
        (
            socks5,
            "socks5",
            "fleet".into(),
            socks_consumer,
            format!("localhost:{}", echo.port()),
            300_000,
        ),
    ] {
        assert_eq!(line["event"], "tunnel_closed", "{line}");
        assert_eq!(line["via"], via, "{line}");
        assert_eq!(line["consumer"], consumer, "{line}");
        assert_eq!(line["consumer_addr"], addr.to_string(), "{line}");
        assert_eq!(line["client"], "edge-1", "{line}");
        assert_eq!(line["session"], session, "{line}");
        assert!(line["stream"].as_u64().is_some(), "{line}");
        assert_eq!(line["target_requested"], requested, "{line}");
        assert_eq!(line["target_dialed"], requested, "{line}");
        assert_eq!(line["bytes_from_consumer"], bytes, "{line}");
        assert_eq!(line["bytes_to_consumer"], bytes, "{line}");
        assert_eq!(line["close"], "closed", "{line}");
        let duration = line["duration_seconds"].as_f64().unwrap();
        assert!(duration > 0.0 && duration < WAIT.as_secs_f64(), "{line}");
        for key in ["ts", "start"] {
            let ts = line[key].as_str().unwrap();
            assert!(ts.len() == 24 && ts.ends_with('Z'), "{key}: {line}");
        }
    }
    assert_eq!(forward["forward"], "f0");
    let refused = all.iter().find(|l| l["close"] == "dial_failed").unwrap();
    assert_eq!(refused["forward"], "f1");
    assert_eq!(refused["dial_error"], "refused");
    assert_eq!(refused["bytes_from_consumer"], 0);
    assert_eq!(refused["target_requested"], closed.to_string());

    // Never a token, its hash or the Basic credentials.
    let text = std::fs::read_to_string(&path).unwrap();
    for secret in [
        OPS_TOKEN.to_owned(),
        FLEET_TOKEN.to_owned(),
        OPS_SHA256.to_owned(),
        base64_encode(format!("edge-1:{OPS_TOKEN}").as_bytes()),
    ] {
        assert!(
            !text.contains(&secret),
            "{secret} in the audit log:\n{text}"
        );
    }
    assert_eq!(
        metric_or_zero(
            &server.registry,
            "tether_audit_lines_total",
            &[("result", "written")]
        ),
        4.0
    );
    agent.stop().await.unwrap();
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reopening_under_load_loses_no_line() {
    const WORKERS: usize = 8;
    const PER_WORKER: usize = 150;
    const ROTATIONS: usize = 3;
    let pki = TestPki::new();
    let (echo, _echo) = echo_server().await;
    let path = pki.dir().join("audit.jsonl");
    let server = TestServer::start(
        &pki,
        &[ForwardSpec::new("edge-1", echo)],
        &audit_yaml(&path, 65_536),
    )
    .await;
    let mut agent = TestAgent::start(
        &pki,
        &pki.agent("edge-1"),
        server.tunnel_addr,
        &tether_e2e::allow_only(echo),
        "",
    )
    .await;
    agent.wait_connected().await;
    server.wait_agents(1).await;

    let done = Arc::new(AtomicUsize::new(0));
    let mut workers = JoinSet::new();
    for _ in 0..WORKERS {
        let forward = server.forward_addrs[0];
        let done = done.clone();
        workers.spawn(async move {
            for _ in 0..PER_WORKER {
                let tcp = TcpStream::connect(forward).await.unwrap();
                echo_through(tcp, 64).await;
                done.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    // Rotate as logrotate does (rename, then the reload that SIGHUP triggers) while the
    // connections run.
    let mut paths = vec![path.clone()];
    for rotation in 1..=ROTATIONS {
        let at = rotation * WORKERS * PER_WORKER / (ROTATIONS + 1);
        eventually("load in progress", || done.load(Ordering::Relaxed) >= at).await;
        let rotated = pki.dir().join(format!("audit.jsonl.{rotation}"));
        std::fs::rename(&path, &rotated).unwrap();
        paths.push(rotated);
        let config = server.reloader.current();
        server.reloader.reload(config).await.unwrap();
    }
    while let Some(result) = workers.join_next().await {
        result.unwrap();
    }
    let total = WORKERS * PER_WORKER;
    let all = wait_lines(&paths, total).await;
    assert!(all.iter().all(|l| l["close"] == "closed"));
    for p in &paths {
        let n = std::fs::read_to_string(p).map_or(0, |t| t.lines().count());
        assert!(
            n > 0,
            "{} got no line: the rotation did not happen under load",
            p.display()
        );
    }
    for result in ["dropped", "write_failed"] {
        assert_eq!(
            metric_or_zero(
                &server.registry,
                "tether_audit_lines_total",
                &[("result", result)]
            ),
            0.0,
            "{result}"
        );
    }
    agent.stop().await.unwrap();
    server.stop().await.unwrap();
}
