//! Target authorization end to end: refused and denied targets give the consumer an error, the
//! denied target's listener sees no connection, SSRF spellings of loopback and metadata
//! addresses are denied, and the session survives every refusal.

#![allow(clippy::unwrap_used)] // test helpers panic on failure by design

use std::net::SocketAddr;

use tether_e2e::tether_testkit::{TestPki, echo_server};
use tether_e2e::{
    ForwardSpec, TestAgent, TestServer, assert_no_prior_connection, consumer_gets_error,
};
use tether_testkit::eventually;
use tether_testkit::metrics::metric_or_zero;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

async fn free_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

async fn echo_ok(forward: SocketAddr) {
    let mut stream = TcpStream::connect(forward).await.unwrap();
    stream.write_all(b"still works").await.unwrap();
    stream.shutdown().await.unwrap();
    let mut back = Vec::new();
    stream.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, b"still works");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_and_denied_targets_fail_the_consumer_only() {
    let pki = TestPki::new();
    let (echo, _echo) = echo_server().await;
    let closed = free_port().await; // nothing listens here any more
    let denied = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let denied_addr = denied.local_addr().unwrap();
    let forwards = [
        ForwardSpec::new("edge-1", echo),
        ForwardSpec::new("edge-1", closed),
        ForwardSpec::new("edge-1", denied_addr),
    ];
    let server = TestServer::start(&pki, &forwards, "").await;
    let policy = format!(
        "  allow:\n    - {{ cidrs: [\"127.0.0.1/32\"], ports: [\"{}\", \"{}\"] }}\n",
        echo.port(),
        closed.port()
    );
    let mut agent =
        TestAgent::start(&pki, &pki.agent("edge-1"), server.tunnel_addr, &policy, "").await;
    agent.wait_connected().await;
    server.wait_agents(1).await;

    assert!(
        consumer_gets_error(server.forward_addrs[1]).await,
        "refused target gives an error, not EOF"
    );
    assert!(
        consumer_gets_error(server.forward_addrs[2]).await,
        "denied target gives an error, not EOF"
    );
    assert_no_prior_connection(&denied).await;

    eventually("dial errors counted", || {
        metric_or_zero(
            &server.registry,
            "tether_dial_errors_total",
            &[("code", "refused")],
        ) == 1.0
            && metric_or_zero(
                &server.registry,
                "tether_dial_errors_total",
                &[("code", "denied")],
            ) == 1.0
    })
    .await;
    // The session survived both refusals.
    echo_ok(server.forward_addrs[0]).await;
    assert_eq!(server.agents_connected(), 1.0);
    agent.stop().await.unwrap();
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_link_local_and_metadata_spellings_are_denied() {
    let pki = TestPki::new();
    let (echo, _echo) = echo_server().await;
    let victim = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let p = victim.local_addr().unwrap().port();
    let spellings = [
        format!("127.0.0.1:{p}"),
        format!("127.1:{p}"),
        format!("2130706433:{p}"),
        format!("0177.0.0.1:{p}"),
        format!("0x7f.1:{p}"),
        format!("0x7f000001:{p}"),
        format!("[::1]:{p}"),
        format!("[::ffff:127.0.0.1]:{p}"),
        format!("0.0.0.0:{p}"),
        format!("localhost:{p}"),
        "169.254.169.254:80".to_string(),
        "[fe80::1]:80".to_string(),
    ];
    let mut forwards = vec![ForwardSpec::new("edge-1", echo)];
    forwards.extend(spellings.iter().map(|t| ForwardSpec::new("edge-1", t)));
    let server = TestServer::start(&pki, &forwards, "").await;
    // Broad rules for every address and port, and hostnames: none of them may reach loopback,
    // link-local or metadata addresses. Only the echo port has an explicit loopback rule.
    let policy = format!(
        "  allow:\n    - {{ cidrs: [\"0.0.0.0/0\", \"::/0\"] }}\n    - {{ hosts: [\"localhost\"] }}\n    - {{ cidrs: [\"127.0.0.1/32\"], ports: [\"{}\"] }}\n",
        echo.port()
    );
    let mut agent =
        TestAgent::start(&pki, &pki.agent("edge-1"), server.tunnel_addr, &policy, "").await;
    agent.wait_connected().await;
    server.wait_agents(1).await;
    for (i, spelling) in spellings.iter().enumerate() {
        assert!(
            consumer_gets_error(server.forward_addrs[i + 1]).await,
            "{spelling} must be refused with an error"
        );
    }
    assert_no_prior_connection(&victim).await;
    echo_ok(server.forward_addrs[0]).await;
    assert_eq!(server.agents_connected(), 1.0);
    agent.stop().await.unwrap();
    server.stop().await.unwrap();
}
