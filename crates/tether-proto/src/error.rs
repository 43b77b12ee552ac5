//! Typed decoding errors: what was wrong with a frame, and which stream it belongs to.

use crate::frame::StreamId;
use crate::target::TargetError;

/// What was wrong with a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoErrorKind {
    /// The input ended inside a field.
    #[error("frame truncated")]
    Truncated,
    /// An empty message: not even a type byte.
    #[error("empty frame")]
    Empty,
    /// A varint longer than ten bytes or above `u64::MAX`.
    #[error("varint overflows 64 bits")]
    VarintOverflow,
    /// A length that exceeds the configured maximum.
    #[error("{what} of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Which field or unit was too large.
        what: &'static str,
        /// The length found (or claimed) on the wire.
        len: u64,
        /// The configured maximum.
        max: u64,
    },
    /// Bytes left over after a fixed-size body.
    #[error("{0} unexpected trailing bytes")]
    TrailingBytes(usize),
    /// A field value outside its range.
    #[error("field {0} out of range")]
    OutOfRange(&'static str),
    /// A session frame (PING, PONG, SYNC, GOAWAY) on a stream other than 0.
    #[error("session frame on stream {0}")]
    SessionFrameOnStream(StreamId),
    /// A stream frame on stream 0.
    #[error("stream frame on stream 0")]
    StreamFrameOnSession,
    /// SYNC ids not strictly ascending.
    #[error("SYNC ids are not strictly ascending")]
    SyncNotSorted,
    /// The OPEN target is not a valid `tcp/host:port`.
    #[error("bad target: {0}")]
    BadTarget(#[from] TargetError),
}

impl ProtoErrorKind {
    /// A short label from a closed set, for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Truncated => "truncated",
            Self::Empty => "empty",
            Self::VarintOverflow => "varint_overflow",
            Self::TooLarge { .. } => "too_large",
            Self::TrailingBytes(_) => "trailing_bytes",
            Self::OutOfRange(_) => "out_of_range",
            Self::SessionFrameOnStream(_) => "session_frame_on_stream",
            Self::StreamFrameOnSession => "stream_frame_on_session",
            Self::SyncNotSorted => "sync_not_sorted",
            Self::BadTarget(_) => "bad_target",
        }
    }
}

/// A frame that could not be decoded, with as much context as was readable.
///
/// `stream` is set once the header was read, so that a receiver can reset just that stream
/// instead of ending the whole session.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed frame (type {frame_type:?}, stream {stream:?}): {kind}")]
pub struct ProtoError {
    /// What was wrong.
    pub kind: ProtoErrorKind,
    /// The frame type byte, if it was read.
    pub frame_type: Option<u8>,
    /// The stream id, if the header was read.
    pub stream: Option<StreamId>,
}

impl ProtoError {
    pub(crate) fn bare(kind: ProtoErrorKind) -> Self {
        Self {
            kind,
            frame_type: None,
            stream: None,
        }
    }
}
