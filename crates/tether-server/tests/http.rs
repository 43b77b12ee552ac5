//! The tunnel listener at the TLS and HTTP level: wrong paths and requests are refused with the
//! right status, and certificates without a usable identity (or from a wrong CA) are counted
//! and never register a session.

mod support;

use support::{base_config, client_config, closed_within_2s, http_exchange, start, tls_connect};
use tether_common::pki::IssueOptions;
use tether_testkit::TestPki;

const UPGRADE_HEADERS: &str = "Connection: Upgrade\r\nUpgrade: websocket\r\n\
     Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";

#[tokio::test]
async fn refuses_wrong_requests_with_clear_statuses() {
    let pki = TestPki::new();
    let server = start(base_config(&pki)).await;
    let config = client_config(&pki, &pki.agent("edge-1"));

    // One keep-alive connection carries several refused requests.
    let mut tls = tls_connect(server.tunnel, config.clone()).await.unwrap();
    let r = http_exchange(&mut tls, "GET /nope HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(r.status, 404, "{r:?}");

    let r = http_exchange(
        &mut tls,
        "GET /v1/connect HTTP/1.1\r\nHost: localhost\r\n\r\n",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 426, "{r:?}");
    assert!(r.body.contains("tether.v1"), "{r:?}");

    let r = http_exchange(
        &mut tls,
        &format!("GET /v1/connect HTTP/1.1\r\nHost: localhost\r\n{UPGRADE_HEADERS}\r\n"),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 400, "{r:?}");
    assert!(
        r.body.contains("Sec-WebSocket-Protocol: tether.v1"),
        "{r:?}"
    );

    let r = http_exchange(
        &mut tls,
        &format!(
            "GET /v1/connect HTTP/1.1\r\nHost: localhost\r\n{UPGRADE_HEADERS}\
             Sec-WebSocket-Protocol: tether.v1\r\nOrigin: https://evil.example\r\n\r\n"
        ),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 403, "{r:?}");

    let r = http_exchange(
        &mut tls,
        "POST /v1/connect HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n",
    )
    .await
    .unwrap();
    assert_ne!(r.status, 200, "{r:?}");
    assert_ne!(r.status, 101, "{r:?}");

    assert_eq!(server.registry.session_count(), 0);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn certificate_without_uri_san_is_refused_and_counted() {
    let pki = TestPki::new();
    let server = start(base_config(&pki)).await;
    let nameless = pki.agent_with(
        "edge-1",
        IssueOptions {
            omit_uri_san: true,
            ..IssueOptions::default()
        },
    );
    // TLS 1.3: the client finishes its side before the server has looked at the certificate.
    let mut tls = tls_connect(server.tunnel, client_config(&pki, &nameless))
        .await
        .unwrap();
    let _ = http_exchange(
        &mut tls,
        "GET /v1/connect HTTP/1.1\r\nHost: localhost\r\n\r\n",
    )
    .await;
    assert!(closed_within_2s(&mut tls).await);
    // The server counts before it closes.
    assert_eq!(
        server.metric(r#"tether_auth_failures_total{reason="missing_uri_san"}"#),
        1.0
    );
    assert_eq!(server.registry.session_count(), 0);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn wrong_ca_client_fails_the_handshake_and_is_counted() {
    let pki = TestPki::new();
    let server = start(base_config(&pki)).await;
    let stranger = pki.agent_from_other_ca("edge-1");
    let result = tls_connect(server.tunnel, client_config(&pki, &stranger)).await;
    if let Ok(mut tls) = result {
        // The client may finish first (TLS 1.3); then the alert or close arrives on read.
        let _ = http_exchange(&mut tls, "GET / HTTP/1.1\r\nHost: localhost\r\n\r\n").await;
        assert!(closed_within_2s(&mut tls).await);
    }
    let prometheus = server.prometheus.clone();
    support::eventually("the handshake failure to be counted", || {
        support::metric(
            &prometheus,
            r#"tether_tls_handshake_failures_total{reason="bad_certificate"}"#,
        ) == 1.0
    })
    .await;
    assert_eq!(server.registry.session_count(), 0);
    assert_eq!(server.metric("tether_preauth_handshakes_inflight"), 0.0);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn agent_outside_the_allow_list_gets_403() {
    let pki = TestPki::new();
    let mut config = base_config(&pki);
    config.allowed_agents = vec!["edge-1".into()];
    let server = start(config).await;
    let err = support::ws_connect(
        server.tunnel,
        client_config(&pki, &pki.agent("edge-2")),
        "i",
    )
    .await
    .unwrap_err();
    match err {
        tokio_tungstenite::tungstenite::Error::Http(response) => {
            assert_eq!(response.status(), 403);
        }
        other => panic!("expected HTTP 403, got {other}"),
    }
    assert_eq!(
        server.metric(r#"tether_auth_failures_total{reason="not_allowed"}"#),
        1.0
    );
    assert_eq!(server.registry.session_count(), 0);
    // The allowed agent gets in.
    let (agent, _) = support::connect_agent(
        server.tunnel,
        client_config(&pki, &pki.agent("edge-1")),
        "i",
    )
    .await;
    let registry = server.registry.clone();
    support::eventually("edge-1 registered", || registry.session_count() == 1).await;
    drop(agent);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn sessions_beyond_max_agents_get_503() {
    let pki = TestPki::new();
    let mut config = base_config(&pki);
    config.max_agents = 1;
    let server = start(config).await;
    let (first, _) = support::connect_agent(
        server.tunnel,
        client_config(&pki, &pki.agent("edge-1")),
        "a",
    )
    .await;
    let err = support::ws_connect(
        server.tunnel,
        client_config(&pki, &pki.agent("edge-2")),
        "b",
    )
    .await
    .unwrap_err();
    match err {
        tokio_tungstenite::tungstenite::Error::Http(response) => {
            assert_eq!(response.status(), 503);
        }
        other => panic!("expected HTTP 503, got {other}"),
    }
    // Once the first session is gone, its slot is free again.
    first.session.close();
    let _ = first.driver.await;
    let registry = server.registry.clone();
    support::eventually("edge-1 deregistered", || registry.session_count() == 0).await;
    let (second, _) = support::connect_agent(
        server.tunnel,
        client_config(&pki, &pki.agent("edge-2")),
        "b",
    )
    .await;
    support::eventually("edge-2 registered", || registry.session_count() == 1).await;
    drop(second);
    server.stop().await.unwrap();
}

/// Ordinary WebSocket clients (Go's gorilla/websocket among them) offer no ALPN: both upgrade
/// routes accept them.
#[tokio::test]
async fn client_without_alpn_upgrades_on_both_routes() {
    let pki = TestPki::new();
    let server = start(base_config(&pki)).await;
    let mut config = (*client_config(&pki, &pki.agent("edge-1"))).clone();
    config.alpn_protocols.clear();
    let config = std::sync::Arc::new(config);
    let mut sockets = Vec::new();
    for (i, (path, extra)) in [
        ("/v1/connect", "Sec-WebSocket-Protocol: tether.v1\r\n"),
        ("/connect", ""),
    ]
    .into_iter()
    .enumerate()
    {
        let mut tls = tls_connect(server.tunnel, config.clone()).await.unwrap();
        assert_eq!(tls.get_ref().1.alpn_protocol(), None);
        let r = http_exchange(
            &mut tls,
            &format!(
                "GET {path} HTTP/1.1\r\nHost: localhost\r\n{UPGRADE_HEADERS}\
                 X-Tether-Instance: i{i}\r\n{extra}\r\n"
            ),
        )
        .await
        .unwrap();
        assert_eq!(r.status, 101, "{path}: {r:?}");
        let registry = server.registry.clone();
        support::eventually("session registered", || registry.session_count() == i + 1).await;
        // Kept open: the session lives as long as the socket.
        sockets.push(tls);
    }
    assert_eq!(
        server.metric(r#"tether_tls_handshake_failures_total{reason="alpn"}"#),
        0.0
    );
    drop(sockets);
    server.stop().await.unwrap();
}

/// A client whose ALPN list excludes http/1.1 fails the TLS handshake and is counted.
#[tokio::test]
async fn client_offering_only_h2_is_refused_and_counted() {
    let pki = TestPki::new();
    let server = start(base_config(&pki)).await;
    let mut config = (*client_config(&pki, &pki.agent("edge-1"))).clone();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let result = tls_connect(server.tunnel, std::sync::Arc::new(config)).await;
    // TLS 1.3: the server's alert may reach the client during or right after its handshake.
    if let Ok(mut tls) = result {
        assert!(closed_within_2s(&mut tls).await);
    }
    let prometheus = server.prometheus.clone();
    support::eventually("the ALPN refusal is counted", || {
        support::metric(
            &prometheus,
            r#"tether_tls_handshake_failures_total{reason="alpn"}"#,
        ) == 1.0
    })
    .await;
    assert_eq!(server.registry.session_count(), 0);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn silent_connection_is_dropped_after_the_handshake_timeout() {
    let pki = TestPki::new();
    let mut config = base_config(&pki);
    config.handshake_timeout = tether_common::duration::HumanDuration::millis(200);
    let server = start(config).await;
    let mut tcp = tokio::net::TcpStream::connect(server.tunnel).await.unwrap();
    assert!(closed_within_2s(&mut tcp).await);
    assert_eq!(
        server.metric(r#"tether_tls_handshake_failures_total{reason="timeout"}"#),
        1.0
    );
    assert_eq!(server.metric("tether_preauth_handshakes_inflight"), 0.0);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn connections_beyond_max_pending_handshakes_are_dropped() {
    let pki = TestPki::new();
    let mut config = base_config(&pki);
    config.max_pending_handshakes = 1;
    let server = start(config).await;
    // The first connection sits in the TLS phase and holds the only permit; the listener
    // accepts in arrival order, so the second one is over the cap.
    let _first = tokio::net::TcpStream::connect(server.tunnel).await.unwrap();
    let mut second = tokio::net::TcpStream::connect(server.tunnel).await.unwrap();
    assert!(closed_within_2s(&mut second).await);
    assert_eq!(
        server.metric(r#"tether_tls_handshake_failures_total{reason="too_many_pending"}"#),
        1.0
    );
    assert_eq!(server.metric("tether_preauth_handshakes_inflight"), 1.0);
    // Shutdown abandons the pending handshake.
    server.stop().await.unwrap();
}
