//! The seed corpus of the `fuzz_frame_decode` fuzz target: generated here, checked against disk.
//!
//! Regenerate with `cargo test -p tether-proto --test fuzz_seeds -- --ignored`.

use std::path::PathBuf;

use bytes::{Bytes, BytesMut};
use tether_proto::codec::encode_to_bytes;
use tether_proto::prefixed::encode_prefixed;
use tether_proto::{Frame, GoAwayCode, Host, Limits, OpenErrorCode, ResetCode, TargetAddr, decode};

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/fuzz_frame_decode")
}

fn target(text: &str) -> TargetAddr {
    text.parse().expect("valid target")
}

/// One frame of each type, as single messages.
fn seed_frames() -> Vec<(&'static str, Frame)> {
    vec![
        (
            "open-name",
            Frame::Open {
                stream: 1,
                window: 262_144,
                timeout_ms: 10_000,
                target: target("tcp/db.internal:5432"),
            },
        ),
        (
            "open-ipv6",
            Frame::Open {
                stream: 2,
                window: 1,
                timeout_ms: 0,
                target: TargetAddr {
                    host: Host::Ip("fe80::1".parse().expect("IPv6")),
                    port: 443,
                },
            },
        ),
        (
            "open-ok",
            Frame::OpenOk {
                stream: 3,
                window: 65_536,
            },
        ),
        (
            "open-err",
            Frame::OpenErr {
                stream: 5,
                code: OpenErrorCode::Refused,
                message: "connection refused".into(),
            },
        ),
        (
            "data",
            Frame::Data {
                stream: 7,
                payload: Bytes::from_static(b"GET / HTTP/1.1\r\n\r\n"),
            },
        ),
        (
            "window",
            Frame::Window {
                stream: 9,
                increment: u32::MAX,
            },
        ),
        ("fin", Frame::Fin { stream: 300 }),
        (
            "rst",
            Frame::Rst {
                stream: 11,
                code: ResetCode::FlowControl,
                message: "window exceeded".into(),
            },
        ),
        (
            "ping",
            Frame::Ping {
                nonce: 0x0102_0304_0506_0708,
            },
        ),
        ("pong", Frame::Pong { nonce: u64::MAX }),
        (
            "sync",
            Frame::Sync {
                high: 1000,
                open: vec![1, 2, 130, 999],
            },
        ),
        (
            "goaway",
            Frame::GoAway {
                code: GoAwayCode::Shutdown,
                message: "restart".into(),
            },
        ),
        (
            "unknown",
            Frame::Unknown {
                frame_type: 200,
                stream: 4,
            },
        ),
    ]
}

/// Every seed file: `seed-<name>` and its bytes.
fn seeds() -> Vec<(String, Vec<u8>)> {
    let frames = seed_frames();
    let mut seeds: Vec<_> = frames
        .iter()
        .map(|(name, frame)| (format!("seed-{name}"), encode_to_bytes(frame).to_vec()))
        .collect();
    // A length-prefixed byte stream of several frames.
    let mut stream = BytesMut::new();
    for (_, frame) in &frames[..6] {
        encode_prefixed(frame, &mut stream);
    }
    seeds.push(("seed-prefixed-stream".into(), stream.to_vec()));
    seeds
}

#[test]
fn seeds_on_disk_match_the_generator() {
    for (name, bytes) in seeds() {
        let path = corpus_dir().join(&name);
        let on_disk = std::fs::read(&path)
            .unwrap_or_else(|err| panic!("{}: {err} (regenerate with --ignored)", path.display()));
        assert_eq!(
            on_disk, bytes,
            "{name} is stale (regenerate with --ignored)"
        );
    }
}

#[test]
fn seed_messages_decode_to_their_frames() {
    for (name, frame) in seed_frames() {
        let msg = encode_to_bytes(&frame);
        assert_eq!(decode(&msg, &Limits::default()), Ok(frame), "{name}");
    }
}

#[test]
#[ignore = "writes the fuzz seed corpus"]
fn write_seeds() {
    std::fs::create_dir_all(corpus_dir()).expect("corpus dir");
    for (name, bytes) in seeds() {
        std::fs::write(corpus_dir().join(name), bytes).expect("write seed");
    }
}
