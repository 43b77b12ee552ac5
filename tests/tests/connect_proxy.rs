//! The HTTP CONNECT frontend end to end: curl fetches a large body that only the agent's side
//! reaches, every failure has its status and body, a token for edge-1 cannot reach edge-2,
//! malformed and slow clients are cut off, nothing leaks, and consumers reload in place.

#![allow(clippy::unwrap_used)] // test helpers panic on failure by design

use std::net::SocketAddr;
use std::time::Duration;

use tether_e2e::proxy::{
    BodyServer, FLEET_TOKEN, HangingTarget, OPS_TOKEN, ROTATED_SHA256, ROTATED_TOKEN,
    agent_dials_ok, base64_encode, curl, frontends_yaml, refusals, streams_balance,
};
use tether_e2e::tether_testkit::TestPki;
use tether_e2e::{TestAgent, TestServer, WAIT, allow_only};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Sends `request` to the proxy and reads the whole answer: (status, body).
async fn exchange(proxy: SocketAddr, request: &[u8]) -> (u16, String) {
    let run = async {
        let mut tcp = TcpStream::connect(proxy).await.unwrap();
        tcp.write_all(request).await.unwrap();
        let mut raw = Vec::new();
        // The proxy closes after an error answer (a reset after the answer still counts); after
        // 200 the tunnel stays open, so the head is enough.
        let mut buf = [0u8; 4096];
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => raw.extend_from_slice(&buf[..n]),
            }
            if raw.starts_with(b"HTTP/1.1 200 ") && raw.windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
        raw
    };
    let raw = tokio::time::timeout(WAIT, run)
        .await
        .expect("proxy answers");
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {raw:?}"));
    (status, body.to_owned())
}

fn connect(target: impl std::fmt::Display, auth: Option<(&str, &str)>) -> Vec<u8> {
    let mut request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    if let Some((user, token)) = auth {
        let encoded = base64_encode(format!("{user}:{token}").as_bytes());
        request.push_str(&format!("Proxy-Authorization: Basic {encoded}\r\n"));
    }
    request.push_str("\r\n");
    request.into_bytes()
}

/// A server with both frontends and agents `edge-1` (and `edge-2`) allowing `policy`.
async fn setup(
    pki: &TestPki,
    policy: &str,
    with_edge2: bool,
    anonymous: &str,
) -> (TestServer, TestAgent, Option<TestAgent>) {
    let server = TestServer::start(pki, &[], &frontends_yaml(anonymous)).await;
    let mut edge1 =
        TestAgent::start(pki, &pki.agent("edge-1"), server.tunnel_addr, policy, "").await;
    edge1.wait_connected().await;
    let edge2 = if with_edge2 {
        let mut edge2 =
            TestAgent::start(pki, &pki.agent("edge-2"), server.tunnel_addr, policy, "").await;
        edge2.wait_connected().await;
        Some(edge2)
    } else {
        None
    };
    server.wait_agents(1 + usize::from(with_edge2)).await;
    (server, edge1, edge2)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_fetches_a_large_body_through_the_agent_byte_exact() {
    let pki = TestPki::new();
    // 127.0.0.2: the agent's policy allows it; the frontends only ever dial through a tunnel.
    let target = BodyServer::start("127.0.0.2", 16 * 1024 * 1024).await;
    let (server, agent, _) = setup(&pki, &allow_only(target.addr), false, "[]").await;
    let proxy = server.http_connect_addr.unwrap();

    let url = format!("http://{}/big", target.addr);
    let proxy_url = format!("http://edge-1:{OPS_TOKEN}@{proxy}");
    let started = tokio::time::Instant::now();
    let out = curl(&["--proxytunnel", "--proxy", &proxy_url, &url]).await;
    let took = started.elapsed();
    eprintln!(
        "HTTP CONNECT: {} bytes through curl, the proxy and the tunnel in {:.3}s ({:.0} MiB/s)",
        out.stdout.len(),
        took.as_secs_f64(),
        out.stdout.len() as f64 / 1048576.0 / took.as_secs_f64()
    );
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout.len(), target.body.len());
    assert!(out.stdout == target.body, "body differs");
    assert_eq!(
        agent_dials_ok(&agent),
        1.0,
        "the bytes went through the agent's dial"
    );

    // The client id in X-Tether-Client with the token as the Basic password, user left empty.
    let (status, _) = exchange(
        proxy,
        format!(
            "CONNECT {} HTTP/1.1\r\nX-Tether-Client: edge-1\r\nProxy-Authorization: Basic {}\r\n\r\n",
            target.addr,
            base64_encode(format!(":{OPS_TOKEN}").as_bytes())
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(status, 200);
    streams_balance(&server).await;
    assert_eq!(agent_dials_ok(&agent), 2.0);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_failure_has_its_status_and_reason() {
    let pki = TestPki::new();
    let target = BodyServer::start("127.0.0.2", 1024).await;
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let denied = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let denied_addr = denied.local_addr().unwrap();
    let hanging = HangingTarget::start().await;
    let policy = format!(
        "  allow:\n    - {{ cidrs: [\"127.0.0.2/32\"], ports: [\"{}\"] }}\n    \
         - {{ cidrs: [\"127.0.0.1/32\"], ports: [\"{}\", \"{}\"] }}\n",
        target.addr.port(),
        closed.port(),
        hanging.addr.port()
    );
    let (server, _edge1, _edge2) = setup(&pki, &policy, true, "[]").await;
    let proxy = server.http_connect_addr.unwrap();
    let t = target.addr;

    // 407: no credentials (curl sees it too), and a wrong token.
    let out = curl(&[
        "--proxytunnel",
        "--proxy",
        &format!("http://{proxy}"),
        &format!("http://{t}/"),
    ])
    .await;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("407"),
        "{out:?}"
    );
    let (status, body) = exchange(proxy, &connect(t, Some(("edge-1", "wrong")))).await;
    assert_eq!(status, 407, "{body}");
    assert!(body.contains("matches no consumer"), "{body}");
    let (status, _) = exchange(proxy, &connect(t, None)).await;
    assert_eq!(status, 407);

    // A token for edge-1 cannot reach edge-2 (403); a token for edge-* can.
    let (status, body) = exchange(proxy, &connect(t, Some(("edge-2", OPS_TOKEN)))).await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains("consumer \"ops\" may not reach client \"edge-2\""),
        "{body}"
    );
    let (status, _) = exchange(proxy, &connect(t, Some(("edge-2", FLEET_TOKEN)))).await;
    assert_eq!(status, 200);

    // 502: no agent for the client; the agent's OPEN_ERR for refused and denied targets.
    let (status, body) = exchange(proxy, &connect(t, Some(("edge-9", FLEET_TOKEN)))).await;
    assert_eq!(status, 502);
    assert!(
        body.contains("no agent connected for client \"edge-9\""),
        "{body}"
    );
    let (status, body) = exchange(proxy, &connect(closed, Some(("edge-1", OPS_TOKEN)))).await;
    assert_eq!(status, 502);
    assert!(body.contains("(refused)"), "{body}");
    let (status, body) = exchange(proxy, &connect(denied_addr, Some(("edge-1", OPS_TOKEN)))).await;
    assert_eq!(status, 502);
    assert!(body.contains("(denied)"), "{body}");
    assert_no_connection(&denied).await;
    // 504: the agent's dial times out (its dial_timeout is 2s).
    let (status, body) = exchange(proxy, &connect(hanging.addr, Some(("edge-1", OPS_TOKEN)))).await;
    assert_eq!(status, 504, "{body}");
    assert!(body.contains("timed_out"), "{body}");

    // Not CONNECT, garbage, oversized heads, a bad target.
    let (status, _) = exchange(
        proxy,
        format!("GET http://{t}/ HTTP/1.1\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(status, 405);
    let (status, _) = exchange(proxy, b"\x16\x03\x01\x02\x00garbage\r\n\r\n").await;
    assert_eq!(status, 400);
    let big = format!(
        "CONNECT {t} HTTP/1.1\r\nX-Pad: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let (status, _) = exchange(proxy, big.as_bytes()).await;
    assert_eq!(status, 431);
    let (status, _) = exchange(proxy, &connect("nohost", Some(("edge-1", OPS_TOKEN)))).await;
    assert_eq!(status, 400);

    for reason in [
        "missing_credentials",
        "bad_credentials",
        "forbidden",
        "no_session",
        "dial_failed",
        "unsupported",
        "malformed",
        "too_large",
        "bad_target",
    ] {
        assert!(
            refusals(&server, "http_connect", reason) >= 1.0,
            "{reason} not counted"
        );
    }
    streams_balance(&server).await;
    server.stop().await.unwrap();
}

async fn assert_no_connection(listener: &TcpListener) {
    let accepted = tokio::time::timeout(Duration::from_millis(100), listener.accept()).await;
    assert!(accepted.is_err(), "the denied target was dialed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_silent_clients_are_cut_off_without_leaks() {
    let pki = TestPki::new();
    let target = BodyServer::start("127.0.0.2", 1024).await;
    let (server, _agent, _) = setup(&pki, &allow_only(target.addr), false, "[]").await;
    let proxy = server.http_connect_addr.unwrap();

    // Silent after connect, and a head trickled too slowly: 408 after handshake_timeout (500ms).
    let mut silent = TcpStream::connect(proxy).await.unwrap();
    let mut slow = TcpStream::connect(proxy).await.unwrap();
    slow.write_all(b"CONNECT 127.0.0.2:1 HTTP/1.1\r\nX-A: ")
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    for stream in [&mut silent, &mut slow] {
        let mut answer = Vec::new();
        tokio::time::timeout(WAIT, stream.read_to_end(&mut answer))
            .await
            .expect("closed by the handshake timeout")
            .unwrap();
        assert!(
            answer.starts_with(b"HTTP/1.1 408"),
            "{}",
            String::from_utf8_lossy(&answer)
        );
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(refusals(&server, "http_connect", "timeout") >= 2.0);

    // Truncated head then EOF, and a connection closed right away.
    let mut truncated = TcpStream::connect(proxy).await.unwrap();
    truncated
        .write_all(b"CONNECT 127.0.0.2:1 HTT")
        .await
        .unwrap();
    truncated.shutdown().await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(WAIT, truncated.read_to_end(&mut answer))
        .await
        .unwrap();
    assert!(
        answer.starts_with(b"HTTP/1.1 400"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    drop(TcpStream::connect(proxy).await.unwrap());

    // A working exchange afterwards, then everything balances.
    let (status, _) = exchange(proxy, &connect(target.addr, Some(("edge-1", OPS_TOKEN)))).await;
    assert_eq!(status, 200);
    streams_balance(&server).await;
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_loopback_consumers_only_when_configured() {
    let pki = TestPki::new();
    let target = BodyServer::start("127.0.0.2", 64 * 1024).await;
    let (server, _agent, _) = setup(&pki, &allow_only(target.addr), false, "[edge-1]").await;
    let proxy = server.http_connect_addr.unwrap();
    let url = format!("http://{}/", target.addr);
    // curl's user with no password: anonymous, from loopback, for an allowed client.
    let out = curl(&[
        "--proxytunnel",
        "--proxy",
        &format!("http://edge-1:@{proxy}"),
        &url,
    ])
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout == target.body);
    let (status, _) = exchange(
        proxy,
        format!(
            "CONNECT {} HTTP/1.1\r\nX-Tether-Client: edge-1\r\n\r\n",
            target.addr
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(status, 200);
    let (status, body) = exchange(
        proxy,
        format!(
            "CONNECT {} HTTP/1.1\r\nX-Tether-Client: edge-2\r\n\r\n",
            target.addr
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    streams_balance(&server).await;
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_reload_in_place() {
    let pki = TestPki::new();
    let target = BodyServer::start("127.0.0.2", 1024).await;
    let (server, _agent, _) = setup(&pki, &allow_only(target.addr), false, "[]").await;
    let proxy = server.http_connect_addr.unwrap();
    let control = server.frontend_control.clone();
    let ok = |token: &'static str| connect(target.addr, Some(("edge-1", token)));
    assert_eq!(exchange(proxy, &ok(OPS_TOKEN)).await.0, 200);
    assert_eq!(exchange(proxy, &ok(ROTATED_TOKEN)).await.0, 407);

    // The same section again changes nothing.
    let yaml = frontends_yaml("[]");
    let same = section(&yaml);
    let outcome = control.reload(&same).unwrap();
    assert!(
        outcome.applied.is_empty() && outcome.needs_restart.is_empty(),
        "{outcome:?}"
    );

    // Rotate ops's token: the old one stops working, the new one works, same listener.
    let mut rotated = same.clone();
    rotated.consumers[0].token_sha256 = tether_server::TokenHash(ROTATED_SHA256.into());
    rotated.socks5_listen = "127.0.0.1:1".into();
    let outcome = control.reload(&rotated).unwrap();
    assert_eq!(outcome.applied, vec!["consumers"]);
    assert_eq!(outcome.needs_restart, vec!["socks5_listen"]);
    assert_eq!(exchange(proxy, &ok(OPS_TOKEN)).await.0, 407);
    assert_eq!(exchange(proxy, &ok(ROTATED_TOKEN)).await.0, 200);

    // An invalid section is refused and changes nothing.
    let mut invalid = rotated.clone();
    invalid.consumers[0].token_sha256 = tether_server::TokenHash("not-hex".into());
    let errors = control.reload(&invalid).unwrap_err().to_string();
    assert!(
        errors.contains("frontends.consumers[0].token_sha256"),
        "{errors}"
    );
    assert_eq!(exchange(proxy, &ok(ROTATED_TOKEN)).await.0, 200);
    streams_balance(&server).await;
    server.stop().await.unwrap();
}

/// The server's reload path (what SIGHUP runs) applies consumer changes in place and keeps a
/// changed listener address for the next restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_reload_rotates_consumer_tokens_in_place() {
    let pki = TestPki::new();
    let target = BodyServer::start("127.0.0.2", 1024).await;
    let (server, _agent, _) = setup(&pki, &allow_only(target.addr), false, "[]").await;
    let proxy = server.http_connect_addr.unwrap();
    let ok = |token: &'static str| connect(target.addr, Some(("edge-1", token)));
    assert_eq!(exchange(proxy, &ok(OPS_TOKEN)).await.0, 200);

    let running = server.reloader.current();
    let outcome = server.reloader.reload(running.clone()).await.unwrap();
    assert_eq!(
        outcome.result,
        tether_common::config_diff::ReloadResult::Unchanged
    );

    let mut rotated = running.clone();
    rotated.frontends.consumers[0].token_sha256 = tether_server::TokenHash(ROTATED_SHA256.into());
    rotated.frontends.socks5_listen = "127.0.0.1:1".into();
    let outcome = server.reloader.reload(rotated).await.unwrap();
    assert_eq!(
        outcome.result,
        tether_common::config_diff::ReloadResult::Applied
    );
    assert!(
        outcome.changed.contains(&"frontends.consumers".to_owned()),
        "{outcome:?}"
    );
    assert_eq!(outcome.restart_required, vec!["frontends.socks5_listen"]);
    assert_eq!(exchange(proxy, &ok(OPS_TOKEN)).await.0, 407);
    assert_eq!(exchange(proxy, &ok(ROTATED_TOKEN)).await.0, 200);
    // The running config keeps the listener it runs with, and the new consumers.
    let now = server.reloader.current();
    assert_eq!(now.frontends.socks5_listen, running.frontends.socks5_listen);
    assert_eq!(now.frontends.consumers[0].token_sha256.0, ROTATED_SHA256);
    streams_balance(&server).await;
    server.stop().await.unwrap();
}

/// The `frontends:` section of a YAML document.
fn section(yaml: &str) -> tether_server::FrontendsConfig {
    let config: tether_server::ServerConfig =
        tether_common::config_error::parse_yaml(yaml, "frontends").unwrap();
    config.frontends
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_open_tunnels_and_the_connection_cap_holds() {
    let pki = TestPki::new();
    let (echo, _echo) = tether_e2e::tether_testkit::echo_server().await;
    let server = TestServer::start(
        &pki,
        &[],
        &frontends_yaml("[]").replace(
            "handshake_timeout: 500ms",
            "handshake_timeout: 5s\n  max_connections: 2",
        ),
    )
    .await;
    let mut agent = TestAgent::start(
        &pki,
        &pki.agent("edge-1"),
        server.tunnel_addr,
        &allow_only(echo),
        "",
    )
    .await;
    agent.wait_connected().await;
    server.wait_agents(1).await;
    let proxy = server.http_connect_addr.unwrap();

    // One open tunnel (echoing); established tunnels and handshakes are counted apart, so two
    // connections in their handshake fill the handshake cap of 2.
    let mut tunnel = TcpStream::connect(proxy).await.unwrap();
    tunnel
        .write_all(&connect(echo, Some(("edge-1", OPS_TOKEN))))
        .await
        .unwrap();
    let mut head = [0u8; 39];
    tunnel.read_exact(&mut head).await.unwrap();
    assert!(
        head.starts_with(b"HTTP/1.1 200 "),
        "{}",
        String::from_utf8_lossy(&head)
    );
    tunnel.write_all(b"hi").await.unwrap();
    let mut back = [0u8; 2];
    tunnel.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"hi");
    let _pending = TcpStream::connect(proxy).await.unwrap();
    let _pending2 = TcpStream::connect(proxy).await.unwrap();
    // The third is reset at accept (possibly before connect returns).
    assert!(tether_e2e::consumer_gets_error(proxy).await);
    assert_eq!(refusals(&server, "http_connect", "limit"), 1.0);

    // Shutdown: the open tunnel is reset (never a clean EOF) after the drain timeout, and the
    // server stops in time.
    tokio::time::timeout(WAIT, server.stop())
        .await
        .expect("server stops in time")
        .unwrap();
    assert!(tether_e2e::ends_with_error(&mut tunnel).await);
    agent.stop().await.unwrap();
}
