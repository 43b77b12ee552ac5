//! `RdWsTransport`: an upgraded axum `WebSocket` as a `tether_mux::remotedialer::MessageTransport`
//! (binary messages, pings and pongs; close frames with a code going out), for remotedialer
//! sessions.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures::{Sink, Stream};
use tether_mux::TransportError;
use tether_mux::remotedialer::WsMessage;

/// WebSocket messages of a remotedialer client. tungstenite answers pings itself; they are
/// still passed on, because they are the Go client's only sign of life.
pub(crate) struct RdWsTransport {
    socket: WebSocket,
    ended: bool,
}

impl RdWsTransport {
    pub(crate) fn new(socket: WebSocket) -> Self {
        Self {
            socket,
            ended: false,
        }
    }
}

fn other(err: axum::Error) -> TransportError {
    TransportError::Other(err.to_string())
}

impl Stream for RdWsTransport {
    type Item = Result<WsMessage, TransportError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.ended {
            return Poll::Ready(None);
        }
        let msg = match ready!(Pin::new(&mut self.socket).poll_next(cx)) {
            None => {
                self.ended = true;
                return Poll::Ready(None);
            }
            Some(Err(err)) => return Poll::Ready(Some(Err(other(err)))),
            Some(Ok(msg)) => msg,
        };
        Poll::Ready(match msg {
            Message::Binary(bytes) => Some(Ok(WsMessage::Binary(bytes))),
            Message::Ping(bytes) => Some(Ok(WsMessage::Ping(bytes))),
            Message::Pong(bytes) => Some(Ok(WsMessage::Pong(bytes))),
            // Go ends a session on a text message too.
            Message::Text(_) => Some(Err(TransportError::Other(
                "text message on a remotedialer WebSocket".into(),
            ))),
            Message::Close(_) => {
                self.ended = true;
                None
            }
        })
    }
}

impl Sink<WsMessage> for RdWsTransport {
    type Error = TransportError;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Pin::new(&mut self.socket).poll_ready(cx).map_err(other)
    }

    fn start_send(mut self: Pin<&mut Self>, message: WsMessage) -> Result<(), Self::Error> {
        let message = match message {
            WsMessage::Binary(bytes) => Message::Binary(bytes),
            WsMessage::Ping(bytes) => Message::Ping(bytes),
            WsMessage::Pong(bytes) => Message::Pong(bytes),
            WsMessage::Close { code, reason } => Message::Close(Some(CloseFrame {
                code,
                reason: reason.into(),
            })),
        };
        Pin::new(&mut self.socket)
            .start_send(message)
            .map_err(other)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Pin::new(&mut self.socket).poll_flush(cx).map_err(other)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Pin::new(&mut self.socket).poll_close(cx).map_err(other)
    }
}
