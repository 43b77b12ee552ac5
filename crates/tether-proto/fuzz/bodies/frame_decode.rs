//! The body of fuzz target `fuzz_frame_decode`, shared by path with the stable test
//! `crates/tether-proto/tests/fuzz_frame_decode_body.rs`.

use std::net::IpAddr;

use bytes::{Bytes, BytesMut};
use tether_proto::codec::encode_to_bytes;
use tether_proto::prefixed::{decode_prefixed, encode_prefixed};
use tether_proto::{Frame, Host, Limits, TargetAddr, decode};

/// How much longer than its input a decoded message may re-encode: only an IPv4-mapped IPv6
/// literal written in hex (`[::ffff:0:0]`) grows, by at most four bytes (`[::ffff:0.0.0.0]`).
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

/// A decoded frame re-encodes (both framings) to bytes that decode to the same frame.
fn check_round_trip(frame: &Frame, input_len: usize) {
    let limits = Limits::default();
    let msg = encode_to_bytes(frame);
    assert!(
        msg.len() <= input_len + allowed_growth(frame),
        "{frame:?} re-encodes to {} bytes from {input_len}",
        msg.len()
    );
    assert_eq!(
        decode(&msg, &limits).as_ref(),
        Ok(frame),
        "message round trip"
    );

    let mut buf = BytesMut::new();
    encode_prefixed(frame, &mut buf);
    assert_eq!(
        decode_prefixed(&mut buf, &limits),
        Ok(Some(frame.clone())),
        "prefixed round trip"
    );
    assert!(
        buf.is_empty(),
        "prefixed round trip left {} bytes",
        buf.len()
    );
}

fn fuzz_with(data: &[u8], limits: &Limits) {
    // One WebSocket message.
    if let Ok(frame) = decode(&Bytes::copy_from_slice(data), limits) {
        check_round_trip(&frame, data.len());
    }

    // A byte stream of length-prefixed frames: take frames until more input is needed or an
    // error (a malformed frame whose length was readable is consumed, so keep going past it).
    let mut buf = BytesMut::from(data);
    loop {
        let before = buf.len();
        match decode_prefixed(&mut buf, limits) {
            Ok(Some(frame)) => check_round_trip(&frame, before),
            Ok(None) => break,
            Err(_) if buf.len() < before => {}
            Err(_) => break,
        }
        assert!(buf.len() < before, "decode_prefixed made no progress");
    }
}

/// The fuzz target's body: panics on a finding.
pub(crate) fn check(data: &[u8]) {
    fuzz_with(data, &Limits::default());
    // Tiny limits, so that the size checks are reached with short inputs too.
    fuzz_with(data, &Limits { max_data: 16 });
}
