//! Mutual TLS and identity end to end: the server refuses agents without a certificate, with a
//! certificate from another CA, with an expired one or one without the URI SAN, and creates no
//! session; the agent refuses a server that its pinned CA did not sign.

#![allow(clippy::unwrap_used)] // test helpers panic on failure by design

use std::sync::Arc;
use std::time::Duration;

use tether_common::pki::IssueOptions;
use tether_e2e::tether_testkit::TestPki;
use tether_e2e::{TestAgent, TestServer};
use tether_testkit::eventually;
use tether_testkit::metrics::metric_sum;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const POLICY: &str = "  allow: []\n";

async fn assert_refused(pki: &TestPki, cert: tether_e2e::tether_testkit::AgentCert, counter: &str) {
    let server = TestServer::start(pki, &[], "").await;
    let agent = TestAgent::start(pki, &cert, server.tunnel_addr, POLICY, "").await;
    // Two refusals prove the agent retried and was refused each time.
    eventually(&format!("{counter} counted twice"), || {
        metric_sum(&server.registry, counter, &[]) >= 2.0
    })
    .await;
    assert_eq!(
        server.agents_connected(),
        0.0,
        "no session for a refused agent"
    );
    assert!(!agent.status.borrow().connected);
    agent.stop().await.unwrap();
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_cert_from_another_ca_is_refused() {
    let pki = TestPki::new();
    let cert = pki.agent_from_other_ca("edge-1");
    assert_refused(&pki, cert, "tether_tls_handshake_failures_total").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_agent_cert_is_refused() {
    let pki = TestPki::new();
    let cert = pki.agent_with("edge-1", IssueOptions::expired());
    assert_refused(&pki, cert, "tether_tls_handshake_failures_total").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_cert_without_uri_san_is_refused() {
    let pki = TestPki::new();
    let options = IssueOptions {
        omit_uri_san: true,
        ..IssueOptions::default()
    };
    let cert = pki.agent_with("edge-1", options);
    assert_refused(&pki, cert, "tether_auth_failures_total").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_without_certificate_is_refused() {
    let pki = TestPki::new();
    let server = TestServer::start(&pki, &[], "").await;
    let mut roots = rustls::RootCertStore::empty();
    for cert in tether_common::tls::certs_from_pem(pki.ca_pem()).unwrap() {
        roots.add(cert).unwrap();
    }
    let mut config =
        rustls::ClientConfig::builder_with_provider(tether_common::tls::crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(server.tunnel_addr)
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    // TLS 1.3 may let the client finish before the server rejects it; the failure then shows on
    // the first exchange.
    let outcome = async {
        let mut tls = connector.connect(name, tcp).await?;
        tls.write_all(b"GET /v1/connect HTTP/1.1\r\nHost: x\r\n\r\n")
            .await?;
        let mut buf = [0u8; 64];
        let n = tls.read(&mut buf).await?;
        Ok::<usize, std::io::Error>(n)
    };
    match tokio::time::timeout(Duration::from_secs(5), outcome)
        .await
        .unwrap()
    {
        Ok(0) | Err(_) => {}
        Ok(n) => panic!("server answered {n} bytes to a client without a certificate"),
    }
    eventually("handshake failure counted", || {
        metric_sum(&server.registry, "tether_tls_handshake_failures_total", &[]) >= 1.0
    })
    .await;
    assert_eq!(server.agents_connected(), 0.0);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_refuses_a_server_its_pinned_ca_did_not_sign() {
    let pki = TestPki::new();
    let server = TestServer::start(&pki, &[], "").await;
    let agent = TestAgent::start_with_ca(
        &pki,
        &pki.agent("edge-1"),
        server.tunnel_addr,
        pki.other_ca_path(),
        POLICY,
        "",
    )
    .await;
    eventually("agent connect failures counted twice", || {
        metric_sum(&agent.registry, "tether_agent_connect_failures_total", &[]) >= 2.0
    })
    .await;
    assert!(!agent.status.borrow().connected);
    assert_eq!(server.agents_connected(), 0.0);
    agent.stop().await.unwrap();
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_agent_connects_with_its_certificate_identity() {
    let pki = TestPki::new();
    let server = TestServer::start(&pki, &[], "").await;
    let mut agent =
        TestAgent::start(&pki, &pki.agent("edge-7"), server.tunnel_addr, POLICY, "").await;
    agent.wait_connected().await;
    server.wait_agents(1).await;
    assert_eq!(
        tether_testkit::metrics::metric(
            &server.registry,
            "tether_sessions",
            &[("client", "edge-7")]
        ),
        Some(1.0)
    );
    agent.stop().await.unwrap();
    server.wait_agents(0).await;
    server.stop().await.unwrap();
}
