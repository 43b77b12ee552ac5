//! The native tether.v1 route closes with an RFC 6455 code and a reason when an agent breaks the
//! WebSocket layer: 1002 for a protocol error, 1003 for a text message, 1009 for a message over
//! the size limit. Each test writes the bad input and reads the close frame the server sends.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use support::{base_config, client_config, start, ws_connect};
use tether_testkit::TestPki;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

type Ws = WebSocketStream<TlsStream<TcpStream>>;

/// A server and one upgraded tether.v1 agent socket (registered as a session).
async fn agent_socket() -> (support::Running, Ws, TestPki) {
    let pki = TestPki::new();
    let server = start(base_config(&pki)).await;
    let config = client_config(&pki, &pki.agent("edge-1"));
    let (ws, _) = ws_connect(server.tunnel, config, "i-1").await.unwrap();
    let registry = server.registry.clone();
    support::eventually("session registered", || registry.session_count() == 1).await;
    (server, ws, pki)
}

/// The close frame the server sends, skipping the frames before it (its PINGs, its GOAWAY).
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

/// Writes raw bytes under the WebSocket layer (a frame tungstenite would never send).
async fn write_raw(ws: &mut Ws, bytes: &[u8]) {
    let tls = ws.get_mut();
    tls.write_all(bytes).await.unwrap();
    tls.flush().await.unwrap();
}

/// Ends the test: the session is gone from the registry, the server stops.
async fn session_gone_and_stop(server: support::Running) {
    let registry = server.registry.clone();
    support::eventually("session removed", || registry.session_count() == 0).await;
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_frame_with_reserved_bits_closes_with_1002_and_the_violation() {
    let (server, mut ws, _pki) = agent_socket().await;
    // FIN + RSV1 + binary, masked, 1 byte of payload (mask 0: the byte goes as is). No extension
    // was negotiated, so RSV1 must be 0 (RFC 6455 section 5.2).
    write_raw(&mut ws, &[0xC2, 0x81, 0, 0, 0, 0, 0x00]).await;
    let frame = close_frame(&mut ws).await;
    assert_eq!(frame.code, CloseCode::Protocol, "{frame:?}");
    assert!(
        frame.reason.to_lowercase().contains("reserved bits"),
        "{frame:?}"
    );
    session_gone_and_stop(server).await;
}

#[tokio::test]
async fn an_unknown_opcode_closes_with_1002() {
    let (server, mut ws, _pki) = agent_socket().await;
    // FIN + opcode 0x3 (a reserved data opcode), masked, empty.
    write_raw(&mut ws, &[0x83, 0x80, 0, 0, 0, 0]).await;
    let frame = close_frame(&mut ws).await;
    assert_eq!(frame.code, CloseCode::Protocol, "{frame:?}");
    assert!(!frame.reason.is_empty(), "{frame:?}");
    session_gone_and_stop(server).await;
}

#[tokio::test]
async fn a_text_message_closes_with_1003_and_a_reason() {
    let (server, mut ws, _pki) = agent_socket().await;
    ws.send(Message::Text("hello".into())).await.unwrap();
    let frame = close_frame(&mut ws).await;
    assert_eq!(frame.code, CloseCode::Unsupported, "{frame:?}");
    assert!(frame.reason.contains("binary"), "{frame:?}");
    session_gone_and_stop(server).await;
}

#[tokio::test]
async fn a_message_over_the_limit_closes_with_1009_and_the_sizes() {
    let (server, mut ws, _pki) = agent_socket().await;
    // A binary frame header announcing 64 MiB (64-bit length), masked; no payload needed: the
    // length alone is over `session.max_frame` plus the frame overhead.
    let mut header = vec![0x82, 0x80 | 127];
    header.extend_from_slice(&(64u64 << 20).to_be_bytes());
    header.extend_from_slice(&[0, 0, 0, 0]);
    write_raw(&mut ws, &header).await;
    let frame = close_frame(&mut ws).await;
    assert_eq!(frame.code, CloseCode::Size, "{frame:?}");
    assert!(
        frame.reason.to_lowercase().contains("too long"),
        "{frame:?}"
    );
    session_gone_and_stop(server).await;
}

#[tokio::test]
async fn a_server_shutdown_still_closes_without_an_error_code() {
    // The codes above are for violations only: an orderly end is not reported as one.
    let (server, mut ws, _pki) = agent_socket().await;
    let stop = tokio::spawn(server.stop());
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(frame))) => return frame,
                Some(Ok(_)) => {}
                _ => return None,
            }
        }
    })
    .await
    .expect("the socket ends within 10 s");
    if let Some(frame) = end {
        assert!(
            !matches!(
                frame.code,
                CloseCode::Protocol | CloseCode::Unsupported | CloseCode::Size
            ),
            "{frame:?}"
        );
    }
    stop.await.unwrap().unwrap();
}
