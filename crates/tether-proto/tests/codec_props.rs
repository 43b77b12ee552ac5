//! Property tests of the tether.v1 codec: round trips, prefixes, hostile input and size limits.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use tether_proto::codec::{DEFAULT_MAX_DATA, MAX_HEADER_LEN, encode_to_bytes, encoded_len};
use tether_proto::frame::{MAX_MESSAGE_LEN, clamp_message};
use tether_proto::prefixed::{decode_prefixed, encode_prefixed};
use tether_proto::varint::put_varint;
use tether_proto::{
    Frame, FrameType, GoAwayCode, Host, Limits, OpenErrorCode, ProtoErrorKind, ResetCode,
    TargetAddr, decode, encode,
};

/// Capacity a decoder may hold after refusing a bad length: far below one maximum message.
const SMALL_CAPACITY: usize = 64 * 1024;

// ---------------------------------------------------------------------------------------------
// Strategies

/// Stream ids of stream frames: never 0; small ids and the whole u64 range.
fn arb_stream_id() -> impl Strategy<Value = u64> {
    prop_oneof![1u64..=300, 1u64..=u64::MAX, Just(u64::MAX)]
}

/// Message text of at most [`MAX_MESSAGE_LEN`] bytes: ASCII up to the limit, or any Unicode
/// (cut on a character boundary, as the encoder would).
fn arb_message() -> impl Strategy<Value = String> {
    prop_oneof![
        "[ -~]{0,256}",
        any::<String>().prop_map(|s| clamp_message(&s).to_owned()),
        prop::collection::vec(any::<char>(), 0..=256)
            .prop_map(|chars| clamp_message(&chars.into_iter().collect::<String>()).to_owned()),
    ]
}

/// Host names the target parser keeps as names: `[A-Za-z0-9._-]`, 1..=255 bytes, not an IP.
fn arb_host_name() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9_-]{1,20}(\\.[a-z0-9_-]{1,20}){0,4}",
        "[A-Za-z0-9._-]{1,255}",
        // Numeric look-alikes that are not canonical dotted quads stay names.
        "[0-9]{1,3}\\.[0-9]{1,3}",
    ]
    .prop_filter("parses as an IP literal", |name| {
        name.parse::<IpAddr>().is_err()
    })
}

fn arb_target() -> impl Strategy<Value = TargetAddr> {
    let host = prop_oneof![
        arb_host_name().prop_map(Host::Name),
        any::<Ipv4Addr>().prop_map(|ip| Host::Ip(IpAddr::V4(ip))),
        any::<Ipv6Addr>().prop_map(|ip| Host::Ip(IpAddr::V6(ip))),
        // IPv4-mapped IPv6 addresses print as `::ffff:a.b.c.d`.
        any::<Ipv4Addr>().prop_map(|ip| Host::Ip(IpAddr::V6(ip.to_ipv6_mapped()))),
    ];
    (host, 1u16..=u16::MAX).prop_map(|(host, port)| TargetAddr { host, port })
}

fn arb_payload() -> impl Strategy<Value = Bytes> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..=64),
        prop::collection::vec(any::<u8>(), 0..=4096),
    ]
    .prop_map(Bytes::from)
}

/// Strictly ascending SYNC ids, mixing small and large values.
fn arb_sync_ids() -> impl Strategy<Value = Vec<u64>> {
    prop_oneof![
        prop::collection::btree_set(1u64..=1000, 0..=64),
        prop::collection::btree_set(1u64..=u64::MAX, 0..=64),
    ]
    .prop_map(|ids| ids.into_iter().collect())
}

/// Unknown type bytes: 0 and everything above the last known type.
fn arb_unknown_type() -> impl Strategy<Value = u8> {
    prop_oneof![Just(0u8), 12u8..=u8::MAX]
}

/// Every valid frame. Codes come from `from_u8`, so unknown codes are `Other` as decoded.
fn arb_frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        (arb_stream_id(), any::<u32>(), any::<u32>(), arb_target()).prop_map(
            |(stream, window, timeout_ms, target)| Frame::Open {
                stream,
                window,
                timeout_ms,
                target,
            }
        ),
        (arb_stream_id(), any::<u32>())
            .prop_map(|(stream, window)| Frame::OpenOk { stream, window }),
        (arb_stream_id(), any::<u8>(), arb_message()).prop_map(|(stream, code, message)| {
            Frame::OpenErr {
                stream,
                code: OpenErrorCode::from_u8(code),
                message,
            }
        }),
        (arb_stream_id(), arb_payload())
            .prop_map(|(stream, payload)| Frame::Data { stream, payload }),
        (arb_stream_id(), any::<u32>())
            .prop_map(|(stream, increment)| Frame::Window { stream, increment }),
        arb_stream_id().prop_map(|stream| Frame::Fin { stream }),
        (arb_stream_id(), any::<u8>(), arb_message()).prop_map(|(stream, code, message)| {
            Frame::Rst {
                stream,
                code: ResetCode::from_u8(code),
                message,
            }
        }),
        any::<u64>().prop_map(|nonce| Frame::Ping { nonce }),
        any::<u64>().prop_map(|nonce| Frame::Pong { nonce }),
        (any::<u64>(), arb_sync_ids()).prop_map(|(high, open)| Frame::Sync { high, open }),
        (any::<u8>(), arb_message()).prop_map(|(code, message)| Frame::GoAway {
            code: GoAwayCode::from_u8(code),
            message,
        }),
        (arb_unknown_type(), any::<u64>())
            .prop_map(|(frame_type, stream)| Frame::Unknown { frame_type, stream }),
    ]
}

/// Arbitrary bytes, biased towards known type bytes and short stream ids so that bodies get
/// parsed, plus valid encodings with a few bytes overwritten or cut off.
fn arb_message_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..=600),
        (
            0u8..=12,
            0u8..=3,
            prop::collection::vec(any::<u8>(), 0..=300)
        )
            .prop_map(|(ty, stream, body)| {
                let mut msg = vec![ty, stream];
                msg.extend(body);
                msg
            }),
        (
            arb_frame(),
            prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..=4),
            any::<prop::sample::Index>(),
        )
            .prop_map(|(frame, edits, cut)| {
                let mut msg = encode_to_bytes(&frame).to_vec();
                for (at, byte) in edits {
                    let at = at.index(msg.len());
                    msg[at] = byte;
                }
                msg.truncate(cut.index(msg.len() + 1));
                msg
            }),
    ]
}

// ---------------------------------------------------------------------------------------------
// Helpers

fn prefixed(frame: &Frame) -> BytesMut {
    let mut buf = BytesMut::new();
    encode_prefixed(frame, &mut buf);
    buf
}

/// How much longer than its input a decoded message may re-encode.
///
/// The only growth is in OPEN targets: an IPv4-mapped IPv6 literal written in hex
/// (`[::ffff:0:0]`) re-encodes in std's canonical dotted form (`[::ffff:0.0.0.0]`), at most four
/// bytes longer. Every other field re-encodes canonically and so never grows.
fn allowed_growth(frame: &Frame) -> usize {
    match frame {
        Frame::Open {
            target:
                TargetAddr {
                    host: Host::Ip(IpAddr::V6(ip)),
                    ..
                },
            ..
        } if ip.to_ipv4_mapped().is_some() => 4,
        _ => 0,
    }
}

/// Checks what every successful decode of `input` must satisfy.
fn check_decoded(input: &[u8], frame: &Frame) -> Result<(), TestCaseError> {
    let again = encode_to_bytes(frame);
    prop_assert!(
        again.len() <= input.len() + allowed_growth(frame),
        "{frame:?} re-encodes to {} bytes from {}",
        again.len(),
        input.len()
    );
    let redecoded = decode(&again, &Limits::default());
    prop_assert_eq!(redecoded.as_ref(), Ok(frame));
    match frame {
        Frame::OpenErr { message, .. }
        | Frame::Rst { message, .. }
        | Frame::GoAway { message, .. } => prop_assert!(message.len() <= MAX_MESSAGE_LEN),
        Frame::Sync { open, .. } => prop_assert!(open.windows(2).all(|w| w[0] < w[1])),
        Frame::Data { payload, .. } => {
            prop_assert!(payload.len() <= DEFAULT_MAX_DATA as usize)
        }
        Frame::Unknown { frame_type, .. } => {
            prop_assert!(FrameType::from_u8(*frame_type).is_none())
        }
        _ => {}
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Round trips

proptest! {
    #![proptest_config(ProptestConfig::with_cases(10_000))]

    #[test]
    fn message_and_prefixed_round_trip(frame in arb_frame()) {
        let limits = Limits::default();

        let msg = encode_to_bytes(&frame);
        prop_assert_eq!(msg.len(), encoded_len(&frame));
        prop_assert_eq!(msg[0], frame.type_byte());
        prop_assert_eq!(decode(&msg, &limits), Ok(frame.clone()));

        // `encode` appends: whatever is already in the buffer stays in front.
        let mut appended = BytesMut::from(&b"xy"[..]);
        encode(&frame, &mut appended);
        prop_assert_eq!(&appended[..2], b"xy");
        prop_assert_eq!(&appended[2..], &msg[..]);

        let mut buf = prefixed(&frame);
        prop_assert_eq!(decode_prefixed(&mut buf, &limits), Ok(Some(frame)));
        prop_assert!(buf.is_empty(), "{} bytes left over", buf.len());
        prop_assert_eq!(decode_prefixed(&mut buf, &limits), Ok(None));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1_000))]

    #[test]
    fn back_to_back_prefixed_frames_decode_in_order(
        frames in prop::collection::vec(arb_frame(), 1..=8),
        split in any::<prop::sample::Index>(),
    ) {
        let limits = Limits::default();
        let mut wire = BytesMut::new();
        for frame in &frames {
            encode_prefixed(frame, &mut wire);
        }
        // Feed the stream in two arbitrary pieces, as a socket would.
        let split = split.index(wire.len() + 1);
        let tail = wire.split_off(split);
        let mut buf = wire;
        let mut decoded = Vec::new();
        while let Some(frame) = decode_prefixed(&mut buf, &limits).expect("valid stream") {
            decoded.push(frame);
        }
        buf.extend_from_slice(&tail);
        while let Some(frame) = decode_prefixed(&mut buf, &limits).expect("valid stream") {
            decoded.push(frame);
        }
        prop_assert!(buf.is_empty());
        prop_assert_eq!(decoded, frames);
    }

    #[test]
    fn every_strict_prefix_waits_for_more(frame in arb_frame()) {
        let limits = Limits::default();
        let whole = prefixed(&frame);
        for len in 0..whole.len() {
            let mut buf = BytesMut::from(&whole[..len]);
            prop_assert_eq!(decode_prefixed(&mut buf, &limits), Ok(None), "prefix of {}", len);
            prop_assert_eq!(&buf[..], &whole[..len], "prefix of {} was consumed", len);
        }
    }

    /// A malformed truncation of a frame still names the frame's stream, so that only that
    /// stream is reset.
    #[test]
    fn truncated_frames_are_attributed(frame in arb_frame(), cut in any::<prop::sample::Index>()) {
        let msg = encode_to_bytes(&frame);
        let header = 1 + tether_proto::varint::varint_len(frame.stream());
        let len = header + cut.index(msg.len() - header + 1);
        match decode(&msg.slice(..len), &Limits::default()) {
            Ok(decoded) => check_decoded(&msg[..len], &decoded)?,
            Err(err) => {
                prop_assert_eq!(err.frame_type, Some(frame.type_byte()));
                prop_assert_eq!(err.stream, Some(frame.stream()));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Hostile input

proptest! {
    #![proptest_config(ProptestConfig::with_cases(10_000))]

    #[test]
    fn decoding_arbitrary_messages_never_panics(input in arb_message_bytes()) {
        if let Ok(frame) = decode(&Bytes::from(input.clone()), &Limits::default()) {
            check_decoded(&input, &frame)?;
        }
    }

    #[test]
    fn decoding_arbitrary_streams_never_panics(input in prop::collection::vec(any::<u8>(), 0..=600)) {
        let limits = Limits::default();
        let mut buf = BytesMut::from(&input[..]);
        let mut last_len = buf.len();
        loop {
            match decode_prefixed(&mut buf, &limits) {
                Ok(Some(frame)) => {
                    prop_assert!(buf.len() < last_len, "a frame must consume input");
                    check_decoded(&input, &frame)?;
                }
                Ok(None) | Err(_) => break,
            }
            last_len = buf.len();
        }
        prop_assert!(buf.capacity() < SMALL_CAPACITY + input.len());
    }

    #[test]
    fn unknown_types_decode_to_unknown(
        frame_type in 12u8..=u8::MAX,
        stream in any::<u64>(),
        body in prop::collection::vec(any::<u8>(), 0..=1024),
    ) {
        let mut msg = BytesMut::new();
        msg.extend_from_slice(&[frame_type]);
        put_varint(&mut msg, stream);
        msg.extend_from_slice(&body);
        let want = Frame::Unknown { frame_type, stream };
        prop_assert_eq!(decode(&msg.clone().freeze(), &Limits::default()), Ok(want.clone()));

        let mut wire = BytesMut::new();
        put_varint(&mut wire, msg.len() as u64);
        wire.extend_from_slice(&msg);
        prop_assert_eq!(decode_prefixed(&mut wire, &Limits::default()), Ok(Some(want)));
        prop_assert!(wire.is_empty());
    }

    #[test]
    fn claimed_lengths_above_the_limit_are_refused_without_buffering(
        len in (Limits::default().max_message_len() as u64 + 1)..=u64::MAX,
        tail in prop::collection::vec(any::<u8>(), 0..=64),
    ) {
        let mut buf = BytesMut::new();
        put_varint(&mut buf, len);
        buf.extend_from_slice(&tail);
        let err = decode_prefixed(&mut buf, &Limits::default()).expect_err("too large");
        let is_too_large = matches!(err.kind, ProtoErrorKind::TooLarge { .. });
        prop_assert!(is_too_large, "{:?}", err);
        prop_assert!(buf.capacity() < SMALL_CAPACITY);
    }
}

// ---------------------------------------------------------------------------------------------
// Length and varint overflow

#[test]
fn bad_prefixed_lengths_are_rejected_and_nothing_is_buffered() {
    let limits = Limits::default();
    let max = limits.max_message_len() as u64;
    assert_eq!(max, u64::from(DEFAULT_MAX_DATA) + MAX_HEADER_LEN as u64);

    for len in [0, max + 1, u64::from(u32::MAX), u64::MAX] {
        let mut buf = BytesMut::new();
        put_varint(&mut buf, len);
        buf.extend_from_slice(&[FrameType::Data as u8, 1, 0xaa]);
        let before = buf.clone();
        let err = decode_prefixed(&mut buf, &limits).expect_err("bad length");
        if len == 0 {
            assert_eq!(err.kind, ProtoErrorKind::Empty);
        } else {
            assert_eq!(
                err.kind,
                ProtoErrorKind::TooLarge {
                    what: "message",
                    len,
                    max
                }
            );
        }
        assert_eq!(err.stream, None);
        assert!(
            buf.capacity() < SMALL_CAPACITY,
            "len {len}: capacity {}",
            buf.capacity()
        );
        assert_eq!(
            buf, before,
            "len {len}: an error must not consume a partial frame"
        );
    }

    // Ten continuation bytes and more: a varint longer than 64 bits.
    for bytes in [
        vec![0x80; 10],
        vec![0x80; 11],
        [vec![0xff; 10], vec![0x00]].concat(),
    ] {
        let mut buf = BytesMut::from(&bytes[..]);
        let err = decode_prefixed(&mut buf, &limits).expect_err("overlong varint");
        assert_eq!(err.kind, ProtoErrorKind::VarintOverflow);
        assert!(buf.capacity() < SMALL_CAPACITY);
    }
    // A tenth byte carrying bits above 64.
    let mut buf = BytesMut::from(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02][..]);
    let err = decode_prefixed(&mut buf, &limits).expect_err("above u64::MAX");
    assert_eq!(err.kind, ProtoErrorKind::VarintOverflow);
}

#[test]
fn the_largest_allowed_length_waits_for_its_bytes() {
    let limits = Limits::default();
    let max = limits.max_message_len();
    let mut buf = BytesMut::new();
    put_varint(&mut buf, max as u64);
    buf.extend_from_slice(&[FrameType::Data as u8, 1]);
    assert_eq!(decode_prefixed(&mut buf, &limits), Ok(None));
    // At most one maximum message (plus its prefix) is reserved.
    assert!(buf.capacity() <= 2 * max, "capacity {}", buf.capacity());

    let frame = Frame::Data {
        stream: 1,
        payload: Bytes::from(vec![7; DEFAULT_MAX_DATA as usize]),
    };
    let mut buf = prefixed(&frame);
    assert_eq!(decode_prefixed(&mut buf, &limits), Ok(Some(frame)));
    let too_big = Frame::Data {
        stream: 1,
        payload: Bytes::from(vec![7; DEFAULT_MAX_DATA as usize + 1]),
    };
    let err = decode(&encode_to_bytes(&too_big), &limits).expect_err("payload over max");
    assert!(matches!(
        err.kind,
        ProtoErrorKind::TooLarge {
            what: "DATA payload",
            ..
        }
    ));
    assert_eq!(err.stream, Some(1));
}

#[test]
fn overlong_varints_in_messages_are_rejected() {
    let limits = Limits::default();
    // Stream id: eleven bytes.
    let mut msg = vec![FrameType::Fin as u8];
    msg.extend_from_slice(&[0x80; 10]);
    msg.push(0x01);
    let err = decode(&Bytes::from(msg), &limits).expect_err("overlong stream id");
    assert_eq!(err.kind, ProtoErrorKind::VarintOverflow);
    assert_eq!(err.frame_type, Some(FrameType::Fin as u8));
    assert_eq!(err.stream, None);

    // A body varint: eleven bytes, attributed to its stream.
    let mut msg = vec![FrameType::Window as u8, 5];
    msg.extend_from_slice(&[0x80; 10]);
    msg.push(0x00);
    let err = decode(&Bytes::from(msg), &limits).expect_err("overlong increment");
    assert_eq!(err.kind, ProtoErrorKind::VarintOverflow);
    assert_eq!(err.stream, Some(5));

    // Unknown types still need a readable stream id.
    let mut msg = vec![200u8];
    msg.extend_from_slice(&[0xff; 11]);
    let err = decode(&Bytes::from(msg), &limits).expect_err("overlong stream id");
    assert_eq!(err.kind, ProtoErrorKind::VarintOverflow);
}

#[test]
fn non_canonical_varints_decode_and_re_encode_shorter() {
    // Stream 3 written in three bytes; the re-encoding uses one.
    let msg = Bytes::from_static(&[FrameType::Fin as u8, 0x83, 0x80, 0x00]);
    let frame = decode(&msg, &Limits::default()).expect("decodes");
    assert_eq!(frame, Frame::Fin { stream: 3 });
    assert_eq!(encode_to_bytes(&frame).len(), 2);
}

#[test]
fn ipv4_mapped_ipv6_in_hex_is_the_one_field_that_grows() {
    let mut msg = vec![FrameType::Open as u8, 1, 0, 0];
    msg.extend_from_slice(b"tcp/[::ffff:0:0]:1");
    let frame = decode(&Bytes::from(msg.clone()), &Limits::default()).expect("decodes");
    let again = encode_to_bytes(&frame);
    assert!(again.ends_with(b"tcp/[::ffff:0.0.0.0]:1"));
    assert_eq!(again.len(), msg.len() + allowed_growth(&frame));
    assert_eq!(decode(&again, &Limits::default()), Ok(frame));
}

#[test]
fn invalid_utf8_in_messages_is_bounded_and_stable() {
    for ty in [FrameType::OpenErr, FrameType::Rst, FrameType::GoAway] {
        let stream = if ty == FrameType::GoAway { 0 } else { 1 };
        let mut msg = vec![ty as u8, stream, 9];
        msg.extend_from_slice(&[0xff; MAX_MESSAGE_LEN]);
        let msg = Bytes::from(msg);
        let frame = decode(&msg, &Limits::default()).expect("decodes");
        check_decoded(&msg, &frame).expect("bounded and stable");
        let mut too_long = msg.to_vec();
        too_long.push(b'x');
        let err = decode(&Bytes::from(too_long), &Limits::default()).expect_err("257 bytes");
        assert!(matches!(
            err.kind,
            ProtoErrorKind::TooLarge {
                what: "message",
                ..
            }
        ));
    }
}
