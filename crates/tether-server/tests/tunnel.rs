//! End to end over real sockets: an agent (tokio-tungstenite + mux session) connects over mutual
//! TLS; a consumer on a forward reaches an echo server through it; the admin listener reports
//! it; shutdown sends GOAWAY. A forward whose client has no session closes consumers at once.

mod support;

use std::time::Duration;

use support::{
    admin_get, base_config, client_config, closed_within_2s, connect_agent, spawn_dialing_agent,
    start,
};
use tether_mux::OpenError;
use tether_proto::{GoAwayCode, OpenErrorCode, TargetAddr};
use tether_server::{ClientsResponse, ForwardConfig};
use tether_testkit::{TestPki, echo_server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn forward(name: &str, client: &str, target: &str) -> ForwardConfig {
    ForwardConfig {
        name: name.into(),
        listen: "127.0.0.1:0".into(),
        client: client.into(),
        target: target.into(),
    }
}

#[tokio::test]
async fn forward_reaches_the_target_through_the_agent() {
    let pki = TestPki::new();
    let (echo_addr, _echo) = echo_server().await;
    let mut config = base_config(&pki);
    config.forwards = vec![forward("echo", "edge-1", &echo_addr.to_string())];
    let server = start(config).await;

    let (agent, response) = connect_agent(
        server.tunnel,
        client_config(&pki, &pki.agent("edge-1")),
        "inst-1",
    )
    .await;
    assert_eq!(
        response
            .headers()
            .get("sec-websocket-protocol")
            .map(|v| v.as_bytes()),
        Some(&b"tether.v1"[..])
    );
    let server_id = response
        .headers()
        .get("x-tether-server")
        .and_then(|v| v.to_str().ok())
        .expect("X-Tether-Server")
        .to_owned();
    let agent_session = agent.session.clone();
    let dialer = spawn_dialing_agent(agent.incoming);
    let registry = server.registry.clone();
    support::eventually("the session to register", || registry.session_count() == 1).await;
    let entry = server.registry.pick_entry("edge-1").unwrap();
    assert_eq!(entry.instance, "inst-1");

    // 1 MiB both ways, byte-exact, with half-close.
    let payload: Vec<u8> = (0..1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let consumer = TcpStream::connect(server.forwards[0]).await.unwrap();
    let (mut r, mut w) = consumer.into_split();
    let to_send = payload.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&to_send).await.unwrap();
        w.shutdown().await.unwrap();
        w
    });
    let mut echoed = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), r.read_to_end(&mut echoed))
        .await
        .expect("echo within 20 s")
        .unwrap();
    let _w = writer.await.unwrap();
    assert_eq!(echoed.len(), payload.len());
    assert!(echoed == payload, "echoed bytes differ");
    assert_eq!(server.metric("tether_dial_duration_seconds_count"), 1.0);
    assert_eq!(server.metric(r#"tether_sessions{client="edge-1"}"#), 1.0);
    assert_eq!(server.metric("tether_agents_connected"), 1.0);
    assert_eq!(
        server.metric(r#"tether_session_events_total{event="added"}"#),
        1.0
    );

    // Agent-opened streams are refused: the server takes none.
    let err = agent_session
        .open("127.0.0.1:1".parse::<TargetAddr>().unwrap())
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            OpenError::Refused {
                code: OpenErrorCode::Unsupported,
                ..
            }
        ),
        "{err}"
    );

    // The admin listener.
    let r = admin_get(server.admin, "/healthz").await;
    assert_eq!((r.status, r.body.as_str()), (200, "ok\n"));
    let r = admin_get(server.admin, "/readyz").await;
    assert_eq!(r.status, 200);
    let r = admin_get(server.admin, "/metrics").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/plain; version=0.0.4"));
    assert!(
        r.body.contains("tether_build_info{server_id=\"") && r.body.contains(",version=\""),
        "{}",
        r.body
    );
    assert!(r.body.contains("tether_streams_opened_total"), "{}", r.body);
    let r = admin_get(server.admin, "/v1/clients").await;
    assert_eq!(r.status, 200);
    let listing: ClientsResponse = serde_json::from_str(&r.body).unwrap();
    assert_eq!(listing.server_id, server_id);
    assert_eq!(listing.clients.len(), 1);
    assert_eq!(listing.clients[0].client, "edge-1");
    let sessions = &listing.clients[0].sessions;
    assert_eq!(sessions.len(), 1);
    assert_eq!(sessions[0].instance, "inst-1");
    assert!(sessions[0].bytes_tx >= payload.len() as u64, "{sessions:?}");

    // Shutdown: the agent hears GOAWAY(restart: this replica goes away), then the session
    // closes; everything ends.
    let registry = server.registry.clone();
    server.stop().await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), agent_session.closed())
        .await
        .expect("agent session closed by the server");
    assert_eq!(
        agent_session.peer_goaway().map(|(code, _)| code),
        Some(GoAwayCode::Restart)
    );
    assert_eq!(registry.session_count(), 0);
    let _ = agent.driver.await;
    dialer.abort();
}

#[tokio::test]
async fn consumer_is_closed_when_the_client_has_no_session() {
    let pki = TestPki::new();
    let mut config = base_config(&pki);
    config.forwards = vec![forward("db", "edge-9", "db.internal:5432")];
    let server = start(config).await;

    for _ in 0..2 {
        let mut consumer = TcpStream::connect(server.forwards[0]).await.unwrap();
        assert!(
            closed_within_2s(&mut consumer).await,
            "consumer closed fast"
        );
    }
    assert_eq!(
        server.metric(r#"tether_dial_errors_total{code="no_session"}"#),
        2.0
    );
    // The configured client is listed with zero sessions, and its gauge is 0.
    let r = admin_get(server.admin, "/v1/clients").await;
    let listing: ClientsResponse = serde_json::from_str(&r.body).unwrap();
    assert_eq!(listing.clients.len(), 1);
    assert_eq!(listing.clients[0].client, "edge-9");
    assert!(listing.clients[0].sessions.is_empty());
    assert_eq!(server.metric(r#"tether_sessions{client="edge-9"}"#), 0.0);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn failed_dial_resets_the_consumer() {
    let pki = TestPki::new();
    // A port nothing listens on: bind, note the address, close.
    let closed_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let mut config = base_config(&pki);
    config.forwards = vec![forward("dead", "edge-1", &closed_port.to_string())];
    let server = start(config).await;
    let (agent, _) = connect_agent(
        server.tunnel,
        client_config(&pki, &pki.agent("edge-1")),
        "i",
    )
    .await;
    let _dialer = spawn_dialing_agent(agent.incoming);
    let registry = server.registry.clone();
    support::eventually("the session to register", || registry.session_count() == 1).await;

    let mut consumer = TcpStream::connect(server.forwards[0]).await.unwrap();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(5), consumer.read(&mut buf))
        .await
        .expect("consumer closed");
    assert!(read.is_err(), "a failed dial is a reset, not EOF: {read:?}");
    assert_eq!(
        server.metric(r#"tether_dial_errors_total{code="refused"}"#),
        1.0
    );
    server.stop().await.unwrap();
}

/// A server with an echo forward, and a connected agent that dials for it.
struct EchoSetup {
    server: support::Running,
    agent: tether_mux::Session,
    _driver: tokio::task::JoinHandle<tether_mux::SessionEnd>,
    _dialer: tokio::task::JoinHandle<()>,
    _echo: tether_testkit::EchoHandle,
}

async fn echo_setup(pki: &TestPki, drain: Duration) -> EchoSetup {
    let (echo_addr, echo) = echo_server().await;
    let mut config = base_config(pki);
    config.drain_timeout = tether_common::duration::HumanDuration(drain);
    config.forwards = vec![forward("echo", "edge-1", &echo_addr.to_string())];
    let server = start(config).await;
    let (agent, _) =
        connect_agent(server.tunnel, client_config(pki, &pki.agent("edge-1")), "i").await;
    let dialer = spawn_dialing_agent(agent.incoming);
    let registry = server.registry.clone();
    support::eventually("the session to register", || registry.session_count() == 1).await;
    EchoSetup {
        server,
        agent: agent.session,
        _driver: agent.driver,
        _dialer: dialer,
        _echo: echo,
    }
}

async fn echo_once(consumer: &mut TcpStream, msg: &[u8]) {
    consumer.write_all(msg).await.expect("write to the forward");
    let mut buf = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(5), consumer.read_exact(&mut buf))
        .await
        .expect("echo within 5 s")
        .expect("read the echo");
    assert_eq!(buf, msg);
}

#[tokio::test]
async fn shutdown_lets_open_streams_finish() {
    let pki = TestPki::new();
    let setup = echo_setup(&pki, Duration::from_secs(30)).await;
    let mut consumer = TcpStream::connect(setup.server.forwards[0]).await.unwrap();
    echo_once(&mut consumer, b"before").await;

    setup.server.shutdown.cancel();
    let admin = setup.server.admin;
    let mut draining = false;
    for _ in 0..200 {
        if admin_get(admin, "/readyz").await.status == 503 {
            draining = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(draining, "/readyz reports the drain");
    // The agent was told, and the open stream still works.
    let agent = setup.agent.clone();
    support::eventually("GOAWAY at the agent", || agent.peer_goaway().is_some()).await;
    echo_once(&mut consumer, b"during the drain").await;

    // Once the consumer is done, the server stops long before the 30 s drain timeout.
    consumer.shutdown().await.unwrap();
    let mut rest = Vec::new();
    consumer.read_to_end(&mut rest).await.unwrap();
    let started = tokio::time::Instant::now();
    setup.server.stop().await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(
        setup.agent.peer_goaway().map(|(code, _)| code),
        Some(GoAwayCode::Restart)
    );
}

#[tokio::test]
async fn streams_left_at_the_drain_deadline_are_reset() {
    let pki = TestPki::new();
    let setup = echo_setup(&pki, Duration::from_millis(300)).await;
    let mut consumer = TcpStream::connect(setup.server.forwards[0]).await.unwrap();
    echo_once(&mut consumer, b"hello").await;
    let prometheus = setup.server.prometheus.clone();
    setup.server.stop().await.unwrap();
    // The consumer's connection is aborted, not finished cleanly.
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(5), consumer.read(&mut buf))
        .await
        .expect("consumer closed");
    assert!(read.is_err(), "reset, not EOF: {read:?}");
    assert_eq!(support::metric(&prometheus, "tether_streams_active"), 0.0);
    tokio::time::timeout(Duration::from_secs(5), setup.agent.closed())
        .await
        .expect("the agent's session is closed by the server");
}
