//! `WsTransport`: a tokio-tungstenite `WebSocketStream` as a `tether_mux::FrameTransport`, one
//! binary message per frame.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use futures::{Sink, Stream};
use tether_mux::TransportError;
use tether_proto::{Frame, Limits};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

/// Frames over a WebSocket: binary messages decode with the session's limits, pings and pongs
/// are skipped (tungstenite answers pings itself), a text message is an error and a close ends
/// the stream of frames.
#[derive(Debug)]
pub struct WsTransport<S> {
    socket: WebSocketStream<S>,
    limits: Limits,
    ended: bool,
}

impl<S> WsTransport<S> {
    /// Wraps an upgraded socket; `limits` must match the session's `MuxConfig::limits()`.
    pub fn new(socket: WebSocketStream<S>, limits: Limits) -> Self {
        Self {
            socket,
            limits,
            ended: false,
        }
    }

    /// The underlying WebSocket.
    pub fn get_ref(&self) -> &WebSocketStream<S> {
        &self.socket
    }

    /// Gives the WebSocket back (for `protocol: remotedialer`, which frames it differently).
    pub fn into_inner(self) -> WebSocketStream<S> {
        self.socket
    }
}

fn transport_error(err: WsError) -> TransportError {
    match err {
        WsError::Io(err) => TransportError::Io(err),
        other => TransportError::Other(other.to_string()),
    }
}

impl<S> Stream for WsTransport<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    type Item = Result<Frame, TransportError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if self.ended {
                return Poll::Ready(None);
            }
            let msg = match ready!(Pin::new(&mut self.socket).poll_next(cx)) {
                None | Some(Err(WsError::ConnectionClosed | WsError::AlreadyClosed)) => {
                    self.ended = true;
                    return Poll::Ready(None);
                }
                Some(Err(err)) => return Poll::Ready(Some(Err(transport_error(err)))),
                Some(Ok(msg)) => msg,
            };
            match msg {
                Message::Binary(bytes) => {
                    let frame = tether_proto::decode(&bytes, &self.limits)
                        .map_err(TransportError::Malformed);
                    return Poll::Ready(Some(frame));
                }
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
                Message::Text(_) => {
                    return Poll::Ready(Some(Err(TransportError::Other(
                        "text message on a tether.v1 WebSocket".into(),
                    ))));
                }
                Message::Close(_) => {
                    self.ended = true;
                    return Poll::Ready(None);
                }
            }
        }
    }
}

impl<S> Sink<Frame> for WsTransport<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    type Error = TransportError;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Pin::new(&mut self.socket)
            .poll_ready(cx)
            .map_err(transport_error)
    }

    fn start_send(mut self: Pin<&mut Self>, frame: Frame) -> Result<(), Self::Error> {
        let bytes = tether_proto::codec::encode_to_bytes(&frame);
        Pin::new(&mut self.socket)
            .start_send(Message::Binary(bytes))
            .map_err(transport_error)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Pin::new(&mut self.socket)
            .poll_flush(cx)
            .map_err(transport_error)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        match ready!(Pin::new(&mut self.socket).poll_close(cx)) {
            // Closing a socket the peer already closed is not a failure.
            Ok(()) | Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => Poll::Ready(Ok(())),
            Err(err) => Poll::Ready(Err(transport_error(err))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::protocol::Role;

    async fn pair() -> (
        WsTransport<tokio::io::DuplexStream>,
        WebSocketStream<tokio::io::DuplexStream>,
    ) {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let client = WebSocketStream::from_raw_socket(a, Role::Client, None).await;
        let server = WebSocketStream::from_raw_socket(b, Role::Server, None).await;
        (WsTransport::new(client, Limits::default()), server)
    }

    #[tokio::test]
    async fn frames_round_trip_and_control_messages_are_skipped() {
        let (mut transport, mut peer) = pair().await;
        transport.send(Frame::Ping { nonce: 7 }).await.unwrap();
        let Some(Ok(Message::Binary(bytes))) = peer.next().await else {
            panic!("expected a binary message")
        };
        assert_eq!(
            tether_proto::decode(&bytes, &Limits::default()).unwrap(),
            Frame::Ping { nonce: 7 }
        );

        peer.send(Message::Ping(vec![1].into())).await.unwrap();
        peer.send(Message::Binary(tether_proto::codec::encode_to_bytes(
            &Frame::Pong { nonce: 9 },
        )))
        .await
        .unwrap();
        assert_eq!(
            transport.next().await.unwrap().unwrap(),
            Frame::Pong { nonce: 9 }
        );

        // A malformed message is reported as such, and the transport carries on.
        peer.send(Message::Binary(vec![0xff].into())).await.unwrap();
        assert!(matches!(
            transport.next().await,
            Some(Err(TransportError::Malformed(_)))
        ));
        peer.send(Message::Text("hello".into())).await.unwrap();
        assert!(matches!(
            transport.next().await,
            Some(Err(TransportError::Other(_)))
        ));
        peer.close(None).await.unwrap();
        assert!(transport.next().await.is_none());
        assert!(transport.next().await.is_none());
    }
}
