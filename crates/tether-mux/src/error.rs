//! Errors of the multiplexer: why an open failed, and why a session ended.

use tether_proto::{OpenErrorCode, ProtoError};

use crate::transport::TransportError;

/// Why [`Session::open`](crate::Session::open) failed.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The far side answered OPEN_ERR.
    #[error("open refused by peer ({}): {message}", code.label())]
    Refused {
        /// The code from OPEN_ERR.
        code: OpenErrorCode,
        /// The message from OPEN_ERR.
        message: String,
    },
    /// No answer within the dial timeout plus grace.
    #[error("no answer to OPEN within {0:?}")]
    Timeout(std::time::Duration),
    /// This side's stream cap is reached.
    #[error("session stream limit reached")]
    Limit,
    /// The peer sent GOAWAY, or this side is draining.
    #[error("session is draining")]
    Draining,
    /// The peer reset the stream before answering.
    #[error("stream reset before it opened")]
    Reset,
    /// The session is closed.
    #[error("session closed")]
    SessionClosed,
}

impl OpenError {
    /// A label from a closed set, for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            OpenError::Refused { code, .. } => code.label(),
            OpenError::Timeout(_) => "timed_out",
            OpenError::Limit => "limit",
            OpenError::Draining => "draining",
            OpenError::Reset => "reset",
            OpenError::SessionClosed => "session_closed",
        }
    }
}

/// Why a session ended.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SessionEnd {
    /// This side closed it (all handles dropped, or `close()`).
    #[error("closed locally")]
    Local,
    /// The peer closed the transport cleanly.
    #[error("closed by peer")]
    PeerClosed,
    /// No frame arrived within the idle timeout.
    #[error("no frame from peer within the idle timeout")]
    IdleTimeout,
    /// The peer sent a frame that could not be attributed to a stream, or broke the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The transport failed.
    #[error("transport error: {0}")]
    Transport(String),
}

impl SessionEnd {
    /// Whether the peer may still read what this side writes after the end: not after an
    /// idle timeout (it is silent, perhaps gone). A transport error may still leave the write
    /// side working (a WebSocket message of the wrong kind is answered with a close code).
    pub(crate) fn peer_may_read(&self) -> bool {
        !matches!(self, SessionEnd::IdleTimeout)
    }

    /// A label from a closed set, for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            SessionEnd::Local => "local",
            SessionEnd::PeerClosed => "peer_closed",
            SessionEnd::IdleTimeout => "idle_timeout",
            SessionEnd::Protocol(_) => "protocol",
            SessionEnd::Transport(_) => "transport",
        }
    }
}

impl From<ProtoError> for SessionEnd {
    fn from(err: ProtoError) -> Self {
        SessionEnd::Protocol(err.to_string())
    }
}

impl From<TransportError> for SessionEnd {
    fn from(err: TransportError) -> Self {
        match err {
            TransportError::Malformed(err) => err.into(),
            other => SessionEnd::Transport(other.to_string()),
        }
    }
}
