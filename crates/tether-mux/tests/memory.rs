//! Memory held for a stream whose reader does not read is bounded by its window, whatever the
//! peer does: tiny DATA frames must not pin the transport's receive buffers. Alone in its
//! binary because it measures the process's resident memory.
#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used)]

mod common;

use bytes::Bytes;
use common::Scripted;
use tether_mux::{MuxConfig, Role};
use tether_proto::Frame;

async fn round(t: &mut Scripted, filler: &[u8]) {
    t.send(Frame::Data {
        stream: 2,
        payload: Bytes::from_static(b"x"),
    })
    .await;
    for _ in 0..3 {
        t.send_raw(filler).await;
    }
}

fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

#[tokio::test]
async fn tiny_frames_for_a_stuck_stream_do_not_pin_receive_buffers() {
    const ROUNDS: usize = 1000;
    let mut t = Scripted::new(Role::Server, MuxConfig::default());
    t.send(Frame::Open {
        stream: 2,
        window: 1024,
        timeout_ms: 1000,
        target: common::target(),
    })
    .await;
    let pending = t.incoming.accept().await.unwrap();
    // Accepted, and never read.
    let stuck = pending.accept().unwrap();
    assert!(matches!(t.recv().await, Frame::OpenOk { .. }));
    // Frames of an unknown type are ignored by the session and released at once; they make
    // the receive buffer move on, so that each one-byte DATA lands in a fresh buffer.
    let mut filler = vec![0u8; 60_000];
    filler[0] = 200;
    filler[1] = 2;
    // Warm up the allocator, then measure.
    for _ in 0..50 {
        round(&mut t, &filler).await;
    }
    assert!(t.barrier(1).await.is_empty());
    let before = resident_bytes();
    for _ in 0..ROUNDS {
        round(&mut t, &filler).await;
    }
    assert!(t.barrier(2).await.is_empty());
    let grown = resident_bytes().saturating_sub(before);
    assert_eq!(stuck.debug_buffered(), ROUNDS + 50);
    eprintln!("resident memory grew by {} KiB", grown / 1024);
    // 1050 buffered bytes; a pinned receive buffer per byte would be over 100 MiB.
    assert!(
        grown < 16 * 1024 * 1024,
        "resident memory grew by {} KiB for {} buffered bytes",
        grown / 1024,
        ROUNDS + 50
    );
    drop(stuck);
    t.finish().await;
}
