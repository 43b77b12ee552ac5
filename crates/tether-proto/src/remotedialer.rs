//! The rancher/remotedialer framing: one tunnel message per WebSocket binary message, a zig-zag
//! varint header (`id`, `connID`, `type`, and for Data and Connect an obsolete deadline), and a
//! type-dependent body with Go's read limits.
//!
//! Sans-IO like the rest of this crate. The session layer that maps these messages onto tether
//! streams lives in `tether-mux` (`tether_mux::remotedialer`).

use bytes::{BufMut, Bytes, BytesMut};

use crate::error::{ProtoError, ProtoErrorKind};
use crate::varint::{get_varint, put_varint};

/// The deadline value every Go sender writes for Data and Connect (it is read and discarded).
pub const LEGACY_DEADLINE_MS: i64 = 15_000;
/// The most Connect body bytes a current Go receiver reads (`proto/address`).
pub const MAX_CONNECT_LEN: usize = 266;
/// The most Error, AddClient and RemoveClient body bytes a Go receiver reads.
pub const MAX_ERROR_LEN: usize = 100;
/// The Error text that means a clean close.
pub const EOF_MESSAGE: &str = "EOF";
/// Default largest Data payload accepted on decode (Go usually writes 32 KiB).
pub const DEFAULT_MAX_DATA: usize = 1024 * 1024;

/// Message type numbers (`iota + 1` in Go).
pub mod msg_type {
    /// Bytes of a connection.
    pub const DATA: i64 = 1;
    /// Open a connection to `proto/address`.
    pub const CONNECT: i64 = 2;
    /// Close a connection; `EOF` is a clean close.
    pub const ERROR: i64 = 3;
    /// Peer sessions: a client key became reachable.
    pub const ADD_CLIENT: i64 = 4;
    /// Peer sessions: a client key went away.
    pub const REMOVE_CLIENT: i64 = 5;
    /// Stop sending Data on this connection.
    pub const PAUSE: i64 = 6;
    /// Data may flow again.
    pub const RESUME: i64 = 7;
    /// The client's live connection ids (LE u64, sorted).
    pub const SYNC_CONNECTIONS: i64 = 8;
}

/// One remotedialer tunnel message (without the header's message counter).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RdMessage {
    /// Bytes of connection `conn`.
    Data {
        /// Connection id.
        conn: u64,
        /// The bytes.
        payload: Bytes,
    },
    /// Open connection `conn` to `proto/address`.
    Connect {
        /// Connection id.
        conn: u64,
        /// The protocol before the first `/` (Go sends `tcp`).
        proto: String,
        /// Everything after the first `/` (`host:port`).
        address: String,
    },
    /// Close connection `conn` with `message` (`EOF` is a clean close).
    Error {
        /// Connection id.
        conn: u64,
        /// Error text, at most [`MAX_ERROR_LEN`] bytes on the wire.
        message: String,
    },
    /// Peer sessions only: `clientKey/sessionKey` became reachable.
    AddClient {
        /// `clientKey/sessionKey`.
        key: String,
    },
    /// Peer sessions only: `clientKey/sessionKey` went away.
    RemoveClient {
        /// `clientKey/sessionKey`.
        key: String,
    },
    /// Ask the peer to stop sending Data on `conn`.
    Pause {
        /// Connection id.
        conn: u64,
    },
    /// Lift a Pause on `conn`.
    Resume {
        /// Connection id.
        conn: u64,
    },
    /// The sender's live connection ids, ascending.
    SyncConnections {
        /// Connection ids.
        conns: Vec<u64>,
    },
    /// A type this implementation does not know; ignored like Go does.
    Unknown {
        /// The type number.
        msg_type: i64,
        /// Connection id.
        conn: u64,
    },
}

impl RdMessage {
    /// The type number on the wire.
    pub fn msg_type(&self) -> i64 {
        match self {
            RdMessage::Data { .. } => msg_type::DATA,
            RdMessage::Connect { .. } => msg_type::CONNECT,
            RdMessage::Error { .. } => msg_type::ERROR,
            RdMessage::AddClient { .. } => msg_type::ADD_CLIENT,
            RdMessage::RemoveClient { .. } => msg_type::REMOVE_CLIENT,
            RdMessage::Pause { .. } => msg_type::PAUSE,
            RdMessage::Resume { .. } => msg_type::RESUME,
            RdMessage::SyncConnections { .. } => msg_type::SYNC_CONNECTIONS,
            RdMessage::Unknown { msg_type, .. } => *msg_type,
        }
    }

    /// The connection id in the header (0 for session messages).
    pub fn conn(&self) -> u64 {
        match self {
            RdMessage::Data { conn, .. }
            | RdMessage::Connect { conn, .. }
            | RdMessage::Error { conn, .. }
            | RdMessage::Pause { conn }
            | RdMessage::Resume { conn }
            | RdMessage::Unknown { conn, .. } => *conn,
            RdMessage::AddClient { .. }
            | RdMessage::RemoveClient { .. }
            | RdMessage::SyncConnections { .. } => 0,
        }
    }

    /// An Error message for `conn`, its text cut to [`MAX_ERROR_LEN`] bytes.
    pub fn error(conn: u64, message: &str) -> Self {
        RdMessage::Error {
            conn,
            message: clamp(message, MAX_ERROR_LEN).to_owned(),
        }
    }
}

/// Decoder limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RdLimits {
    /// Largest Data payload accepted.
    pub max_data: usize,
}

impl Default for RdLimits {
    fn default() -> Self {
        Self {
            max_data: DEFAULT_MAX_DATA,
        }
    }
}

/// A decoded message and the sender's message counter (which receivers only log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    /// The sender's message counter.
    pub id: i64,
    /// The message.
    pub message: RdMessage,
}

/// Appends `value` as a Go `binary.PutVarint` (zig-zag, then unsigned LEB128).
pub fn put_signed_varint(dst: &mut impl BufMut, value: i64) {
    let zigzag = ((value << 1) ^ (value >> 63)) as u64;
    put_varint(dst, zigzag);
}

/// Reads a Go `binary.ReadVarint` from the front of `src`: the value and the bytes consumed.
pub fn get_signed_varint(src: &[u8]) -> Result<(i64, usize), ProtoErrorKind> {
    let (zigzag, used) = get_varint(src)?;
    let value = ((zigzag >> 1) as i64) ^ -((zigzag & 1) as i64);
    Ok((value, used))
}

/// Cuts `text` to at most `max` bytes on a character boundary.
pub fn clamp(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Encodes `message` with message counter `id` as one WebSocket binary message.
///
/// Error texts are cut to [`MAX_ERROR_LEN`] bytes. A Connect body longer than
/// [`MAX_CONNECT_LEN`] is written whole (a Go receiver would truncate it); callers refuse such
/// targets before they get here.
pub fn encode(id: i64, message: &RdMessage, dst: &mut BytesMut) {
    put_signed_varint(dst, id);
    put_signed_varint(dst, message.conn() as i64);
    put_signed_varint(dst, message.msg_type());
    match message {
        RdMessage::Data { payload, .. } => {
            put_signed_varint(dst, LEGACY_DEADLINE_MS);
            dst.put_slice(payload);
        }
        RdMessage::Connect { proto, address, .. } => {
            put_signed_varint(dst, LEGACY_DEADLINE_MS);
            dst.put_slice(proto.as_bytes());
            dst.put_u8(b'/');
            dst.put_slice(address.as_bytes());
        }
        RdMessage::Error { message, .. } => {
            dst.put_slice(clamp(message, MAX_ERROR_LEN).as_bytes());
        }
        RdMessage::AddClient { key } | RdMessage::RemoveClient { key } => {
            dst.put_slice(clamp(key, MAX_ERROR_LEN).as_bytes());
        }
        RdMessage::SyncConnections { conns } => {
            for conn in conns {
                dst.put_u64_le(*conn);
            }
        }
        RdMessage::Pause { .. } | RdMessage::Resume { .. } | RdMessage::Unknown { .. } => {}
    }
}

/// Encodes into a fresh buffer.
pub fn encode_to_bytes(id: i64, message: &RdMessage) -> Bytes {
    let mut dst = BytesMut::new();
    encode(id, message, &mut dst);
    dst.freeze()
}

/// Decodes one whole WebSocket binary message.
///
/// Errors carry the connection id once the header was read, so that a receiver can answer that
/// connection alone. Error bodies longer than Go's limit are cut to it, as Go reads them;
/// Connect bodies over [`MAX_CONNECT_LEN`] and Data over `limits.max_data` are refused.
pub fn decode(src: &[u8], limits: &RdLimits) -> Result<Decoded, ProtoError> {
    if src.is_empty() {
        return Err(bare(ProtoErrorKind::Empty));
    }
    let (id, a) = get_signed_varint(src).map_err(bare)?;
    let (conn, b) = get_signed_varint(&src[a..]).map_err(bare)?;
    let conn = u64::try_from(conn).map_err(|_| bare(ProtoErrorKind::OutOfRange("connID")))?;
    let (kind, c) = get_signed_varint(&src[a + b..]).map_err(|k| with_conn(k, None, conn))?;
    let type_byte = u8::try_from(kind).ok();
    let err = |k: ProtoErrorKind| with_conn(k, type_byte, conn);
    let mut body = &src[a + b + c..];
    if kind == msg_type::DATA || kind == msg_type::CONNECT {
        let (_deadline, used) = get_signed_varint(body).map_err(err)?;
        body = &body[used..];
    }
    let message = match kind {
        msg_type::DATA => {
            if body.len() > limits.max_data {
                return Err(err(ProtoErrorKind::TooLarge {
                    what: "Data payload",
                    len: body.len() as u64,
                    max: limits.max_data as u64,
                }));
            }
            RdMessage::Data {
                conn,
                payload: Bytes::copy_from_slice(body),
            }
        }
        msg_type::CONNECT => {
            if body.len() > MAX_CONNECT_LEN {
                return Err(err(ProtoErrorKind::TooLarge {
                    what: "Connect body",
                    len: body.len() as u64,
                    max: MAX_CONNECT_LEN as u64,
                }));
            }
            let body = std::str::from_utf8(body)
                .map_err(|_| err(ProtoErrorKind::OutOfRange("Connect body (not UTF-8)")))?;
            let Some((proto, address)) = body.split_once('/') else {
                return Err(err(ProtoErrorKind::OutOfRange("Connect body (no '/')")));
            };
            RdMessage::Connect {
                conn,
                proto: proto.to_owned(),
                address: address.to_owned(),
            }
        }
        msg_type::ERROR => RdMessage::Error {
            conn,
            message: lossy(body, MAX_ERROR_LEN),
        },
        msg_type::ADD_CLIENT => RdMessage::AddClient {
            key: lossy(body, MAX_ERROR_LEN),
        },
        msg_type::REMOVE_CLIENT => RdMessage::RemoveClient {
            key: lossy(body, MAX_ERROR_LEN),
        },
        msg_type::PAUSE => RdMessage::Pause { conn },
        msg_type::RESUME => RdMessage::Resume { conn },
        msg_type::SYNC_CONNECTIONS => {
            if body.len() % 8 != 0 {
                return Err(err(ProtoErrorKind::OutOfRange(
                    "SyncConnections length (not a multiple of 8)",
                )));
            }
            let conns = body
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                .collect();
            RdMessage::SyncConnections { conns }
        }
        other => RdMessage::Unknown {
            msg_type: other,
            conn,
        },
    };
    Ok(Decoded { id, message })
}

/// Go reads at most `max` bytes of these texts; a character cut by the limit is dropped, and
/// bytes that are not UTF-8 are replaced (an error text is for humans).
fn lossy(body: &[u8], max: usize) -> String {
    let cut = &body[..body.len().min(max)];
    match std::str::from_utf8(cut) {
        Ok(text) => text.to_owned(),
        Err(e) if e.error_len().is_none() => {
            String::from_utf8_lossy(&cut[..e.valid_up_to()]).into_owned()
        }
        Err(_) => String::from_utf8_lossy(cut).into_owned(),
    }
}

fn bare(kind: ProtoErrorKind) -> ProtoError {
    ProtoError::bare(kind)
}

fn with_conn(kind: ProtoErrorKind, frame_type: Option<u8>, conn: u64) -> ProtoError {
    ProtoError {
        kind,
        frame_type,
        stream: Some(conn),
    }
}
