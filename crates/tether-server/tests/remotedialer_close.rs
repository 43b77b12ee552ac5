//! The remotedialer route's WebSocket close frames say why a session ended: a client that
//! breaks the protocol gets 1002 with a reason, and a server shutdown sends 1001 (going away).
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use support::{base_config, client_config, start, tls_connect};
use tether_testkit::TestPki;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

type Ws = WebSocketStream<TlsStream<TcpStream>>;

/// A remotedialer client of `edge-1` on `/connect`, offering no ALPN (as Go's client does).
async fn rd_client(addr: std::net::SocketAddr, pki: &TestPki) -> Ws {
    let mut config = (*client_config(pki, &pki.agent("edge-1"))).clone();
    config.alpn_protocols.clear();
    let tls = tls_connect(addr, Arc::new(config)).await.unwrap();
    let request = "wss://localhost/connect".into_client_request().unwrap();
    tokio_tungstenite::client_async(request, tls)
        .await
        .unwrap()
        .0
}

/// The close frame the server sends, skipping everything before it.
async fn close_frame(ws: &mut Ws) -> CloseFrame {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(Some(frame)))) => return frame,
                Some(Ok(Message::Close(None))) => panic!("close frame without a code"),
                Some(Ok(_)) => {}
                other => panic!("no close frame: {other:?}"),
            }
        }
    })
    .await
    .expect("a close frame within 10 s")
}

#[tokio::test]
async fn protocol_error_closes_with_1002_and_a_reason() {
    let pki = TestPki::new();
    let server = start(base_config(&pki)).await;
    let mut ws = rd_client(server.tunnel, &pki).await;
    let registry = server.registry.clone();
    support::eventually("session registered", || registry.session_count() == 1).await;
    // remotedialer is binary only: Go ends its session on a text message too.
    ws.send(Message::Text("hello".into())).await.unwrap();
    let frame = close_frame(&mut ws).await;
    assert_eq!(frame.code, CloseCode::Protocol);
    assert!(frame.reason.contains("text message"), "{frame:?}");
    support::eventually("session removed", || registry.session_count() == 0).await;
    server.stop().await.unwrap();
}

#[tokio::test]
async fn shutdown_closes_with_1001_going_away() {
    let pki = TestPki::new();
    let server = start(base_config(&pki)).await;
    let mut ws = rd_client(server.tunnel, &pki).await;
    let registry = server.registry.clone();
    support::eventually("session registered", || registry.session_count() == 1).await;
    let stop = tokio::spawn(server.stop());
    let frame = close_frame(&mut ws).await;
    assert_eq!(frame.code, CloseCode::Away);
    assert_eq!(frame.reason.as_str(), "server shutting down");
    stop.await.unwrap().unwrap();
}
