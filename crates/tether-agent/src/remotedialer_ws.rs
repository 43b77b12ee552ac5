//! `RdWsClient`: a tokio-tungstenite `WebSocketStream` as a
//! `tether_mux::remotedialer::MessageTransport` (binary messages, pings and pongs; close frames
//! with a code going out), for `protocol: remotedialer`.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use futures::{Sink, Stream};
use tether_mux::TransportError;
use tether_mux::remotedialer::WsMessage;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

/// WebSocket messages to and from a remotedialer server. tungstenite answers the server's
/// pings itself; pongs carry the multiplexer's ping nonces back.
#[derive(Debug)]
pub struct RdWsClient<S> {
    socket: WebSocketStream<S>,
    ended: bool,
}

impl<S> RdWsClient<S> {
    /// Wraps an upgraded socket.
    pub fn new(socket: WebSocketStream<S>) -> Self {
        Self {
            socket,
            ended: false,
        }
    }
}

fn transport_error(err: WsError) -> TransportError {
    match err {
        WsError::Io(err) => TransportError::Io(err),
        other => TransportError::Other(other.to_string()),
    }
}

impl<S> Stream for RdWsClient<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    type Item = Result<WsMessage, TransportError>;

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
            return Poll::Ready(Some(Ok(match msg {
                Message::Binary(bytes) => WsMessage::Binary(bytes),
                Message::Ping(bytes) => WsMessage::Ping(bytes),
                Message::Pong(bytes) => WsMessage::Pong(bytes),
                Message::Frame(_) => continue,
                Message::Text(_) => {
                    return Poll::Ready(Some(Err(TransportError::Other(
                        "text message on a remotedialer WebSocket".into(),
                    ))));
                }
                Message::Close(_) => {
                    self.ended = true;
                    return Poll::Ready(None);
                }
            })));
        }
    }
}

impl<S> Sink<WsMessage> for RdWsClient<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    type Error = TransportError;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Pin::new(&mut self.socket)
            .poll_ready(cx)
            .map_err(transport_error)
    }

    fn start_send(mut self: Pin<&mut Self>, message: WsMessage) -> Result<(), Self::Error> {
        let message = match message {
            WsMessage::Binary(bytes) => Message::Binary(bytes),
            WsMessage::Ping(bytes) => Message::Ping(bytes),
            WsMessage::Pong(bytes) => Message::Pong(bytes),
            WsMessage::Close { code, reason } => Message::Close(Some(CloseFrame {
                code: code.into(),
                reason: reason.into(),
            })),
        };
        Pin::new(&mut self.socket)
            .start_send(message)
            .map_err(transport_error)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Pin::new(&mut self.socket)
            .poll_flush(cx)
            .map_err(transport_error)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        match ready!(Pin::new(&mut self.socket).poll_close(cx)) {
            Ok(()) | Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => Poll::Ready(Ok(())),
            Err(err) => Poll::Ready(Err(transport_error(err))),
        }
    }
}
