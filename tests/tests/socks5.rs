//! The SOCKS5 frontend end to end: curl (`--socks5-hostname`, `--proxy-user`) fetches a large
//! body that only the agent's side reaches, domain names resolve on the agent, IPv6 targets
//! work, every failure has its reply code, and truncated or slow handshakes leave nothing.

#![allow(clippy::unwrap_used)] // test helpers panic on failure by design

use std::net::SocketAddr;
use std::time::Duration;

use tether_e2e::proxy::{
    BodyServer, FLEET_TOKEN, HangingTarget, OPS_TOKEN, agent_dials_ok, curl, frontends_yaml,
    refusals, streams_balance,
};
use tether_e2e::tether_testkit::{TestPki, echo_server};
use tether_e2e::{TestAgent, TestServer, WAIT, allow_only};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A SOCKS5 request's address part.
enum Addr<'a> {
    V4(SocketAddr),
    V6(SocketAddr),
    Domain(&'a str, u16),
}

fn request(cmd: u8, addr: &Addr<'_>) -> Vec<u8> {
    let mut out = vec![5, cmd, 0];
    match addr {
        Addr::V4(SocketAddr::V4(a)) => {
            out.push(1);
            out.extend_from_slice(&a.ip().octets());
            out.extend_from_slice(&a.port().to_be_bytes());
        }
        Addr::V6(SocketAddr::V6(a)) => {
            out.push(4);
            out.extend_from_slice(&a.ip().octets());
            out.extend_from_slice(&a.port().to_be_bytes());
        }
        Addr::Domain(name, port) => {
            out.push(3);
            out.push(name.len() as u8);
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(&port.to_be_bytes());
        }
        _ => panic!("address family does not match"),
    }
    out
}

/// Greets with username/password, authenticates, sends `req`; returns the stream and the
/// reply code (`Err(status)` when authentication failed).
async fn socks(
    proxy: SocketAddr,
    user: &str,
    token: &str,
    req: &[u8],
) -> (TcpStream, Result<u8, u8>) {
    let run = async {
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
        if status[1] != 0 {
            return (tcp, Err(status[1]));
        }
        tcp.write_all(req).await.unwrap();
        let mut reply = [0u8; 10];
        tcp.read_exact(&mut reply).await.unwrap();
        assert_eq!(reply[0], 5);
        (tcp, Ok(reply[1]))
    };
    tokio::time::timeout(WAIT, run)
        .await
        .expect("proxy answers")
}

async fn reply(proxy: SocketAddr, user: &str, token: &str, req: &[u8]) -> Result<u8, u8> {
    socks(proxy, user, token, req).await.1
}

async fn setup(pki: &TestPki, policy: &str, anonymous: &str) -> (TestServer, TestAgent) {
    let server = TestServer::start(pki, &[], &frontends_yaml(anonymous)).await;
    let mut agent =
        TestAgent::start(pki, &pki.agent("edge-1"), server.tunnel_addr, policy, "").await;
    agent.wait_connected().await;
    server.wait_agents(1).await;
    (server, agent)
}

/// Reads until EOF (or an error) within [`WAIT`]; true if the proxy closed the connection.
async fn closed_by_proxy(tcp: &mut TcpStream) -> bool {
    let mut sink = Vec::new();
    matches!(
        tokio::time::timeout(WAIT, tcp.read_to_end(&mut sink)).await,
        Ok(Ok(_) | Err(_))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_fetches_a_large_body_with_names_resolved_by_the_agent() {
    let pki = TestPki::new();
    let target = BodyServer::start("127.0.0.2", 16 * 1024 * 1024).await;
    // `localhost` is resolved by the agent: serve the same body on 127.0.0.1 for it.
    let local = BodyServer::start("127.0.0.1", 1024 * 1024).await;
    let policy = format!(
        "  allow:\n    - {{ cidrs: [\"127.0.0.2/32\"], ports: [\"{}\"] }}\n    \
         - {{ cidrs: [\"127.0.0.1/32\"], ports: [\"{}\"] }}\n",
        target.addr.port(),
        local.addr.port()
    );
    let (server, agent) = setup(&pki, &policy, "[]").await;
    let proxy = server.socks5_addr.unwrap().to_string();
    let user = format!("edge-1:{OPS_TOKEN}");

    let started = tokio::time::Instant::now();
    let out = curl(&[
        "--socks5-hostname",
        &proxy,
        "--proxy-user",
        &user,
        &format!("http://{}/big", target.addr),
    ])
    .await;
    let took = started.elapsed();
    eprintln!(
        "SOCKS5: {} bytes through curl, the proxy and the tunnel in {:.3}s ({:.0} MiB/s)",
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

    // A name only the agent resolves (curl sends it as a domain with --socks5-hostname).
    let out = curl(&[
        "--socks5-hostname",
        &proxy,
        "--proxy-user",
        &user,
        &format!("http://localhost:{}/", local.addr.port()),
    ])
    .await;
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout == local.body, "body differs");
    assert_eq!(
        agent_dials_ok(&agent),
        2.0,
        "both went through the agent's dial"
    );

    // The same by hand with a domain address type, to be sure of what was sent.
    let (mut tcp, code) = socks(
        server.socks5_addr.unwrap(),
        "edge-1",
        OPS_TOKEN,
        &request(1, &Addr::Domain("localhost", local.addr.port())),
    )
    .await;
    assert_eq!(code, Ok(0));
    tcp.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    tcp.read_to_end(&mut answer).await.unwrap();
    assert!(answer.ends_with(&local.body));
    drop(tcp);
    streams_balance(&server).await;
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_targets_work() {
    let Ok(listener) = TcpListener::bind("[::1]:0").await else {
        eprintln!("no IPv6 loopback on this machine; skipping");
        return;
    };
    let pki = TestPki::new();
    let target = BodyServer::serve(listener, 256 * 1024);
    let policy = format!(
        "  allow:\n    - {{ cidrs: [\"::1/128\"], ports: [\"{}\"] }}\n",
        target.addr.port()
    );
    let (server, _agent) = setup(&pki, &policy, "[]").await;
    let (mut tcp, code) = socks(
        server.socks5_addr.unwrap(),
        "edge-1",
        OPS_TOKEN,
        &request(1, &Addr::V6(target.addr)),
    )
    .await;
    assert_eq!(code, Ok(0));
    tcp.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    tcp.read_to_end(&mut answer).await.unwrap();
    assert!(answer.ends_with(&target.body));
    drop(tcp);
    streams_balance(&server).await;
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_failure_has_its_reply_code() {
    let pki = TestPki::new();
    let (echo, _echo) = echo_server().await;
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let denied = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hanging = HangingTarget::start().await;
    let policy = format!(
        "  allow:\n    - {{ cidrs: [\"127.0.0.1/32\"], ports: [\"{}\", \"{}\", \"{}\"] }}\n",
        echo.port(),
        closed.port(),
        hanging.addr.port()
    );
    let (server, _agent) = setup(&pki, &policy, "[]").await;
    let proxy = server.socks5_addr.unwrap();
    let to = |addr| request(1, &Addr::V4(addr));

    // Works, then: wrong token (RFC 1929 failure), token for edge-1 used for edge-2 (not
    // allowed by ruleset), a client with no agent (network unreachable).
    let (mut tcp, code) = socks(proxy, "edge-1", OPS_TOKEN, &to(echo)).await;
    assert_eq!(code, Ok(0));
    tcp.write_all(b"ping").await.unwrap();
    let mut back = [0u8; 4];
    tcp.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"ping");
    drop(tcp);
    assert_eq!(reply(proxy, "edge-1", "wrong", &to(echo)).await, Err(1));
    assert_eq!(reply(proxy, "edge-2", OPS_TOKEN, &to(echo)).await, Ok(2));
    assert_eq!(reply(proxy, "edge-2", FLEET_TOKEN, &to(echo)).await, Ok(3));
    // The agent's OPEN_ERR: refused (5), denied by its policy (2), timed out (6).
    assert_eq!(reply(proxy, "edge-1", OPS_TOKEN, &to(closed)).await, Ok(5));
    assert_eq!(
        reply(
            proxy,
            "edge-1",
            OPS_TOKEN,
            &to(denied.local_addr().unwrap())
        )
        .await,
        Ok(2)
    );
    let no_dial = tokio::time::timeout(Duration::from_millis(100), denied.accept()).await;
    assert!(no_dial.is_err(), "the denied target was dialed");
    assert_eq!(
        reply(proxy, "edge-1", OPS_TOKEN, &to(hanging.addr)).await,
        Ok(6)
    );
    // BIND (command not supported), an unknown address type, a bad domain.
    assert_eq!(
        reply(proxy, "edge-1", OPS_TOKEN, &request(2, &Addr::V4(echo))).await,
        Ok(7)
    );
    let mut bad_type = request(1, &Addr::V4(echo));
    bad_type[3] = 9;
    assert_eq!(reply(proxy, "edge-1", OPS_TOKEN, &bad_type).await, Ok(8));
    assert_eq!(
        reply(
            proxy,
            "edge-1",
            OPS_TOKEN,
            &request(1, &Addr::Domain("a b", 80))
        )
        .await,
        Ok(4)
    );

    // No username/password offered: no client id, so no acceptable method.
    let mut tcp = TcpStream::connect(proxy).await.unwrap();
    tcp.write_all(&[5, 1, 0]).await.unwrap();
    let mut choice = [0u8; 2];
    tcp.read_exact(&mut choice).await.unwrap();
    assert_eq!(choice, [5, 0xff]);

    for reason in [
        "bad_credentials",
        "forbidden",
        "no_session",
        "dial_failed",
        "unsupported",
        "bad_target",
        "missing_credentials",
    ] {
        assert!(
            refusals(&server, "socks5", reason) >= 1.0,
            "{reason} not counted"
        );
    }
    streams_balance(&server).await;
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_garbage_and_slow_handshakes_are_closed_without_leaks() {
    let pki = TestPki::new();
    let (echo, _echo) = echo_server().await;
    let (server, _agent) = setup(&pki, &allow_only(echo), "[]").await;
    let proxy = server.socks5_addr.unwrap();

    // Truncated greeting then EOF; HTTP instead of SOCKS; a greeting that stops half way and
    // stalls; a silent client. Each is closed, the stalled ones by the 500ms deadline.
    let mut truncated = TcpStream::connect(proxy).await.unwrap();
    truncated.write_all(&[5, 3, 0]).await.unwrap();
    truncated.shutdown().await.unwrap();
    let mut garbage = TcpStream::connect(proxy).await.unwrap();
    garbage.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let mut stalled = TcpStream::connect(proxy).await.unwrap();
    stalled.write_all(&[5, 1, 2, 1, 6, b'e']).await.unwrap();
    let mut silent = TcpStream::connect(proxy).await.unwrap();
    let started = tokio::time::Instant::now();
    for tcp in [&mut truncated, &mut garbage, &mut stalled, &mut silent] {
        assert!(closed_by_proxy(tcp).await);
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(refusals(&server, "socks5", "malformed") >= 2.0);
    assert!(refusals(&server, "socks5", "timeout") >= 2.0);

    // Still serving, and nothing left open.
    let (_tcp, code) = socks(proxy, "edge-1", OPS_TOKEN, &request(1, &Addr::V4(echo))).await;
    assert_eq!(code, Ok(0));
    drop(_tcp);
    streams_balance(&server).await;
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_socks_only_when_configured() {
    let pki = TestPki::new();
    let target = BodyServer::start("127.0.0.2", 64 * 1024).await;
    let (server, _agent) = setup(&pki, &allow_only(target.addr), "[edge-1]").await;
    let proxy = server.socks5_addr.unwrap().to_string();
    // socks5h://edge-1@proxy: a user name with an empty password.
    let out = curl(&[
        "--proxy",
        &format!("socks5h://edge-1@{proxy}"),
        &format!("http://{}/", target.addr),
    ])
    .await;
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout == target.body);
    let out = curl(&[
        "--proxy",
        &format!("socks5h://edge-2@{proxy}"),
        &format!("http://{}/", target.addr),
    ])
    .await;
    assert!(!out.status.success());
    assert!(refusals(&server, "socks5", "forbidden") >= 1.0);
    streams_balance(&server).await;
    server.stop().await.unwrap();
}
