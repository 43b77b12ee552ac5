//! Refusals by the proxy frontends are logged with their reason and consumer, and tokens
//! (good or bad) never appear in the logs, at any level.

#![allow(clippy::unwrap_used)] // test helpers panic on failure by design

use std::io;
use std::sync::{Arc, Mutex};

use tether_e2e::proxy::{BodyServer, OPS_TOKEN, base64_encode, frontends_yaml, streams_balance};
use tether_e2e::tether_testkit::TestPki;
use tether_e2e::{TestAgent, TestServer, WAIT, allow_only};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Collects formatted log lines.
#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<u8>>>);

impl io::Write for Lines {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

async fn http_connect(proxy: std::net::SocketAddr, request: &str) -> String {
    let mut tcp = TcpStream::connect(proxy).await.unwrap();
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut head = vec![0u8; 12];
    tokio::time::timeout(WAIT, tcp.read_exact(&mut head))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&head).into_owned()
}

/// Authenticates; on success also CONNECTs to `target`. The authentication status.
async fn socks(
    proxy: std::net::SocketAddr,
    user: &str,
    token: &str,
    target: std::net::SocketAddr,
) -> u8 {
    let mut tcp = TcpStream::connect(proxy).await.unwrap();
    let mut hello = vec![5, 1, 2, 1, user.len() as u8];
    hello.extend_from_slice(user.as_bytes());
    hello.push(token.len() as u8);
    hello.extend_from_slice(token.as_bytes());
    tcp.write_all(&hello).await.unwrap();
    let mut answer = [0u8; 4];
    tokio::time::timeout(WAIT, tcp.read_exact(&mut answer))
        .await
        .unwrap()
        .unwrap();
    if answer[3] == 0 {
        let std::net::SocketAddr::V4(v4) = target else {
            panic!("an IPv4 target")
        };
        let mut request = vec![5, 1, 0, 1];
        request.extend_from_slice(&v4.ip().octets());
        request.extend_from_slice(&v4.port().to_be_bytes());
        tcp.write_all(&request).await.unwrap();
        let mut reply = [0u8; 10];
        tcp.read_exact(&mut reply).await.unwrap();
        assert_eq!(reply[1], 0, "CONNECT succeeds");
    }
    answer[3]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_logged_without_tokens() {
    let lines = Lines::default();
    let writer = lines.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing_subscriber::filter::LevelFilter::DEBUG)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .init();

    let pki = TestPki::new();
    let target = BodyServer::start("127.0.0.2", 1024).await;
    let server = TestServer::start(&pki, &[], &frontends_yaml("[]")).await;
    let mut agent = TestAgent::start(
        &pki,
        &pki.agent("edge-1"),
        server.tunnel_addr,
        &allow_only(target.addr),
        "",
    )
    .await;
    agent.wait_connected().await;
    server.wait_agents(1).await;
    let http = server.http_connect_addr.unwrap();
    let socks5 = server.socks5_addr.unwrap();

    let wrong = "wrong-secret-4711";
    let basic = |creds: &str| base64_encode(creds.as_bytes());
    let t = target.addr;
    let head = http_connect(
        http,
        &format!(
            "CONNECT {t} HTTP/1.1\r\nProxy-Authorization: Basic {}\r\n\r\n",
            basic(&format!("edge-1:{wrong}"))
        ),
    )
    .await;
    assert!(head.contains("407"), "{head}");
    let head = http_connect(
        http,
        &format!(
            "CONNECT {t} HTTP/1.1\r\nProxy-Authorization: Basic {}\r\n\r\n",
            basic(&format!("edge-2:{OPS_TOKEN}"))
        ),
    )
    .await;
    assert!(head.contains("403"), "{head}");
    let head = http_connect(
        http,
        &format!(
            "CONNECT {t} HTTP/1.1\r\nProxy-Authorization: Basic {}\r\n\r\n",
            basic(&format!("edge-1:{OPS_TOKEN}"))
        ),
    )
    .await;
    assert!(head.contains("200"), "{head}");
    assert_eq!(socks(socks5, "edge-1", wrong, t).await, 1);
    assert_eq!(socks(socks5, "edge-1", OPS_TOKEN, t).await, 0);
    streams_balance(&server).await;
    server.stop().await.unwrap();
    agent.stop().await.unwrap();

    let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
    assert!(!text.contains(wrong), "a bad token was logged:\n{text}");
    assert!(
        !text.contains(OPS_TOKEN),
        "a good token was logged:\n{text}"
    );
    let refusals: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("consumer refused"))
        .collect();
    assert!(
        refusals
            .iter()
            .any(|l| l.contains("reason=\"bad_credentials\"")
                || l.contains("reason=bad_credentials")),
        "{text}"
    );
    assert!(
        refusals.iter().any(|l| l.contains("forbidden")
            && l.contains("consumer=\"ops\"")
            && l.contains("edge-2")),
        "{text}"
    );
    // One line per refusal: two on HTTP, one on SOCKS5.
    assert_eq!(refusals.len(), 3, "{text}");
}
