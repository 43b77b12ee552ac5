//! `WsTransport`: an upgraded axum `WebSocket` as a `tether_mux::FrameTransport` (one binary
//! message per frame), closing with an RFC 6455 code and a reason when the peer breaks the
//! WebSocket layer (1002 protocol error, 1003 text message, 1009 message too big).

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures::{Sink, Stream};
use tether_mux::TransportError;
use tether_proto::{Frame, Limits};

/// Frames over a server-side WebSocket. Pings are answered by tungstenite itself.
pub(crate) struct WsTransport {
    socket: WebSocket,
    limits: Limits,
    ended: bool,
    /// The close frame owed to the peer after it broke the WebSocket layer; sent by
    /// `poll_close` before the closing handshake (`None` there: an empty close payload).
    close: Option<CloseFrame>,
}

/// RFC 6455 section 7.4.1 status codes sent on this route.
pub(crate) mod close_code {
    /// The peer broke the WebSocket protocol (reserved bits, unknown opcodes, bad fragments).
    pub(crate) const PROTOCOL_ERROR: u16 = 1002;
    /// A data type this endpoint does not accept: tether.v1 is binary only.
    pub(crate) const UNSUPPORTED_DATA: u16 = 1003;
    /// A message or frame longer than the route's limit.
    pub(crate) const MESSAGE_TOO_BIG: u16 = 1009;
}

/// The close frame for a read error, if the error is the peer's fault at the WebSocket layer
/// (an I/O error or a closed connection gets none: nobody is left to read it).
fn close_for(err: &tungstenite::Error) -> Option<CloseFrame> {
    let (code, reason) = match err {
        tungstenite::Error::Protocol(err) => (close_code::PROTOCOL_ERROR, err.to_string()),
        tungstenite::Error::Capacity(err) => (close_code::MESSAGE_TOO_BIG, err.to_string()),
        tungstenite::Error::Utf8(_) => (
            close_code::UNSUPPORTED_DATA,
            "text messages are not supported on tether.v1 (invalid UTF-8 too)".to_owned(),
        ),
        _ => return None,
    };
    Some(CloseFrame {
        code,
        reason: bounded_reason(reason).into(),
    })
}

/// A close reason fits in a control frame: 125 bytes minus the 2-byte code.
fn bounded_reason(mut reason: String) -> String {
    const MAX: usize = 123;
    if reason.len() > MAX {
        let mut end = MAX;
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason.truncate(end);
    }
    reason
}

impl WsTransport {
    pub(crate) fn new(socket: WebSocket, limits: Limits) -> Self {
        Self {
            socket,
            limits,
            ended: false,
            close: None,
        }
    }

    /// Turns a read error into the transport's error, keeping the close frame it calls for.
    fn read_error(&mut self, err: axum::Error) -> TransportError {
        let text = err.to_string();
        let inner = err.into_inner();
        if let Some(ws) = inner.downcast_ref::<tungstenite::Error>() {
            self.close = close_for(ws);
        }
        TransportError::Other(text)
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
                Some(Err(err)) => {
                    self.ended = true;
                    let err = self.read_error(err);
                    return Poll::Ready(Some(Err(err)));
                }
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
                    self.ended = true;
                    self.close = Some(CloseFrame {
                        code: close_code::UNSUPPORTED_DATA,
                        reason: "text messages are not supported: tether.v1 frames are binary"
                            .into(),
                    });
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
        if self.close.is_some() {
            ready!(Pin::new(&mut self.socket).poll_ready(cx)).map_err(other)?;
            if let Some(frame) = self.close.take() {
                Pin::new(&mut self.socket)
                    .start_send(Message::Close(Some(frame)))
                    .map_err(other)?;
            }
        }
        Pin::new(&mut self.socket).poll_close(cx).map_err(other)
    }
}

#[cfg(test)]
mod tests {
    use tungstenite::error::{CapacityError, ProtocolError};

    use super::*;

    #[test]
    fn read_errors_map_to_close_codes() {
        let code = |err: tungstenite::Error| close_for(&err).map(|frame| frame.code);
        assert_eq!(
            code(tungstenite::Error::Protocol(
                ProtocolError::NonZeroReservedBits
            )),
            Some(close_code::PROTOCOL_ERROR)
        );
        assert_eq!(
            code(tungstenite::Error::Capacity(
                CapacityError::MessageTooLong {
                    size: 10,
                    max_size: 5
                }
            )),
            Some(close_code::MESSAGE_TOO_BIG)
        );
        assert_eq!(code(tungstenite::Error::ConnectionClosed), None);
        assert_eq!(
            code(tungstenite::Error::Io(
                std::io::ErrorKind::BrokenPipe.into()
            )),
            None
        );
    }

    #[test]
    fn reasons_fit_a_control_frame_on_a_char_boundary() {
        assert_eq!(bounded_reason("short".into()), "short");
        let long = "é".repeat(100);
        let cut = bounded_reason(long);
        assert!(cut.len() <= 123, "{}", cut.len());
        assert_eq!(cut.len(), 122);
    }
}
