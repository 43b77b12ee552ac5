//! Unsigned LEB128 varints: the integer encoding of every tether.v1 header and body field.

use bytes::BufMut;

use crate::error::ProtoErrorKind;

/// The longest encoding of a `u64`: ten groups of seven bits.
pub const MAX_VARINT_LEN: usize = 10;

/// Appends `value` as an unsigned LEB128 varint.
pub fn put_varint(dst: &mut impl BufMut, mut value: u64) {
    while value >= 0x80 {
        dst.put_u8((value as u8) | 0x80);
        value >>= 7;
    }
    dst.put_u8(value as u8);
}

/// The number of bytes `put_varint` writes for `value`.
pub fn varint_len(value: u64) -> usize {
    let bits = 64 - (value | 1).leading_zeros() as usize;
    bits.div_ceil(7)
}

/// Reads a varint from the front of `src`, returning the value and the bytes consumed.
///
/// `Truncated` when `src` ends inside the varint, `VarintOverflow` when it is longer than ten
/// bytes or its tenth byte carries bits above 64.
pub fn get_varint(src: &[u8]) -> Result<(u64, usize), ProtoErrorKind> {
    let mut value: u64 = 0;
    for (i, &byte) in src.iter().enumerate().take(MAX_VARINT_LEN) {
        let low = u64::from(byte & 0x7f);
        if i == MAX_VARINT_LEN - 1 && byte > 1 {
            return Err(ProtoErrorKind::VarintOverflow);
        }
        value |= low << (7 * i);
        if byte & 0x80 == 0 {
            return Ok((value, i + 1));
        }
    }
    if src.len() >= MAX_VARINT_LEN {
        Err(ProtoErrorKind::VarintOverflow)
    } else {
        Err(ProtoErrorKind::Truncated)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_edges() {
        for v in [
            0,
            1,
            127,
            128,
            16_383,
            16_384,
            u64::from(u32::MAX),
            u64::MAX - 1,
            u64::MAX,
        ] {
            let mut buf = Vec::new();
            put_varint(&mut buf, v);
            assert_eq!(buf.len(), varint_len(v), "len of {v}");
            assert_eq!(get_varint(&buf), Ok((v, buf.len())));
        }
    }

    #[test]
    fn rejects_overlong_and_truncated() {
        assert_eq!(get_varint(&[0x80; 10]), Err(ProtoErrorKind::VarintOverflow));
        assert_eq!(get_varint(&[0x80; 11]), Err(ProtoErrorKind::VarintOverflow));
        let mut eleven_bits_over = vec![0xff; 9];
        eleven_bits_over.push(0x02);
        assert_eq!(
            get_varint(&eleven_bits_over),
            Err(ProtoErrorKind::VarintOverflow)
        );
        assert_eq!(get_varint(&[0x80, 0x80]), Err(ProtoErrorKind::Truncated));
        assert_eq!(get_varint(&[]), Err(ProtoErrorKind::Truncated));
    }
}
