//! `TetherFraming`: the tether.v1 framing over any message transport — one binary message per
//! frame, decoded with the session's limits; pings and pongs skipped (the WebSocket library
//! answers pings itself). With [`AxumMessages`](crate::agents::websocket::AxumMessages) under
//! it, a server-side WebSocket becomes a `tether_mux::FrameTransport`.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use futures::{Sink, Stream};
use tether_mux::TransportError;
use tether_mux::remotedialer::{MessageTransport, WsMessage};
use tether_proto::{Frame, Limits};

/// tether.v1 frames over messages.
pub(crate) struct TetherFraming<M> {
    messages: M,
    limits: Limits,
}

impl<M: MessageTransport> TetherFraming<M> {
    /// Frames over `messages`; `limits` must match the session's `MuxConfig::limits()`.
    pub(crate) fn new(messages: M, limits: Limits) -> Self {
        Self { messages, limits }
    }
}

impl<M: MessageTransport> Stream for TetherFraming<M> {
    type Item = Result<Frame, TransportError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            let message = ready!(Pin::new(&mut self.messages).poll_next(cx));
            return Poll::Ready(match message {
                Some(Ok(WsMessage::Binary(bytes))) => Some(
                    tether_proto::decode(&bytes, &self.limits).map_err(TransportError::Malformed),
                ),
                Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => continue,
                // Only ever sent; a peer's close frame ends the message stream instead.
                Some(Ok(WsMessage::Close { .. })) | None => None,
                Some(Err(err)) => Some(Err(err)),
            });
        }
    }
}

impl<M: MessageTransport> Sink<Frame> for TetherFraming<M> {
    type Error = TransportError;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Pin::new(&mut self.messages).poll_ready(cx)
    }

    fn start_send(mut self: Pin<&mut Self>, frame: Frame) -> Result<(), Self::Error> {
        let bytes = tether_proto::codec::encode_to_bytes(&frame);
        Pin::new(&mut self.messages).start_send(WsMessage::Binary(bytes))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Pin::new(&mut self.messages).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Pin::new(&mut self.messages).poll_close(cx)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::collections::VecDeque;

    use bytes::Bytes;
    use futures::{SinkExt, StreamExt};

    use super::*;

    /// Messages in memory: `inbound` is read, `outbound` collects what is written.
    #[derive(Default)]
    struct Memory {
        inbound: VecDeque<WsMessage>,
        outbound: Vec<WsMessage>,
    }

    impl Stream for Memory {
        type Item = Result<WsMessage, TransportError>;

        fn poll_next(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            Poll::Ready(self.inbound.pop_front().map(Ok))
        }
    }

    impl Sink<WsMessage> for Memory {
        type Error = TransportError;

        fn poll_ready(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn start_send(mut self: Pin<&mut Self>, item: WsMessage) -> Result<(), Self::Error> {
            self.outbound.push(item);
            Ok(())
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn frames_travel_as_binary_messages_and_pings_are_skipped() {
        let ping = Frame::Ping { nonce: 7 };
        let encoded = tether_proto::codec::encode_to_bytes(&ping);
        let memory = Memory {
            inbound: VecDeque::from([
                WsMessage::Ping(Bytes::from_static(b"hi")),
                WsMessage::Binary(encoded.clone()),
                WsMessage::Pong(Bytes::new()),
                WsMessage::Binary(Bytes::from_static(&[0xff])),
            ]),
            outbound: Vec::new(),
        };
        let mut framing = TetherFraming::new(memory, Limits::default());
        assert_eq!(framing.next().await.unwrap().unwrap(), ping);
        assert!(matches!(
            framing.next().await,
            Some(Err(TransportError::Malformed(_)))
        ));
        assert!(framing.next().await.is_none());
        framing.send(Frame::Pong { nonce: 7 }).await.unwrap();
        let pong = tether_proto::codec::encode_to_bytes(&Frame::Pong { nonce: 7 });
        assert_eq!(framing.messages.outbound, [WsMessage::Binary(pong)]);
    }
}
