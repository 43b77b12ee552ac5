//! The core's tests of the one-round-trip open (DATA within the negotiated early allowance
//! before OPEN_OK) and of receive windows that grow with the path, under the virtual clock.

use std::task::Poll;
use std::time::Duration;

use tether_proto::{Frame, ResetCode, StreamId};

use super::harness::{Action, Harness};
use super::stream::Phase;

fn data_sent(h: &Harness, side: usize) -> usize {
    h.sides[side]
        .sent
        .iter()
        .map(|f| match f {
            Frame::Data { payload, .. } => payload.len(),
            _ => 0,
        })
        .sum()
}

fn kinds(frames: &[Frame]) -> Vec<&'static str> {
    frames
        .iter()
        .map(|f| match f {
            Frame::Open { .. } => "open",
            Frame::OpenOk { .. } => "open_ok",
            Frame::OpenErr { .. } => "open_err",
            Frame::Data { .. } => "data",
            Frame::Rst { .. } => "rst",
            _ => "other",
        })
        .collect()
}

/// Side 0 opens early and writes `len` bytes before any answer; returns the stream id.
fn open_early_and_write(h: &mut Harness, len: usize) -> StreamId {
    h.step(&Action::Open(0, true));
    let id = h.sides[0].handles[0];
    h.step(&Action::Write(0, 0, len));
    h.step(&Action::Flush(0, 8));
    id
}

#[test]
fn early_data_leaves_with_the_open_and_waits_for_the_accept() {
    let mut h = Harness::tuned();
    let id = open_early_and_write(&mut h, 5000);
    // OPEN and the allowance (1 KiB, one frame) in the first flight, nothing more.
    assert_eq!(kinds(&h.sides[0].sent), ["open", "data"]);
    assert_eq!(data_sent(&h, 0), 1024);
    assert!(h.sides[0].conn.send_credit(id, 1, false).is_pending());
    h.step(&Action::Deliver(1, 8));
    // Buffered at the acceptor before it answers.
    assert_eq!(h.sides[1].conn.buffered(id), 1024);
    h.step(&Action::Accept(1, 0));
    h.step(&Action::Read(1, 0, 4096));
    let read: usize = h.sides[1].read.iter().map(|(_, b)| b.len()).sum();
    assert_eq!(read, 1024);
    h.step(&Action::Flush(1, 8));
    h.step(&Action::Deliver(0, 8));
    // OPEN_OK's window less what was sent early.
    let window = h.config.window as usize;
    assert!(matches!(
        h.sides[0].conn.send_credit(id, usize::MAX, false),
        Poll::Ready(Ok(n)) if n == (window - 1024).min(h.config.max_data as usize)
    ));
    h.settle();
}

#[test]
fn a_refused_early_open_fails_the_handle_and_drops_its_data() {
    let mut h = Harness::tuned();
    let id = open_early_and_write(&mut h, 100);
    h.step(&Action::Deliver(1, 8));
    h.step(&Action::Refuse(1, 0));
    assert!(
        h.sides[1].conn.streams.get(id).is_none(),
        "slot and data gone"
    );
    h.step(&Action::Flush(1, 8));
    h.step(&Action::Deliver(0, 8));
    let Poll::Ready(Err(err)) = h.sides[0].conn.send_credit(id, 1, false) else {
        panic!("the early handle must fail");
    };
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    assert!(err.to_string().contains("open refused"), "{err}");
    h.settle();
}

#[test]
fn data_before_open_ok_beyond_the_allowance_resets_with_flow_control() {
    for (mut h, allowed) in [(Harness::tuned(), 1024usize), (Harness::small(), 0)] {
        h.step(&Action::Open(0, false));
        h.step(&Action::Flush(0, 8));
        h.step(&Action::Deliver(1, 8));
        let id = h.sides[1].incoming[0];
        // A peer that does not wait: more than the allowance before OPEN_OK.
        for len in [allowed, 1] {
            let payload = bytes::Bytes::from(vec![0u8; len]);
            h.receive(
                1,
                Frame::Data {
                    stream: id,
                    payload,
                },
            );
        }
        assert!(h.sides[1].conn.streams.get(id).unwrap().failure.is_some());
        h.step(&Action::Flush(1, 8));
        assert!(h.sides[1].sent.iter().any(|f| matches!(
            f,
            Frame::Rst {
                code: ResetCode::FlowControl,
                ..
            }
        )));
        h.settle();
    }
}

#[test]
fn without_the_capability_an_early_open_waits_for_open_ok() {
    let mut h = Harness::small();
    h.step(&Action::Open(0, true));
    assert!(h.sides[0].handles.is_empty(), "no handle before OPEN_OK");
    h.settle();
}

/// One round trip of a window-limited transfer on stream `id` over a path of `rtt`: side 0
/// writes all its credit, the frames cross, side 1 reads everything, the WINDOWs cross back.
fn round_trip(h: &mut Harness, rtt: Duration) {
    for _ in 0..64 {
        h.step(&Action::Write(0, 0, 1024));
        h.step(&Action::Flush(0, 8));
    }
    h.step(&Action::Advance(rtt / 2));
    h.step(&Action::Deliver(1, usize::MAX));
    for _ in 0..64 {
        h.step(&Action::Read(1, 0, 1024));
    }
    h.step(&Action::Flush(1, usize::MAX));
    h.step(&Action::Advance(rtt / 2));
    h.step(&Action::Deliver(0, usize::MAX));
}

#[test]
fn a_window_limited_stream_grows_its_window_within_max_and_budget() {
    let mut h = Harness::tuned();
    let rtt = Duration::from_millis(50);
    h.step(&Action::Open(0, false));
    h.step(&Action::Flush(0, 8));
    h.step(&Action::Advance(rtt / 2));
    h.step(&Action::Deliver(1, 8));
    let id = h.sides[1].incoming[0];
    h.step(&Action::Accept(1, 0));
    h.step(&Action::Flush(1, 8));
    h.step(&Action::Advance(rtt / 2));
    h.step(&Action::Deliver(0, 8));
    let initial = u64::from(h.config.window);
    let mut windows = Vec::new();
    for _ in 0..8 {
        round_trip(&mut h, rtt);
        windows.push(h.sides[1].conn.streams.get(id).unwrap().recv_window);
    }
    // The first grants measure the round trip (a PING); then the window doubles up to max.
    let max = u64::from(h.config.max_window);
    assert_eq!(*windows.last().unwrap(), max, "{windows:?}");
    assert!(windows.windows(2).all(|w| w[1] >= w[0]), "{windows:?}");
    assert!(windows.first().unwrap() < &max, "{windows:?}");
    // Throughput follows: the last round trip moved more than the initial window.
    let before = data_sent(&h, 0);
    round_trip(&mut h, rtt);
    assert!((data_sent(&h, 0) - before) as u64 > 3 * initial);
    // The session has granted exactly this stream's window.
    assert_eq!(h.sides[1].conn.granted, max);
    assert!(matches!(
        h.sides[1].conn.streams.get(id).unwrap().phase,
        Phase::Open
    ));
    h.settle();
}

#[test]
fn a_slow_reader_keeps_the_initial_window() {
    let mut h = Harness::tuned();
    h.step(&Action::Open(0, false));
    h.step(&Action::Flush(0, 8));
    h.step(&Action::Deliver(1, 8));
    let id = h.sides[1].incoming[0];
    h.step(&Action::Accept(1, 0));
    h.step(&Action::Flush(1, 8));
    h.step(&Action::Deliver(0, 8));
    h.step(&Action::Ping(1));
    h.step(&Action::Flush(1, 8));
    h.step(&Action::Advance(Duration::from_millis(10)));
    h.step(&Action::Deliver(0, 8));
    h.step(&Action::Flush(0, 8));
    h.step(&Action::Deliver(1, 8));
    // 1 KiB a second: never a window per round trip.
    for _ in 0..40 {
        h.step(&Action::Write(0, 0, 1024));
        h.step(&Action::Flush(0, 8));
        h.step(&Action::Deliver(1, 8));
        h.step(&Action::Read(1, 0, 1024));
        h.step(&Action::Flush(1, 8));
        h.step(&Action::Deliver(0, 8));
        h.step(&Action::Advance(Duration::from_secs(1)));
        // Keepalive PINGs cross at once (a 0 ms path), so no round trip looks long.
        for side in 0..2 {
            h.step(&Action::Flush(side, 8));
            h.step(&Action::Deliver(1 - side, 8));
            h.step(&Action::Flush(1 - side, 8));
            h.step(&Action::Deliver(side, 8));
        }
    }
    let window = h.sides[1].conn.streams.get(id).unwrap().recv_window;
    assert_eq!(window, u64::from(h.config.window));
    h.settle();
}
