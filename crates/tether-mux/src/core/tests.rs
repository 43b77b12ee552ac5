//! The core's tests: single-`Conn` cases, the two-`Conn` harness under a virtual clock
//! (frame-level cases of the scripted session tests), and a property test over random action
//! sequences that checks the core's invariants after every step.

use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use proptest::prelude::*;
use tether_proto::{Frame, OpenErrorCode, ResetCode, StreamId};

use super::conn::Conn;
use super::event::{Applied, Event};
use super::harness::{Action, Harness, run_actions, target};
use super::stream::{Phase, Stream};
use super::time::Time;
use crate::config::{MuxConfig, Role};
use crate::error::{OpenError, SessionEnd};
use crate::metrics::MuxMetrics;

fn conn() -> Conn {
    Conn::new(
        Role::Server,
        MuxConfig::default(),
        MuxMetrics::unregistered(),
        Time::ZERO,
    )
}

fn data(stream: StreamId, payload: &'static [u8]) -> Frame {
    Frame::Data {
        stream,
        payload: Bytes::from_static(payload),
    }
}

fn open_frame(stream: StreamId, window: u32) -> Frame {
    Frame::Open {
        stream,
        window,
        timeout_ms: 1000,
        target: target(),
    }
}

fn transmitted(conn: &mut Conn) -> Vec<Frame> {
    std::iter::from_fn(|| conn.poll_transmit()).collect()
}

fn events(conn: &mut Conn) -> Vec<Event> {
    std::iter::from_fn(|| conn.poll_event()).collect()
}

// === one Conn ===

#[test]
fn the_stream_table_gives_back_its_room_after_a_burst() {
    let mut c = conn();
    let ids: Vec<StreamId> = (0..5_000u64).map(|i| i * 2 + 2).collect();
    for &id in &ids {
        let mut slot = Stream::new(Phase::Accepting, 1024, 1024);
        slot.handle_dropped = true;
        c.streams.insert(id, slot);
    }
    let burst = c.streams.capacity();
    assert!(burst >= 5_000, "{burst}");
    // Half of them closed: still sized for the rest.
    for &id in &ids[..2_500] {
        c.maybe_remove(id);
    }
    assert!(c.streams.capacity() >= 2_500);
    for &id in &ids[2_500..] {
        c.maybe_remove(id);
    }
    assert_eq!(c.streams.len(), 0);
    assert!(
        c.streams.capacity() <= 128,
        "capacity {} after the burst of {burst}",
        c.streams.capacity()
    );
}

/// Applies DATA for stream 2 (open, socket attached) and tells whether the reader was asked
/// to write it directly.
fn apply_data(c: &mut Conn, payload: &'static [u8]) -> bool {
    matches!(
        c.handle_frame(data(2, payload), Time::ZERO),
        Ok(Applied::Deliver { .. })
    )
}

#[test]
fn direct_delivery_never_overtakes_bytes_received_before() {
    let mut c = conn();
    c.streams.insert(
        2,
        Stream::new(Phase::Open, MuxConfig::default().window, 1024),
    );
    assert!(c.attach_sink(2));
    assert!(
        apply_data(&mut c, b"first"),
        "nothing before it: written directly"
    );
    // Until the reader reports, a second payload queues behind the first.
    assert!(!apply_data(&mut c, b"second"));
    c.delivered(2, 5, Bytes::new(), Time::ZERO);
    // "second" is still buffered: the next payload queues behind it.
    assert!(!apply_data(&mut c, b"third"));
    assert_eq!(c.buffered(2), 11);
    // The consumer takes everything but holds it, unwritten: still no direct write.
    let take = |c: &mut Conn| match c.consume(2, |buf| (buf.take_chunk(64), 0), true, Time::ZERO) {
        Poll::Ready(Ok(Some(chunk))) => chunk,
        other => panic!("{other:?}"),
    };
    assert_eq!(take(&mut c)[..], *b"second");
    assert_eq!(take(&mut c)[..], *b"third");
    assert!(!apply_data(&mut c, b"fourth"));
    assert_eq!(take(&mut c)[..], *b"fourth");
    // The next read finds the held bytes written: nothing buffered, held or in flight.
    assert!(
        c.consume(2, |buf| ((), buf.len()), false, Time::ZERO)
            .is_pending()
    );
    assert!(apply_data(&mut c, b"fifth"));
    assert_eq!(c.detach_sink(2), 5);
}

#[test]
fn frames_for_an_unknown_stream_get_rst_and_nothing_else() {
    let mut c = conn();
    c.handle_frame(data(8, b"who?"), Time::ZERO).unwrap();
    c.handle_frame(Frame::Fin { stream: 10 }, Time::ZERO)
        .unwrap();
    let rst = Frame::Rst {
        stream: 12,
        code: ResetCode::Cancelled,
        message: String::new(),
    };
    c.handle_frame(rst, Time::ZERO).unwrap();
    let window = Frame::Window {
        stream: 12,
        increment: 5,
    };
    c.handle_frame(window, Time::ZERO).unwrap();
    let sent = transmitted(&mut c);
    let ids: Vec<(StreamId, bool)> = sent
        .iter()
        .map(|f| {
            let unknown = matches!(
                f,
                Frame::Rst {
                    code: ResetCode::UnknownStream,
                    ..
                }
            );
            (f.stream(), unknown)
        })
        .collect();
    assert_eq!(ids, [(8, true), (10, true)]);
    assert!(c.ended().is_none());
}

#[test]
fn open_with_a_bad_id_ends_the_session() {
    for (opened_before, id) in [(None, 0), (None, 3), (Some(4), 4), (Some(6), 4)] {
        let mut c = conn();
        if let Some(before) = opened_before {
            assert!(matches!(
                c.handle_frame(open_frame(before, 1024), Time::ZERO),
                Ok(Applied::Incoming { .. })
            ));
        }
        let result = c.handle_frame(open_frame(id, 1024), Time::ZERO);
        assert!(
            matches!(result, Err(SessionEnd::Protocol(_))),
            "id {id} after {opened_before:?}: {result:?}"
        );
    }
}

#[test]
fn ping_is_answered_with_pong_and_the_same_nonce() {
    let mut c = conn();
    c.handle_frame(Frame::Ping { nonce: 42 }, Time::ZERO)
        .unwrap();
    assert_eq!(transmitted(&mut c), [Frame::Pong { nonce: 42 }]);
}

#[test]
fn the_round_trip_time_is_measured_on_the_callers_clock() {
    let mut c = conn();
    let nonce = c.ping(Time::from_epoch(Duration::from_secs(1))).unwrap();
    assert_eq!(transmitted(&mut c), [Frame::Ping { nonce }]);
    let back = Time::from_epoch(Duration::from_millis(1250));
    c.handle_frame(Frame::Pong { nonce }, back).unwrap();
    let rtt = Duration::from_millis(250);
    assert!(matches!(
        events(&mut c)[..],
        [Event::Pong { nonce: n, rtt: Some(r) }] if n == nonce && r == rtt
    ));
    assert_eq!(c.rtt(), Some(rtt));
}

#[test]
fn a_silent_peer_ends_the_session_at_the_idle_timeout() {
    let config = MuxConfig {
        ping_interval: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(30),
        sync_interval: None,
        ..MuxConfig::default()
    };
    let mut c = Conn::new(Role::Server, config, MuxMetrics::unregistered(), Time::ZERO);
    let at = |secs| Time::from_epoch(Duration::from_secs(secs));
    assert_eq!(c.poll_timeout(), at(10));
    c.handle_timeout(at(10)).unwrap();
    assert!(matches!(transmitted(&mut c)[..], [Frame::Ping { .. }]));
    // A frame at 25 s moves the idle deadline to 55 s.
    c.handle_frame(Frame::Ping { nonce: 1 }, at(25)).unwrap();
    c.handle_timeout(at(20)).unwrap();
    c.handle_timeout(at(30)).unwrap();
    c.handle_timeout(at(50)).unwrap();
    assert_eq!(c.poll_timeout(), at(55));
    assert!(matches!(
        c.handle_timeout(at(55)),
        Err(SessionEnd::IdleTimeout)
    ));
}

#[test]
fn an_abandoned_open_is_reset_and_released() {
    let mut c = conn();
    let id = c.open(target(), Duration::from_secs(1), false).unwrap();
    c.abandon_open(id);
    let sent = transmitted(&mut c);
    assert!(matches!(sent[0], Frame::Open { stream, .. } if stream == id));
    assert!(matches!(
        sent[1],
        Frame::Rst { stream, code: ResetCode::Cancelled, .. } if stream == id
    ));
    assert_eq!(c.stream_count(), 0);
    assert!(
        events(&mut c)
            .iter()
            .any(|e| matches!(e, Event::Removed(s) if *s == id))
    );
}

// === two Conns ===

/// Side 0 opens, side 1 accepts; returns the stream id.
fn open_pair(h: &mut Harness) -> StreamId {
    h.step(&Action::Open(0, false));
    h.step(&Action::Flush(0, 8));
    h.step(&Action::Deliver(1, 8));
    let id = h.sides[1].incoming[0];
    h.step(&Action::Accept(1, 0));
    h.step(&Action::Flush(1, 8));
    h.step(&Action::Deliver(0, 8));
    assert_eq!(h.sides[0].handles, [id]);
    assert_eq!(h.sides[1].handles, [id]);
    id
}

#[test]
fn open_ok_goes_out_before_the_first_data() {
    let mut h = Harness::small();
    h.step(&Action::Open(0, false));
    h.step(&Action::Flush(0, 8));
    h.step(&Action::Deliver(1, 8));
    h.step(&Action::Accept(1, 0));
    h.step(&Action::Write(1, 0, 5));
    h.step(&Action::Fin(1, 0));
    h.step(&Action::Flush(1, 8));
    let kinds: Vec<&str> = h.sides[1]
        .sent
        .iter()
        .map(|f| match f {
            Frame::OpenOk { .. } => "open_ok",
            Frame::Data { .. } => "data",
            Frame::Fin { .. } => "fin",
            _ => "other",
        })
        .collect();
    assert_eq!(kinds, ["open_ok", "data", "fin"]);
    h.settle();
}

#[test]
fn writes_stop_at_the_window_and_resume_on_window() {
    let mut h = Harness::small();
    let id = open_pair(&mut h);
    let window = h.config.window as usize;
    for _ in 0..8 {
        h.step(&Action::Write(0, 0, 1024));
        h.step(&Action::Flush(0, 8));
    }
    let sent: usize = h.sides[0]
        .sent
        .iter()
        .map(|f| match f {
            Frame::Data { payload, .. } => payload.len(),
            _ => 0,
        })
        .sum();
    assert_eq!(sent, window, "the whole window and no more");
    assert!(h.sides[0].conn.send_credit(id, 1, false).is_pending());
    // The reader takes everything: credit comes back as WINDOW.
    h.step(&Action::Deliver(1, 64));
    for _ in 0..8 {
        h.step(&Action::Read(1, 0, 1024));
    }
    h.step(&Action::Flush(1, 8));
    h.step(&Action::Deliver(0, 8));
    assert!(matches!(
        h.sides[0].conn.send_credit(id, usize::MAX, false),
        Poll::Ready(Ok(1024))
    ));
    h.settle();
}

#[test]
fn data_beyond_the_window_resets_with_flow_control() {
    let mut h = Harness::small();
    let id = open_pair(&mut h);
    let over = Bytes::from(vec![0u8; 1000]);
    for _ in 0..5 {
        let frame = Frame::Data {
            stream: id,
            payload: over.clone(),
        };
        h.receive(1, frame);
    }
    let reset = h.sides[1].conn.poll_transmit();
    assert!(
        matches!(
            reset,
            Some(Frame::Rst {
                code: ResetCode::FlowControl,
                ..
            })
        ),
        "{reset:?}"
    );
    assert_eq!(
        h.sides[1]
            .metrics
            .protocol_errors
            .with_label_values(&["flow_control"])
            .get(),
        1
    );
}

#[test]
fn fin_and_rst_leave_after_the_queued_data() {
    let mut h = Harness::small();
    let id = open_pair(&mut h);
    h.step(&Action::Write(0, 0, 1024));
    h.step(&Action::Write(0, 0, 1024));
    h.step(&Action::Fin(0, 0));
    h.step(&Action::Drop(0, 0));
    h.step(&Action::Flush(0, 8));
    let tail: Vec<&str> = h.sides[0]
        .sent
        .iter()
        .filter(|f| f.stream() == id)
        .map(|f| match f {
            Frame::Data { .. } => "data",
            Frame::Fin { .. } => "fin",
            Frame::Rst { .. } => "rst",
            _ => "other",
        })
        .collect();
    assert_eq!(tail, ["other", "data", "data", "fin", "rst"]);
    h.settle();
}

#[test]
fn a_reset_drops_the_data_still_queued() {
    let mut h = Harness::small();
    let id = open_pair(&mut h);
    h.step(&Action::Write(0, 0, 1024));
    h.step(&Action::Reset(0, 0));
    h.step(&Action::Flush(0, 8));
    let ours: Vec<&Frame> = h.sides[0]
        .sent
        .iter()
        .filter(|f| f.stream() == id)
        .collect();
    assert!(
        matches!(ours[..], [Frame::Open { .. }, Frame::Rst { .. }]),
        "{ours:?}"
    );
    h.settle();
}

#[test]
fn sync_resets_unlisted_streams_up_to_high_only() {
    let mut h = Harness::small();
    let id = open_pair(&mut h);
    // The agent lists nothing up to its highest peer id: the server's stream is reaped.
    // (Straight into the core: the harness would flag this SYNC, which the agent never sent.)
    let now = h.now;
    let sync = |high, c: &mut Conn| c.handle_frame(Frame::Sync { high, open: vec![] }, now);
    sync(id, &mut h.sides[0].conn).unwrap();
    let reaped = h.sides[0]
        .metrics
        .protocol_errors
        .with_label_values(&["sync_reaped"])
        .get();
    assert_eq!(reaped, 1);
    // A SYNC whose high is below a stream leaves that stream alone.
    let id2 = {
        h.step(&Action::Open(0, false));
        h.sides[0].opening[0]
    };
    sync(id2 - 2, &mut h.sides[0].conn).unwrap();
    let reaped = h.sides[0]
        .metrics
        .protocol_errors
        .with_label_values(&["sync_reaped"])
        .get();
    assert_eq!(reaped, 1, "stream {id2} is above high");
}

#[test]
fn goaway_refuses_new_opens_both_ways_and_streams_go_on() {
    let mut h = Harness::small();
    let id = open_pair(&mut h);
    h.sides[1]
        .conn
        .goaway(tether_proto::GoAwayCode::Replaced, "bye");
    h.step(&Action::Flush(1, 8));
    h.step(&Action::Deliver(0, 8));
    assert!(matches!(
        h.sides[0]
            .conn
            .open(target(), Duration::from_secs(1), false),
        Err(OpenError::Draining)
    ));
    // The agent refuses the server's opens that cross its GOAWAY.
    h.receive(1, open_frame(id + 2, 1024));
    assert!(matches!(
        h.sides[1].conn.poll_transmit(),
        Some(Frame::OpenErr {
            code: OpenErrorCode::Draining,
            ..
        })
    ));
    h.step(&Action::Write(0, 0, 10));
    h.step(&Action::Flush(0, 8));
    h.step(&Action::Deliver(1, 8));
    assert_eq!(h.sides[1].conn.buffered(id), 10);
    h.settle();
}

#[test]
fn keepalive_pings_flow_and_sync_reaps_nothing_that_lives() {
    let mut h = Harness::small();
    open_pair(&mut h);
    for _ in 0..10 {
        h.step(&Action::Advance(Duration::from_millis(700)));
        for i in 0..2 {
            h.step(&Action::Flush(i, 64));
            h.step(&Action::Deliver(1 - i, 64));
        }
    }
    let pings = h.sides[0]
        .sent
        .iter()
        .filter(|f| matches!(f, Frame::Ping { .. }))
        .count();
    let syncs = h.sides[0]
        .sent
        .iter()
        .filter(|f| matches!(f, Frame::Sync { .. }))
        .count();
    // Every 1 s and 2 s, on the first advance (0.7 s steps) at or past each deadline.
    assert_eq!((pings, syncs), (5, 3));
    assert!(h.sides[0].conn.rtt().is_some());
    for side in &h.sides {
        assert_eq!(
            side.metrics
                .protocol_errors
                .with_label_values(&["sync_reaped"])
                .get(),
            0
        );
    }
    h.settle();
}

#[test]
fn the_session_end_fails_every_stream_and_pending_open() {
    let mut h = Harness::small();
    let id = open_pair(&mut h);
    h.step(&Action::Open(0, false));
    let opening = h.sides[0].opening[0];
    // The stream's reader waits (nothing received yet); only a waiting reader is woken.
    assert!(
        h.sides[0]
            .conn
            .consume(id, |b| ((), b.len()), false, Time::ZERO)
            .is_pending()
    );
    h.sides[0].conn.end_session(SessionEnd::PeerClosed);
    let evs = events(&mut h.sides[0].conn);
    assert!(evs.iter().any(|e| matches!(
        e,
        Event::Opened(s, Err(OpenError::SessionClosed)) if *s == opening
    )));
    assert!(
        evs.iter()
            .any(|e| matches!(e, Event::Readable(s) if *s == id))
    );
    let err = h.sides[0]
        .conn
        .consume(id, |b| ((), b.len()), false, Time::ZERO);
    assert!(
        matches!(err, Poll::Ready(Err(ref e)) if e.kind() == std::io::ErrorKind::ConnectionAborted)
    );
}

// === invariants under random actions ===

fn action() -> impl Strategy<Value = Action> {
    let side = 0..2usize;
    let pick = 0..4usize;
    prop_oneof![
        2 => (side.clone(), any::<bool>()).prop_map(|(s, e)| Action::Open(s, e)),
        2 => (side.clone(), pick.clone()).prop_map(|(s, p)| Action::Accept(s, p)),
        1 => (side.clone(), pick.clone()).prop_map(|(s, p)| Action::Refuse(s, p)),
        1 => (side.clone(), pick.clone()).prop_map(|(s, p)| Action::Abandon(s, p)),
        4 => (side.clone(), pick.clone(), 1..3000usize).prop_map(|(s, p, n)| Action::Write(s, p, n)),
        1 => (side.clone(), pick.clone()).prop_map(|(s, p)| Action::Fin(s, p)),
        4 => (side.clone(), pick.clone(), 1..3000usize).prop_map(|(s, p, n)| Action::Read(s, p, n)),
        1 => (side.clone(), pick.clone()).prop_map(|(s, p)| Action::Reset(s, p)),
        1 => (side.clone(), pick.clone()).prop_map(|(s, p)| Action::Drop(s, p)),
        4 => (side.clone(), 1..6usize).prop_map(|(s, n)| Action::Flush(s, n)),
        4 => (side.clone(), 1..6usize).prop_map(|(s, n)| Action::Deliver(s, n)),
        1 => side.prop_map(Action::Ping),
        1 => (0..3000u64).prop_map(|ms| Action::Advance(Duration::from_millis(ms))),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Credit never exceeds the window; opened == closed at rest; no frame for a removed
    /// stream; RST never overtakes queued DATA; SYNC never reaps a stream the peer lists.
    #[test]
    fn invariants_hold_under_random_actions(actions in prop::collection::vec(action(), 1..200)) {
        run_actions(&actions);
    }

    /// The fuzz target's decoder on random bytes.
    #[test]
    fn decoded_byte_actions_keep_the_invariants(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        run_actions(&Action::decode(&bytes));
    }
}

// === more frame-level cases of the scripted session tests ===

fn malformed(message: &[u8]) -> tether_proto::ProtoError {
    let msg = Bytes::copy_from_slice(message);
    tether_proto::codec::decode(&msg, &tether_proto::Limits::default()).unwrap_err()
}

#[test]
fn malformed_frames_reset_their_stream_refuse_a_bad_open_or_end_the_session() {
    let mut h = Harness::small();
    let id = open_pair(&mut h);
    let now = h.now;
    let c = &mut h.sides[1].conn;
    // A WINDOW for the open stream with trailing bytes: that stream is reset, the session
    // goes on.
    let err = malformed(&[5, id as u8, 10, 0xAA]);
    assert_eq!(err.stream, Some(id));
    c.handle_malformed(&err, now).unwrap();
    assert!(matches!(
        c.poll_transmit(),
        Some(Frame::Rst { stream, code: ResetCode::Protocol, .. }) if stream == id
    ));
    // An OPEN whose target does not parse: refused as unsupported, its id counts as used.
    let mut open = vec![1u8, 3, 0x80, 0x08, 100];
    open.extend_from_slice(b"udp/\xff\x00:0");
    c.handle_malformed(&malformed(&open), now).unwrap();
    assert!(matches!(
        c.poll_transmit(),
        Some(Frame::OpenErr {
            stream: 3,
            code: OpenErrorCode::Unsupported,
            ..
        })
    ));
    assert!(c.handle_frame(open_frame(3, 1024), now).is_err());
    // Nothing to attribute it to: the session ends.
    let mut fresh = conn();
    let result = fresh.handle_malformed(&malformed(&[]), now);
    assert!(matches!(result, Err(SessionEnd::Protocol(_))), "{result:?}");
}

#[test]
fn data_after_fin_resets_the_stream() {
    let mut h = Harness::small();
    let id = open_pair(&mut h);
    h.step(&Action::Fin(0, 0));
    h.step(&Action::Flush(0, 8));
    h.step(&Action::Deliver(1, 8));
    h.receive(1, data(id, b"late"));
    assert!(matches!(
        h.sides[1].conn.poll_transmit(),
        Some(Frame::Rst {
            code: ResetCode::Protocol,
            ..
        })
    ));
    let errors = &h.sides[1].metrics.protocol_errors;
    assert_eq!(errors.with_label_values(&["data_after_fin"]).get(), 1);
}

#[test]
fn reading_everything_grants_the_whole_window_back() {
    let mut h = Harness::small();
    let id = open_pair(&mut h);
    for _ in 0..4 {
        h.step(&Action::Write(0, 0, 1024));
    }
    h.step(&Action::Flush(0, 8));
    h.step(&Action::Deliver(1, 8));
    for _ in 0..4 {
        h.step(&Action::Read(1, 0, 1024));
    }
    let granted: u32 = std::iter::from_fn(|| h.sides[1].conn.poll_transmit())
        .map(|f| match f {
            Frame::Window { stream, increment } if stream == id => increment,
            _ => 0,
        })
        .sum();
    assert_eq!(granted, h.config.window);
}

#[test]
fn an_open_refused_by_the_peer_fails_and_is_released() {
    let mut h = Harness::small();
    h.step(&Action::Open(0, false));
    let id = h.sides[0].opening[0];
    h.step(&Action::Flush(0, 8));
    h.step(&Action::Deliver(1, 8));
    h.step(&Action::Refuse(1, 0));
    h.step(&Action::Flush(1, 8));
    // What the opener hears, before the harness (as the shell) abandons the failed open.
    let now = h.now;
    let err = Frame::OpenErr {
        stream: id,
        code: OpenErrorCode::Unreachable,
        message: "refused".into(),
    };
    h.sides[0].conn.handle_frame(err, now).unwrap();
    let evs = events(&mut h.sides[0].conn);
    assert!(evs.iter().any(|e| matches!(
        e,
        Event::Opened(s, Err(OpenError::Refused { code: OpenErrorCode::Unreachable, .. })) if *s == id
    )));
    h.sides[0].opening.clear();
    h.sides[0].conn.abandon_open(id);
    assert_eq!(h.sides[0].conn.stream_count(), 0);
    let refused = h.sides[0]
        .metrics
        .closed
        .with_label_values(&["refused"])
        .get();
    assert_eq!(refused, 1);
    h.wires[0].clear();
    h.settle();
}

#[test]
fn a_ping_in_flight_is_forgotten_when_the_session_ends() {
    let mut c = conn();
    let nonce = c.ping(Time::ZERO).unwrap();
    c.end_session(SessionEnd::PeerClosed);
    assert!(matches!(
        events(&mut c)[..],
        [Event::Pong { nonce: n, rtt: None }] if n == nonce
    ));
    assert!(matches!(c.ping(Time::ZERO), Err(OpenError::SessionClosed)));
}
