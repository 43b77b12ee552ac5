//! Encoding and decoding of one tether.v1 frame per message: `type: u8`, `stream: varint`, body.

use bytes::{BufMut, Bytes, BytesMut};

use crate::error::{ProtoError, ProtoErrorKind};
use crate::frame::{
    Frame, FrameType, GoAwayCode, MAX_MESSAGE_LEN, OpenErrorCode, ResetCode, StreamId,
    clamp_message,
};
use crate::target::{MAX_TARGET_LEN, TargetAddr};
use crate::varint::{MAX_VARINT_LEN, get_varint, put_varint, varint_len};

/// Default largest DATA payload: 64 KiB.
pub const DEFAULT_MAX_DATA: u32 = 64 * 1024;
/// Bytes of header before a body at most: type byte plus a ten-byte stream varint.
pub const MAX_HEADER_LEN: usize = 1 + MAX_VARINT_LEN;

/// Size limits a decoder enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest DATA payload accepted.
    pub max_data: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_data: DEFAULT_MAX_DATA,
        }
    }
}

impl Limits {
    /// The largest whole message (header plus body) a decoder accepts. SYNC bodies share it.
    pub fn max_message_len(&self) -> usize {
        self.max_data as usize + MAX_HEADER_LEN
    }
}

/// Appends the encoding of `frame` to `dst`.
///
/// Messages are cut to [`MAX_MESSAGE_LEN`] bytes so that what is sent always decodes.
pub fn encode(frame: &Frame, dst: &mut BytesMut) {
    dst.reserve(encoded_len(frame));
    dst.put_u8(frame.type_byte());
    put_varint(dst, frame.stream());
    match frame {
        Frame::Open {
            window,
            timeout_ms,
            target,
            ..
        } => {
            put_varint(dst, u64::from(*window));
            put_varint(dst, u64::from(*timeout_ms));
            target.write_wire(dst);
        }
        Frame::OpenOk { window, .. } => put_varint(dst, u64::from(*window)),
        Frame::OpenErr { code, message, .. } => {
            dst.put_u8(code.to_u8());
            dst.put_slice(clamp_message(message).as_bytes());
        }
        Frame::Rst { code, message, .. } => {
            dst.put_u8(code.to_u8());
            dst.put_slice(clamp_message(message).as_bytes());
        }
        Frame::GoAway { code, message } => {
            dst.put_u8(code.to_u8());
            dst.put_slice(clamp_message(message).as_bytes());
        }
        Frame::Data { payload, .. } => dst.put_slice(payload),
        Frame::Window { increment, .. } => put_varint(dst, u64::from(*increment)),
        Frame::Ping { nonce } | Frame::Pong { nonce } => dst.put_u64(*nonce),
        Frame::Sync { high, open } => {
            put_varint(dst, *high);
            for id in open {
                put_varint(dst, *id);
            }
        }
        Frame::Fin { .. } | Frame::Unknown { .. } => {}
    }
}

/// The number of bytes [`encode`] appends for `frame`.
pub fn encoded_len(frame: &Frame) -> usize {
    let body = match frame {
        Frame::Open {
            window,
            timeout_ms,
            target,
            ..
        } => {
            varint_len(u64::from(*window)) + varint_len(u64::from(*timeout_ms)) + target.wire_len()
        }
        Frame::OpenOk { window, .. } => varint_len(u64::from(*window)),
        Frame::OpenErr { message, .. }
        | Frame::Rst { message, .. }
        | Frame::GoAway { message, .. } => 1 + clamp_message(message).len(),
        Frame::Data { payload, .. } => payload.len(),
        Frame::Window { increment, .. } => varint_len(u64::from(*increment)),
        Frame::Ping { .. } | Frame::Pong { .. } => 8,
        Frame::Sync { high, open } => {
            varint_len(*high) + open.iter().map(|id| varint_len(*id)).sum::<usize>()
        }
        Frame::Fin { .. } | Frame::Unknown { .. } => 0,
    };
    1 + varint_len(frame.stream()) + body
}

/// Decodes one whole message. DATA payloads are zero-copy slices of `msg`.
///
/// Never panics and never allocates more than the message itself (SYNC id lists are bounded by
/// the message length, which is checked against `limits` first).
pub fn decode(msg: &Bytes, limits: &Limits) -> Result<Frame, ProtoError> {
    if msg.len() > limits.max_message_len() {
        return Err(ProtoError::bare(ProtoErrorKind::TooLarge {
            what: "message",
            len: msg.len() as u64,
            max: limits.max_message_len() as u64,
        }));
    }
    let Some(&type_byte) = msg.first() else {
        return Err(ProtoError::bare(ProtoErrorKind::Empty));
    };
    let (stream, used) = get_varint(&msg[1..]).map_err(|kind| ProtoError {
        kind,
        frame_type: Some(type_byte),
        stream: None,
    })?;
    let body_start = 1 + used;
    let mut body = Body {
        bytes: &msg[body_start..],
    };
    let with_context = |kind: ProtoErrorKind| ProtoError {
        kind,
        frame_type: Some(type_byte),
        stream: Some(stream),
    };
    let Some(frame_type) = FrameType::from_u8(type_byte) else {
        return Ok(Frame::Unknown {
            frame_type: type_byte,
            stream,
        });
    };
    let frame = decode_body(frame_type, stream, msg, body_start, &mut body, limits)
        .map_err(with_context)?;
    Ok(frame)
}

fn decode_body(
    frame_type: FrameType,
    stream: StreamId,
    msg: &Bytes,
    body_start: usize,
    body: &mut Body<'_>,
    limits: &Limits,
) -> Result<Frame, ProtoErrorKind> {
    let session_frame = matches!(
        frame_type,
        FrameType::Ping | FrameType::Pong | FrameType::Sync | FrameType::GoAway
    );
    if session_frame && stream != 0 {
        return Err(ProtoErrorKind::SessionFrameOnStream(stream));
    }
    if !session_frame && stream == 0 {
        return Err(ProtoErrorKind::StreamFrameOnSession);
    }
    let frame = match frame_type {
        FrameType::Open => {
            let window = body.u32_varint("window")?;
            let timeout_ms = body.u32_varint("timeout_ms")?;
            let target = body.rest();
            if target.len() > MAX_TARGET_LEN {
                return Err(ProtoErrorKind::TooLarge {
                    what: "target",
                    len: target.len() as u64,
                    max: MAX_TARGET_LEN as u64,
                });
            }
            let target = TargetAddr::parse_wire(target)?;
            Frame::Open {
                stream,
                window,
                timeout_ms,
                target,
            }
        }
        FrameType::OpenOk => {
            let window = body.u32_varint("window")?;
            body.finish()?;
            Frame::OpenOk { stream, window }
        }
        FrameType::OpenErr => {
            let code = OpenErrorCode::from_u8(body.u8()?);
            let message = body.message()?;
            Frame::OpenErr {
                stream,
                code,
                message,
            }
        }
        FrameType::Data => {
            let len = msg.len() - body_start;
            if len > limits.max_data as usize {
                return Err(ProtoErrorKind::TooLarge {
                    what: "DATA payload",
                    len: len as u64,
                    max: u64::from(limits.max_data),
                });
            }
            Frame::Data {
                stream,
                payload: msg.slice(body_start..),
            }
        }
        FrameType::Window => {
            let increment = body.u32_varint("increment")?;
            body.finish()?;
            Frame::Window { stream, increment }
        }
        FrameType::Fin => {
            body.finish()?;
            Frame::Fin { stream }
        }
        FrameType::Rst => {
            let code = ResetCode::from_u8(body.u8()?);
            let message = body.message()?;
            Frame::Rst {
                stream,
                code,
                message,
            }
        }
        FrameType::Ping => {
            let nonce = body.u64_be()?;
            body.finish()?;
            Frame::Ping { nonce }
        }
        FrameType::Pong => {
            let nonce = body.u64_be()?;
            body.finish()?;
            Frame::Pong { nonce }
        }
        FrameType::Sync => {
            let high = body.varint()?;
            // Each id takes at least one byte, so the list is bounded by the message length.
            let mut open = Vec::with_capacity(body.bytes.len().min(4096));
            while !body.bytes.is_empty() {
                let id = body.varint()?;
                if open.last().is_some_and(|&prev| prev >= id) {
                    return Err(ProtoErrorKind::SyncNotSorted);
                }
                open.push(id);
            }
            Frame::Sync { high, open }
        }
        FrameType::GoAway => {
            let code = GoAwayCode::from_u8(body.u8()?);
            let message = body.message()?;
            Frame::GoAway { code, message }
        }
    };
    Ok(frame)
}

/// A cursor over a frame body.
struct Body<'a> {
    bytes: &'a [u8],
}

impl<'a> Body<'a> {
    fn varint(&mut self) -> Result<u64, ProtoErrorKind> {
        let (value, used) = get_varint(self.bytes)?;
        self.bytes = &self.bytes[used..];
        Ok(value)
    }

    fn u32_varint(&mut self, field: &'static str) -> Result<u32, ProtoErrorKind> {
        u32::try_from(self.varint()?).map_err(|_| ProtoErrorKind::OutOfRange(field))
    }

    fn u8(&mut self) -> Result<u8, ProtoErrorKind> {
        let (&first, rest) = self.bytes.split_first().ok_or(ProtoErrorKind::Truncated)?;
        self.bytes = rest;
        Ok(first)
    }

    fn u64_be(&mut self) -> Result<u64, ProtoErrorKind> {
        let (head, rest) = self
            .bytes
            .split_first_chunk::<8>()
            .ok_or(ProtoErrorKind::Truncated)?;
        self.bytes = rest;
        Ok(u64::from_be_bytes(*head))
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.bytes)
    }

    fn message(&mut self) -> Result<String, ProtoErrorKind> {
        let rest = self.rest();
        if rest.len() > MAX_MESSAGE_LEN {
            return Err(ProtoErrorKind::TooLarge {
                what: "message",
                len: rest.len() as u64,
                max: MAX_MESSAGE_LEN as u64,
            });
        }
        Ok(lossy_utf8(rest))
    }

    fn finish(&self) -> Result<(), ProtoErrorKind> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(ProtoErrorKind::TrailingBytes(self.bytes.len()))
        }
    }
}

/// Decodes message text, replacing each invalid UTF-8 sequence with one `?`.
///
/// Unlike `String::from_utf8_lossy` (whose U+FFFD takes three bytes) the text never grows past
/// the wire bytes, so a decoded message stays within [`MAX_MESSAGE_LEN`] and re-encodes to
/// exactly the same frame.
fn lossy_utf8(bytes: &[u8]) -> String {
    let mut text = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        text.push_str(chunk.valid());
        if !chunk.invalid().is_empty() {
            text.push('?');
        }
    }
    text
}

/// Encodes `frame` into a fresh message buffer.
pub fn encode_to_bytes(frame: &Frame) -> Bytes {
    let mut buf = BytesMut::with_capacity(encoded_len(frame));
    encode(frame, &mut buf);
    buf.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::Host;

    fn round_trip(frame: Frame) {
        let bytes = encode_to_bytes(&frame);
        assert_eq!(bytes.len(), encoded_len(&frame), "{frame:?}");
        assert_eq!(decode(&bytes, &Limits::default()), Ok(frame));
    }

    #[test]
    fn every_frame_type_round_trips() {
        round_trip(Frame::Open {
            stream: 1,
            window: 262_144,
            timeout_ms: 10_000,
            target: TargetAddr {
                host: Host::Name("db.internal".into()),
                port: 5432,
            },
        });
        round_trip(Frame::OpenOk {
            stream: 2,
            window: 7,
        });
        round_trip(Frame::OpenErr {
            stream: 3,
            code: OpenErrorCode::Refused,
            message: "connection refused".into(),
        });
        round_trip(Frame::Data {
            stream: 5,
            payload: Bytes::from_static(b"hello"),
        });
        round_trip(Frame::Data {
            stream: 5,
            payload: Bytes::new(),
        });
        round_trip(Frame::Window {
            stream: 7,
            increment: u32::MAX,
        });
        round_trip(Frame::Fin { stream: u64::MAX });
        round_trip(Frame::Rst {
            stream: 9,
            code: ResetCode::Other(200),
            message: String::new(),
        });
        round_trip(Frame::Ping { nonce: 0 });
        round_trip(Frame::Pong { nonce: u64::MAX });
        round_trip(Frame::Sync {
            high: 99,
            open: vec![1, 2, 98],
        });
        round_trip(Frame::GoAway {
            code: GoAwayCode::Shutdown,
            message: "bye".into(),
        });
    }

    #[test]
    fn unknown_types_decode_as_unknown() {
        let msg = Bytes::from_static(&[200, 5, 1, 2, 3]);
        assert_eq!(
            decode(&msg, &Limits::default()),
            Ok(Frame::Unknown {
                frame_type: 200,
                stream: 5
            })
        );
    }

    #[test]
    fn malformed_frames_name_their_stream() {
        let msg = Bytes::from_static(&[FrameType::Window as u8, 9, 0x80]);
        let err = decode(&msg, &Limits::default()).unwrap_err();
        assert_eq!(err.stream, Some(9));
        assert_eq!(err.kind, ProtoErrorKind::Truncated);

        let msg = Bytes::from_static(&[FrameType::Window as u8, 9, 0xff, 0xff, 0xff, 0xff, 0x10]);
        let err = decode(&msg, &Limits::default()).unwrap_err();
        assert_eq!(err.kind, ProtoErrorKind::OutOfRange("increment"));

        let msg = Bytes::from_static(&[FrameType::Fin as u8, 0]);
        let err = decode(&msg, &Limits::default()).unwrap_err();
        assert_eq!(err.kind, ProtoErrorKind::StreamFrameOnSession);

        let msg = Bytes::from_static(&[FrameType::Ping as u8, 3, 0, 0, 0, 0, 0, 0, 0, 0]);
        let err = decode(&msg, &Limits::default()).unwrap_err();
        assert_eq!(err.kind, ProtoErrorKind::SessionFrameOnStream(3));

        let msg = Bytes::from_static(&[FrameType::Sync as u8, 0, 10, 4, 3]);
        let err = decode(&msg, &Limits::default()).unwrap_err();
        assert_eq!(err.kind, ProtoErrorKind::SyncNotSorted);

        let mut open = vec![FrameType::Open as u8, 1, 1, 1];
        open.extend_from_slice(b"tcp/host:0");
        let err = decode(&Bytes::from(open), &Limits::default()).unwrap_err();
        assert_eq!(err.stream, Some(1));
        assert!(matches!(err.kind, ProtoErrorKind::BadTarget(_)));
    }

    #[test]
    fn oversized_messages_are_rejected_before_parsing() {
        let limits = Limits { max_data: 16 };
        let mut msg = vec![FrameType::Data as u8, 1];
        msg.extend_from_slice(&[0u8; 17]);
        let err = decode(&Bytes::from(msg), &limits).unwrap_err();
        assert!(matches!(err.kind, ProtoErrorKind::TooLarge { .. }));
        let huge = Bytes::from(vec![FrameType::Data as u8; 1000]);
        let err = decode(&huge, &limits).unwrap_err();
        assert_eq!(err.stream, None);
    }

    #[test]
    fn invalid_utf8_messages_never_grow() {
        let mut msg = vec![FrameType::Rst as u8, 1, ResetCode::Internal.to_u8()];
        msg.extend_from_slice(b"ok ");
        msg.extend_from_slice(&[0xff; 253]);
        let frame = decode(&Bytes::from(msg), &Limits::default()).expect("decodes");
        let Frame::Rst { message, .. } = &frame else {
            panic!("an RST: {frame:?}");
        };
        assert_eq!(message.len(), 256);
        assert!(message.starts_with("ok ???"));
        assert_eq!(
            decode(&encode_to_bytes(&frame), &Limits::default()),
            Ok(frame)
        );

        // A truncated multi-byte character is one invalid sequence.
        let msg = Bytes::from_static(&[FrameType::GoAway as u8, 0, 1, b'a', 0xe2, 0x82]);
        assert_eq!(
            decode(&msg, &Limits::default()),
            Ok(Frame::GoAway {
                code: GoAwayCode::Shutdown,
                message: "a?".into()
            })
        );
    }

    #[test]
    fn long_messages_are_clamped_on_encode() {
        let frame = Frame::Rst {
            stream: 1,
            code: ResetCode::Internal,
            message: "é".repeat(200),
        };
        let bytes = encode_to_bytes(&frame);
        let Ok(Frame::Rst { message, .. }) = decode(&bytes, &Limits::default()) else {
            panic!("decodes");
        };
        assert!(message.len() <= MAX_MESSAGE_LEN);
        assert!(message.chars().all(|c| c == 'é'));
    }
}
