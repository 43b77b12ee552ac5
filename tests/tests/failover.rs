//! A second session of one agent id that never answers OPEN (a wedged second instance) must
//! not take the client's dials: an OPEN unanswered on it is reset after a short wait, the
//! session is marked unhealthy at once, and the dial succeeds on the healthy session.

#![allow(clippy::unwrap_used)] // test helpers panic on failure by design

use std::net::SocketAddr;
use std::time::Duration;

use tether_e2e::tether_testkit::{TestPki, echo_server};
use tether_e2e::{ForwardSpec, TestAgent, TestServer, agent_config, allow_only};
use tether_mux::{MuxConfig, MuxMetrics, Role, Session};
use tether_testkit::eventually;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn echo_through(forward: SocketAddr, byte: u8) -> std::io::Result<()> {
    let mut tcp = TcpStream::connect(forward).await?;
    tcp.write_all(&[byte]).await?;
    let mut back = [0u8; 1];
    tcp.read_exact(&mut back).await?;
    assert_eq!(back[0], byte);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_unanswered_on_a_wedged_session_fails_over_to_the_healthy_one() {
    let pki = TestPki::new();
    let (echo, _echo) = echo_server().await;
    let server = TestServer::start(
        &pki,
        &[ForwardSpec::new("edge-1", echo)],
        "dial_timeout: 10s\n",
    )
    .await;
    let cert = pki.agent("edge-1");
    let mut healthy =
        TestAgent::start(&pki, &cert, server.tunnel_addr, &allow_only(echo), "").await;
    healthy.wait_connected().await;
    eventually("the healthy session is registered", || {
        server.sessions.sessions("edge-1").len() == 1
    })
    .await;

    // The wedged instance: a real session that answers PINGs but never takes its OPENs.
    let yaml = format!(
        "version: 1\n\
         server_url: \"wss://{}/v1/connect\"\n\
         server_name: \"localhost\"\n\
         tls: {{ cert: \"{}\", key: \"{}\", server_ca: \"{}\" }}\n",
        server.tunnel_addr,
        cert.cert_path.display(),
        cert.key_path.display(),
        pki.ca_path().display(),
    );
    let config = agent_config(&yaml, &pki).unwrap();
    let connector =
        tether_agent::Connector::new(&config, pki.client_config(&cert), "wedged").unwrap();
    let connection = connector.connect().await.unwrap();
    let (_wedged, _never_read, driver) = Session::new(
        connection.transport,
        Role::Agent,
        MuxConfig::default(),
        MuxMetrics::unregistered(),
    );
    let driver = tokio::spawn(driver.run());
    eventually("the wedged session is registered", || {
        server.sessions.sessions("edge-1").len() == 2
    })
    .await;

    let forward = server.forward_addrs[0];
    let started = tokio::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(5), echo_through(forward, 1))
        .await
        .expect("the dial fails over well within dial_timeout")
        .unwrap();
    let took = started.elapsed();
    let sessions = server.sessions.sessions("edge-1");
    let newest = sessions.last().unwrap();
    assert_eq!(newest.instance, "wedged");
    assert!(!newest.health.is_healthy(), "the wedged session is lowered");
    // The next dial goes to the healthy session at once.
    let again = tokio::time::Instant::now();
    echo_through(forward, 2).await.unwrap();
    assert!(
        again.elapsed() < Duration::from_secs(1),
        "{:?}",
        again.elapsed()
    );
    eprintln!("first dial took {took:?}");
    driver.abort();
    healthy.stop().await.unwrap();
    server.stop().await.unwrap();
}
