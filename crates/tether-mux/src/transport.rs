//! What a session runs over: a `Sink`/`Stream` of whole frames, and the length-prefixed codec
//! that turns any byte stream (an in-memory duplex pipe, a TCP socket) into one.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::BytesMut;
use futures::{Sink, Stream};
use tether_proto::{Frame, Limits, ProtoError};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::{Decoder, Encoder, Framed};

/// Why the transport under a session failed.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// A message that does not decode as a frame.
    #[error(transparent)]
    Malformed(#[from] ProtoError),
    /// The underlying I/O failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// A transport-specific failure (WebSocket protocol error, text frame...).
    #[error("{0}")]
    Other(String),
}

/// A bidirectional channel of frames. Blanket-implemented for anything that fits.
pub trait FrameTransport:
    Stream<Item = Result<Frame, TransportError>>
    + Sink<Frame, Error = TransportError>
    + Send
    + Unpin
    + 'static
{
}

impl<T> FrameTransport for T where
    T: Stream<Item = Result<Frame, TransportError>>
        + Sink<Frame, Error = TransportError>
        + Send
        + Unpin
        + 'static
{
}

/// `tokio_util` codec for the length-prefixed framing of [`tether_proto::prefixed`].
///
/// Note that a `Framed` stream ends after the first decoding error; [`framed`] uses a codec
/// that reports a malformed frame and carries on instead.
#[derive(Debug, Clone, Copy, Default)]
pub struct PrefixedCodec {
    limits: Limits,
}

impl PrefixedCodec {
    /// A codec enforcing `limits` on decode.
    pub fn new(limits: Limits) -> Self {
        Self { limits }
    }
}

impl Decoder for PrefixedCodec {
    type Item = Frame;
    type Error = TransportError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, TransportError> {
        Ok(tether_proto::prefixed::decode_prefixed(src, &self.limits)?)
    }
}

impl Encoder<Frame> for PrefixedCodec {
    type Error = TransportError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), TransportError> {
        tether_proto::prefixed::encode_prefixed(&frame, dst);
        Ok(())
    }
}

/// Decoder used by [`framed`]: like [`PrefixedCodec`], but a message that was read whole and
/// then failed to decode is handed on as an item, so the stream of frames goes on after it.
#[derive(Debug, Clone, Copy, Default)]
struct LenientCodec {
    limits: Limits,
}

impl Decoder for LenientCodec {
    type Item = Result<Frame, ProtoError>;
    type Error = TransportError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Self::Item>, TransportError> {
        let before = src.len();
        match tether_proto::prefixed::decode_prefixed(src, &self.limits) {
            Ok(frame) => Ok(frame.map(Ok)),
            // The message was consumed: the framing is intact, only this frame is bad.
            Err(err) if src.len() < before => Ok(Some(Err(err))),
            // The length prefix itself is bad: the byte stream cannot be resynchronised.
            Err(err) => Err(err.into()),
        }
    }
}

impl Encoder<Frame> for LenientCodec {
    type Error = TransportError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), TransportError> {
        tether_proto::prefixed::encode_prefixed(&frame, dst);
        Ok(())
    }
}

pin_project_lite::pin_project! {
    /// A byte stream carrying length-prefixed frames, as returned by [`framed`].
    ///
    /// Unlike a bare `Framed<IO, PrefixedCodec>` (which ends its stream after any decoding
    /// error), a malformed frame whose length prefix was sound is reported as
    /// [`TransportError::Malformed`] and the frames after it keep coming, so that the session
    /// can reset just the stream concerned.
    #[derive(Debug)]
    pub struct FramedTransport<IO> {
        #[pin]
        inner: Framed<IO, LenientCodec>,
    }
}

impl<IO> FramedTransport<IO> {
    /// The underlying byte stream.
    pub fn get_ref(&self) -> &IO {
        self.inner.get_ref()
    }

    /// The underlying byte stream, for tests that write raw bytes. Bytes written here bypass
    /// the frames buffered in the sink, so flush it first.
    pub fn get_mut(&mut self) -> &mut IO {
        self.inner.get_mut()
    }

    /// Gives the byte stream back; buffered bytes are lost.
    pub fn into_inner(self) -> IO {
        self.inner.into_inner()
    }
}

impl<IO: AsyncRead> Stream for FramedTransport<IO> {
    type Item = Result<Frame, TransportError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let item = ready!(self.project().inner.poll_next(cx));
        Poll::Ready(item.map(|item| match item {
            Ok(Ok(frame)) => Ok(frame),
            Ok(Err(err)) => Err(TransportError::Malformed(err)),
            Err(err) => Err(err),
        }))
    }
}

impl<IO: AsyncWrite> Sink<Frame> for FramedTransport<IO> {
    type Error = TransportError;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.project().inner.poll_ready(cx)
    }

    fn start_send(self: Pin<&mut Self>, item: Frame) -> Result<(), Self::Error> {
        self.project().inner.start_send(item)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.project().inner.poll_close(cx)
    }
}

/// Wraps a byte stream as a frame transport (length-prefixed frames, see [`FramedTransport`]).
pub fn framed<IO>(io: IO, limits: Limits) -> FramedTransport<IO>
where
    IO: AsyncRead + AsyncWrite,
{
    FramedTransport {
        inner: Framed::with_capacity(io, LenientCodec { limits }, 128 * 1024),
    }
}

/// Object-safe view of a transport so the session driver is not generic.
pub(crate) trait FrameTransportObj:
    Stream<Item = Result<Frame, TransportError>> + Sink<Frame, Error = TransportError> + Send + Unpin
{
}

impl<T: FrameTransport> FrameTransportObj for T {}
