//! `WsTransport`: an upgraded axum `WebSocket` as a `tether_mux::FrameTransport` (one binary
//! message per frame).

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use axum::extract::ws::{Message, WebSocket};
use futures::{Sink, Stream};
use tether_mux::TransportError;
use tether_proto::{Frame, Limits};

/// Frames over a server-side WebSocket. Pings are answered by tungstenite itself.
pub(crate) struct WsTransport {
    socket: WebSocket,
    limits: Limits,
    ended: bool,
}

impl WsTransport {
    pub(crate) fn new(socket: WebSocket, limits: Limits) -> Self {
        Self {
            socket,
            limits,
            ended: false,
        }
    }
}

fn other(err: axum::Error) -> TransportError {
    TransportError::Other(err.to_string())
}

impl Stream for WsTransport {
    type Item = Result<Frame, TransportError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
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
            match msg {
                Message::Binary(bytes) => {
                    let frame = tether_proto::decode(&bytes, &self.limits)
                        .map_err(TransportError::Malformed);
                    return Poll::Ready(Some(frame));
                }
                Message::Ping(_) | Message::Pong(_) => {}
                Message::Text(_) => {
                    return Poll::Ready(Some(Err(TransportError::Other("text frame".into()))));
                }
                Message::Close(_) => {
                    self.ended = true;
                    return Poll::Ready(None);
                }
            }
        }
    }
}

impl Sink<Frame> for WsTransport {
    type Error = TransportError;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Pin::new(&mut self.socket).poll_ready(cx).map_err(other)
    }

    fn start_send(mut self: Pin<&mut Self>, frame: Frame) -> Result<(), Self::Error> {
        let bytes = tether_proto::codec::encode_to_bytes(&frame);
        Pin::new(&mut self.socket)
            .start_send(Message::Binary(bytes))
            .map_err(other)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Pin::new(&mut self.socket).poll_flush(cx).map_err(other)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Pin::new(&mut self.socket).poll_close(cx).map_err(other)
    }
}
