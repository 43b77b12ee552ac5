//! The frames of tether.v1 and their error codes (DESIGN.md section 3).

use bytes::Bytes;

use crate::target::TargetAddr;

/// A stream id. 0 is the session itself; the server opens odd ids, the agent even ones.
pub type StreamId = u64;

/// Longest message text carried by OPEN_ERR, RST and GOAWAY.
pub const MAX_MESSAGE_LEN: usize = 256;

/// The type byte of each frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameType {
    /// Open a stream.
    Open = 1,
    /// The target is connected.
    OpenOk = 2,
    /// The open failed.
    OpenErr = 3,
    /// Stream bytes.
    Data = 4,
    /// Flow-control credit.
    Window = 5,
    /// Half-close.
    Fin = 6,
    /// Abort.
    Rst = 7,
    /// Liveness probe.
    Ping = 8,
    /// Liveness answer.
    Pong = 9,
    /// Stream reconciliation.
    Sync = 10,
    /// Draining.
    GoAway = 11,
}

impl FrameType {
    /// The frame type for a type byte, `None` when unknown.
    pub fn from_u8(byte: u8) -> Option<Self> {
        Some(match byte {
            1 => Self::Open,
            2 => Self::OpenOk,
            3 => Self::OpenErr,
            4 => Self::Data,
            5 => Self::Window,
            6 => Self::Fin,
            7 => Self::Rst,
            8 => Self::Ping,
            9 => Self::Pong,
            10 => Self::Sync,
            11 => Self::GoAway,
            _ => return None,
        })
    }
}

macro_rules! wire_code {
    (
        $(#[$meta:meta])*
        $name:ident { $( $(#[$vmeta:meta])* $variant:ident = $value:literal => $label:literal ),+ $(,)? }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $( $(#[$vmeta])* $variant, )+
            /// A code this version does not know; kept so that it can be relayed.
            Other(u8),
        }

        impl $name {
            /// The wire byte.
            pub fn to_u8(self) -> u8 {
                match self {
                    $( Self::$variant => $value, )+
                    Self::Other(code) => code,
                }
            }

            /// The code for a wire byte.
            pub fn from_u8(byte: u8) -> Self {
                match byte {
                    $( $value => Self::$variant, )+
                    other => Self::Other(other),
                }
            }

            /// A short label from a closed set, for metrics and logs.
            pub fn label(self) -> &'static str {
                match self {
                    $( Self::$variant => $label, )+
                    Self::Other(_) => "other",
                }
            }
        }
    };
}

wire_code! {
    /// Why an OPEN failed.
    OpenErrorCode {
        /// The far side's policy refused the target.
        Denied = 1 => "denied",
        /// The host name did not resolve.
        ResolveFailed = 2 => "resolve_failed",
        /// The target refused the connection.
        Refused = 3 => "refused",
        /// The dial timed out.
        TimedOut = 4 => "timed_out",
        /// No route to the target.
        Unreachable = 5 => "unreachable",
        /// The target form or protocol is not supported.
        Unsupported = 6 => "unsupported",
        /// The far side is draining and takes no new streams.
        Draining = 7 => "draining",
        /// The far side's stream limit is reached.
        Limit = 8 => "limit",
        /// Any other local failure.
        Internal = 9 => "internal",
    }
}

wire_code! {
    /// Why a stream was reset.
    ResetCode {
        /// The local handle was dropped before the stream finished.
        Cancelled = 1 => "cancelled",
        /// The target connection was reset.
        TargetReset = 2 => "target_reset",
        /// The peer sent more than its window.
        FlowControl = 3 => "flow_control",
        /// A malformed or unexpected frame on this stream.
        Protocol = 4 => "protocol",
        /// The stream was idle too long.
        Timeout = 5 => "timeout",
        /// The stream id is not known here.
        UnknownStream = 6 => "unknown_stream",
        /// The session is closing.
        SessionClosing = 7 => "session_closing",
        /// Any other local failure.
        Internal = 8 => "internal",
    }
}

wire_code! {
    /// Why a peer is going away.
    GoAwayCode {
        /// Planned shutdown or restart.
        Shutdown = 1 => "shutdown",
        /// This session was replaced by a newer one.
        Replaced = 2 => "replaced",
        /// A protocol error ended the session.
        Protocol = 3 => "protocol",
        /// The peer was not idle-healthy (missed pings).
        Timeout = 4 => "timeout",
        /// The agent's activation gate closed.
        Disabled = 5 => "disabled",
        /// This server replica is going away (restart, scale-down); the fleet is not: keep
        /// the sessions to other replicas and come back to this one when it is up again.
        Restart = 6 => "restart",
        /// The peer's certificate or identity is no longer accepted (revoked, its CA removed,
        /// its id no longer allowed).
        Revoked = 7 => "revoked",
    }
}

/// One tether.v1 frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Open `stream` to `target`; the opener can receive `window` bytes before a WINDOW.
    Open {
        /// New stream id (server odd, agent even).
        stream: StreamId,
        /// The opener's initial receive window.
        window: u32,
        /// How long the far side may spend dialing.
        timeout_ms: u32,
        /// Where to connect.
        target: TargetAddr,
    },
    /// The target is connected; the acceptor can receive `window` bytes.
    OpenOk {
        /// The stream.
        stream: StreamId,
        /// The acceptor's initial receive window.
        window: u32,
    },
    /// The open failed.
    OpenErr {
        /// The stream.
        stream: StreamId,
        /// Why.
        code: OpenErrorCode,
        /// Human-readable detail (at most [`MAX_MESSAGE_LEN`] bytes).
        message: String,
    },
    /// Bytes of a stream.
    Data {
        /// The stream.
        stream: StreamId,
        /// The bytes; never more than the receiver's remaining window.
        payload: Bytes,
    },
    /// The receiver consumed `increment` bytes; the sender may send that many more.
    Window {
        /// The stream.
        stream: StreamId,
        /// Credit granted.
        increment: u32,
    },
    /// The sender will send no more DATA on this stream.
    Fin {
        /// The stream.
        stream: StreamId,
    },
    /// Abort both directions of a stream.
    Rst {
        /// The stream.
        stream: StreamId,
        /// Why.
        code: ResetCode,
        /// Human-readable detail (at most [`MAX_MESSAGE_LEN`] bytes).
        message: String,
    },
    /// Liveness probe, answered by PONG with the same nonce.
    Ping {
        /// Echoed back.
        nonce: u64,
    },
    /// Answer to PING.
    Pong {
        /// The PING's nonce.
        nonce: u64,
    },
    /// The receiver resets its streams with id <= `high` that are not in `open`.
    Sync {
        /// The highest id this reconciliation covers.
        high: StreamId,
        /// The sender's open stream ids, strictly ascending.
        open: Vec<StreamId>,
    },
    /// The sender is draining: no new OPEN; existing streams finish.
    GoAway {
        /// Why.
        code: GoAwayCode,
        /// Human-readable detail (at most [`MAX_MESSAGE_LEN`] bytes).
        message: String,
    },
    /// A frame type this version does not know; receivers ignore it.
    Unknown {
        /// The type byte.
        frame_type: u8,
        /// The stream id from the header.
        stream: StreamId,
    },
}

impl Frame {
    /// The stream this frame belongs to (0 for session frames).
    pub fn stream(&self) -> StreamId {
        match self {
            Frame::Open { stream, .. }
            | Frame::OpenOk { stream, .. }
            | Frame::OpenErr { stream, .. }
            | Frame::Data { stream, .. }
            | Frame::Window { stream, .. }
            | Frame::Fin { stream }
            | Frame::Rst { stream, .. }
            | Frame::Unknown { stream, .. } => *stream,
            Frame::Ping { .. } | Frame::Pong { .. } | Frame::Sync { .. } | Frame::GoAway { .. } => {
                0
            }
        }
    }

    /// The type byte.
    pub fn type_byte(&self) -> u8 {
        match self {
            Frame::Open { .. } => FrameType::Open as u8,
            Frame::OpenOk { .. } => FrameType::OpenOk as u8,
            Frame::OpenErr { .. } => FrameType::OpenErr as u8,
            Frame::Data { .. } => FrameType::Data as u8,
            Frame::Window { .. } => FrameType::Window as u8,
            Frame::Fin { .. } => FrameType::Fin as u8,
            Frame::Rst { .. } => FrameType::Rst as u8,
            Frame::Ping { .. } => FrameType::Ping as u8,
            Frame::Pong { .. } => FrameType::Pong as u8,
            Frame::Sync { .. } => FrameType::Sync as u8,
            Frame::GoAway { .. } => FrameType::GoAway as u8,
            Frame::Unknown { frame_type, .. } => *frame_type,
        }
    }
}

/// Cuts `message` to at most [`MAX_MESSAGE_LEN`] bytes on a character boundary.
pub fn clamp_message(message: &str) -> &str {
    if message.len() <= MAX_MESSAGE_LEN {
        return message;
    }
    let mut end = MAX_MESSAGE_LEN;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    &message[..end]
}
