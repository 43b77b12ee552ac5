//! What a session runs over: a `Sink`/`Stream` of whole frames, and the length-prefixed codec
//! that turns any byte stream (an in-memory duplex pipe, a TCP socket) into one.

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

/// Wraps a byte stream as a frame transport.
pub fn framed<IO>(io: IO, limits: Limits) -> Framed<IO, PrefixedCodec>
where
    IO: AsyncRead + AsyncWrite,
{
    Framed::with_capacity(io, PrefixedCodec::new(limits), 128 * 1024)
}
