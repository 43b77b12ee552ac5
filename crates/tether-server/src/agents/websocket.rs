//! `AxumMessages`: an upgraded axum `WebSocket` as the multiplexer's message interface
//! (`tether_mux::remotedialer::MessageTransport`: binary messages, pings and pongs, close frames
//! going out), the one adapter of axum's WebSocket, for both wire protocols. When the peer
//! breaks the WebSocket layer the adapter owes it an RFC 6455 close code and a reason (1002
//! protocol error, 1003 text message, 1009 message too big), sent at close unless the layer
//! above sent its own close frame first.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures::{Sink, Stream};
use tether_mux::TransportError;
use tether_mux::remotedialer::WsMessage;

/// RFC 6455 section 7.4.1 status codes the adapter sends.
pub(crate) mod close_code {
    /// The peer broke the WebSocket protocol (reserved bits, unknown opcodes, bad fragments).
    pub(crate) const PROTOCOL_ERROR: u16 = 1002;
    /// A data type this endpoint does not accept: both protocols are binary only.
    pub(crate) const UNSUPPORTED_DATA: u16 = 1003;
    /// A message or frame longer than the route's limit.
    pub(crate) const MESSAGE_TOO_BIG: u16 = 1009;
}

/// A server-side WebSocket as messages. Pings are answered by tungstenite itself; they are
/// still passed on (a remotedialer peer's only sign of life).
pub(crate) struct AxumMessages {
    socket: WebSocket,
    /// The wire protocol's name, for errors and close reasons (`tether.v1`, `remotedialer`).
    protocol: &'static str,
    ended: bool,
    /// The close frame owed to the peer after it broke the WebSocket layer; sent by
    /// `poll_close` before the closing handshake unless a close frame was sent already.
    close: Option<CloseFrame>,
}

impl AxumMessages {
    pub(crate) fn new(socket: WebSocket, protocol: &'static str) -> Self {
        Self {
            socket,
            protocol,
            ended: false,
            close: None,
        }
    }

    /// Turns a read error into the transport's error, keeping the close frame it calls for.
    fn read_error(&mut self, err: axum::Error) -> TransportError {
        let text = err.to_string();
        let inner = err.into_inner();
        if let Some(ws) = inner.downcast_ref::<tungstenite::Error>() {
            self.close = close_for(ws, self.protocol);
        }
        TransportError::Other(text)
    }

    /// A text message: the peer is told the protocol is binary, the session ends.
    fn text_message(&mut self) -> TransportError {
        self.close = Some(CloseFrame {
            code: close_code::UNSUPPORTED_DATA,
            reason: bounded_reason(format!(
                "text messages are not supported: {} frames are binary",
                self.protocol
            ))
            .into(),
        });
        TransportError::Other(format!("text message on a {} WebSocket", self.protocol))
    }
}

/// The close frame for a read error, if the error is the peer's fault at the WebSocket layer
/// (an I/O error or a closed connection gets none: nobody is left to read it).
fn close_for(err: &tungstenite::Error, protocol: &str) -> Option<CloseFrame> {
    let (code, reason) = match err {
        tungstenite::Error::Protocol(err) => (close_code::PROTOCOL_ERROR, err.to_string()),
        tungstenite::Error::Capacity(err) => (close_code::MESSAGE_TOO_BIG, err.to_string()),
        tungstenite::Error::Utf8(_) => (
            close_code::UNSUPPORTED_DATA,
            format!("text messages are not supported on {protocol} (invalid UTF-8 too)"),
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

fn other(err: axum::Error) -> TransportError {
    TransportError::Other(err.to_string())
}

impl Stream for AxumMessages {
    type Item = Result<WsMessage, TransportError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.ended {
            return Poll::Ready(None);
        }
        let next = ready!(Pin::new(&mut self.socket).poll_next(cx));
        let item = match next {
            Some(Ok(Message::Binary(bytes))) => {
                return Poll::Ready(Some(Ok(WsMessage::Binary(bytes))));
            }
            Some(Ok(Message::Ping(bytes))) => return Poll::Ready(Some(Ok(WsMessage::Ping(bytes)))),
            Some(Ok(Message::Pong(bytes))) => return Poll::Ready(Some(Ok(WsMessage::Pong(bytes)))),
            Some(Ok(Message::Text(_))) => Some(Err(self.text_message())),
            Some(Err(err)) => Some(Err(self.read_error(err))),
            Some(Ok(Message::Close(_))) | None => None,
        };
        self.ended = true;
        Poll::Ready(item)
    }
}

impl Sink<WsMessage> for AxumMessages {
    type Error = TransportError;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Pin::new(&mut self.socket).poll_ready(cx).map_err(other)
    }

    fn start_send(mut self: Pin<&mut Self>, message: WsMessage) -> Result<(), Self::Error> {
        let message = match message {
            WsMessage::Binary(bytes) => Message::Binary(bytes),
            WsMessage::Ping(bytes) => Message::Ping(bytes),
            WsMessage::Pong(bytes) => Message::Pong(bytes),
            WsMessage::Close { code, reason } => {
                // The layer above says why itself; nothing is owed any more.
                self.close = None;
                Message::Close(Some(CloseFrame {
                    code,
                    reason: reason.into(),
                }))
            }
        };
        Pin::new(&mut self.socket)
            .start_send(message)
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
        let code = |err: tungstenite::Error| close_for(&err, "tether.v1").map(|frame| frame.code);
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
