//! Length-prefixed framing for byte-stream transports: `len: varint`, then one encoded frame.
//!
//! WebSockets delimit messages themselves; this framing is for plain byte streams (in-memory
//! duplex pipes in tests, or raw TCP). A decoder never buffers more than one maximum message.

use bytes::{Buf, BytesMut};

use crate::codec::{Limits, decode, encode, encoded_len};
use crate::error::{ProtoError, ProtoErrorKind};
use crate::frame::Frame;
use crate::varint::{get_varint, put_varint};

/// Appends `frame` with its length prefix.
pub fn encode_prefixed(frame: &Frame, dst: &mut BytesMut) {
    put_varint(dst, encoded_len(frame) as u64);
    encode(frame, dst);
}

/// Takes one frame off the front of `src`.
///
/// `Ok(None)` means more bytes are needed (every strict prefix of a valid encoding gives that).
/// A claimed length above the limit is an error at once, before anything of that size is
/// buffered.
pub fn decode_prefixed(src: &mut BytesMut, limits: &Limits) -> Result<Option<Frame>, ProtoError> {
    let (len, used) = match get_varint(src) {
        Ok(found) => found,
        Err(ProtoErrorKind::Truncated) => return Ok(None),
        Err(kind) => return Err(ProtoError::bare(kind)),
    };
    let max = limits.max_message_len() as u64;
    if len > max {
        return Err(ProtoError::bare(ProtoErrorKind::TooLarge {
            what: "message",
            len,
            max,
        }));
    }
    let len = len as usize; // <= max, which is a usize
    if len == 0 {
        return Err(ProtoError::bare(ProtoErrorKind::Empty));
    }
    if src.len() < used + len {
        src.reserve(used + len - src.len());
        return Ok(None);
    }
    src.advance(used);
    let msg = src.split_to(len).freeze();
    decode(&msg, limits).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn decodes_back_to_back_frames_and_waits_for_more() {
        let mut buf = BytesMut::new();
        encode_prefixed(&Frame::Fin { stream: 3 }, &mut buf);
        encode_prefixed(
            &Frame::Data {
                stream: 3,
                payload: Bytes::from_static(b"xyz"),
            },
            &mut buf,
        );
        let whole = buf.clone();
        let limits = Limits::default();
        assert_eq!(
            decode_prefixed(&mut buf, &limits),
            Ok(Some(Frame::Fin { stream: 3 }))
        );
        let mut partial = buf.split_to(buf.len() - 1);
        assert_eq!(decode_prefixed(&mut partial, &limits), Ok(None));
        assert!(decode_prefixed(&mut BytesMut::from(&whole[..]), &limits).is_ok());
    }

    #[test]
    fn huge_claimed_length_is_refused_without_buffering() {
        let mut buf = BytesMut::new();
        put_varint(&mut buf, u64::from(u32::MAX));
        let err = decode_prefixed(&mut buf, &Limits::default()).unwrap_err();
        assert!(matches!(err.kind, ProtoErrorKind::TooLarge { .. }));
        assert!(buf.capacity() < 1024);

        let mut buf = BytesMut::new();
        put_varint(&mut buf, u64::MAX);
        assert!(decode_prefixed(&mut buf, &Limits::default()).is_err());
        let mut zero = BytesMut::from(&[0u8][..]);
        assert!(decode_prefixed(&mut zero, &Limits::default()).is_err());
    }
}
