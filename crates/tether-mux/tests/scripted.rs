//! A real session against a hand-driven peer: how each frame a peer may send (well-formed or
//! not) changes the session, and what the session answers.
#![allow(clippy::unwrap_used)]

mod common;

use std::io;
use std::time::Duration;

use bytes::Bytes;
use common::{Scripted, bounded, read_until_error, target, wait_until};
use tether_mux::{MuxConfig, MuxStream, OpenError, Role, SessionEnd};
use tether_proto::{Frame, GoAwayCode, OpenErrorCode, ResetCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The session under test is the server (odd ids); the scripted peer is the agent (even ids).
fn scripted() -> Scripted {
    Scripted::new(Role::Server, MuxConfig::default())
}

fn open_frame(stream: u64, window: u32) -> Frame {
    Frame::Open {
        stream,
        window,
        timeout_ms: 1000,
        target: target(),
    }
}

fn data(stream: u64, payload: &[u8]) -> Frame {
    Frame::Data {
        stream,
        payload: Bytes::copy_from_slice(payload),
    }
}

/// The peer opens `stream`; the session accepts it and answers OPEN_OK.
async fn peer_opens(t: &mut Scripted, stream: u64, window: u32) -> MuxStream {
    t.send(open_frame(stream, window)).await;
    let pending = bounded("incoming", t.incoming.accept()).await.unwrap();
    assert_eq!(pending.id(), stream);
    let handle = pending.accept().unwrap();
    match t.recv().await {
        Frame::OpenOk { stream: s, window } => {
            assert_eq!(s, stream);
            assert_eq!(window, t.session_window());
        }
        other => panic!("expected OPEN_OK, got {other:?}"),
    }
    handle
}

/// The session opens a stream; the peer answers OPEN_OK with `window`.
async fn session_opens(t: &mut Scripted, window: u32) -> MuxStream {
    let session = t.session.clone();
    let opening = tokio::spawn(async move { session.open(target()).await });
    let id = match t.recv().await {
        Frame::Open { stream, .. } => stream,
        other => panic!("expected OPEN, got {other:?}"),
    };
    t.send(Frame::OpenOk { stream: id, window }).await;
    let stream = bounded("open", opening).await.unwrap().unwrap();
    assert_eq!(stream.id(), id);
    stream
}

trait SessionWindow {
    fn session_window(&self) -> u32;
}

impl SessionWindow for Scripted {
    fn session_window(&self) -> u32 {
        MuxConfig::default().window
    }
}

fn protocol_errors(t: &Scripted, kind: &str) -> u64 {
    t.metrics.protocol_errors.with_label_values(&[kind]).get()
}

#[tokio::test]
async fn frames_for_an_unknown_stream_get_rst_and_the_session_survives() {
    let mut t = scripted();
    t.send(data(8, b"who?")).await;
    assert_eq!(
        t.recv().await,
        Frame::Rst {
            stream: 8,
            code: ResetCode::UnknownStream,
            message: String::new()
        }
    );
    t.send(Frame::Fin { stream: 10 }).await;
    assert!(matches!(
        t.recv().await,
        Frame::Rst {
            stream: 10,
            code: ResetCode::UnknownStream,
            ..
        }
    ));
    // RST and WINDOW for unknown streams are dropped silently (no RST ping-pong).
    t.send(Frame::Rst {
        stream: 12,
        code: ResetCode::Cancelled,
        message: String::new(),
    })
    .await;
    t.send(Frame::Window {
        stream: 12,
        increment: 5,
    })
    .await;
    assert!(t.barrier(1).await.is_empty());
    assert!(!t.session.is_closed());
    // The session still works.
    let mut s = peer_opens(&mut t, 2, 1024).await;
    s.write_all(b"ok").await.unwrap();
    assert_eq!(t.recv().await, data(2, b"ok"));
    drop(s);
    t.finish().await;
}

#[tokio::test]
async fn open_ok_goes_out_before_the_first_data() {
    let mut t = scripted();
    t.send(open_frame(2, 1024)).await;
    let pending = bounded("incoming", t.incoming.accept()).await.unwrap();
    let mut s = pending.accept().unwrap();
    s.write_all(b"first").await.unwrap();
    s.shutdown().await.unwrap();
    assert!(matches!(t.recv().await, Frame::OpenOk { stream: 2, .. }));
    assert_eq!(t.recv().await, data(2, b"first"));
    assert_eq!(t.recv().await, Frame::Fin { stream: 2 });
    drop(s);
    t.finish().await;
}

#[tokio::test]
async fn writes_respect_the_peers_window_and_resume_on_window() {
    let mut t = scripted();
    let mut s = peer_opens(&mut t, 2, 10).await;
    let writer = tokio::spawn(async move {
        s.write_all(b"0123456789abcdefghij").await.unwrap();
        s
    });
    assert_eq!(t.recv().await, data(2, b"0123456789"));
    // Nothing more until credit comes.
    assert!(t.barrier(1).await.is_empty());
    assert!(!writer.is_finished());
    t.send(Frame::Window {
        stream: 2,
        increment: 4,
    })
    .await;
    assert_eq!(t.recv().await, data(2, b"abcd"));
    t.send(Frame::Window {
        stream: 2,
        increment: 100,
    })
    .await;
    assert_eq!(t.recv().await, data(2, b"efghij"));
    let s = bounded("writer", writer).await.unwrap();
    drop(s);
    t.finish().await;
}

#[tokio::test]
async fn data_beyond_the_window_resets_with_flow_control() {
    let config = MuxConfig {
        window: 1000,
        ..MuxConfig::default()
    };
    let mut t = Scripted::new(Role::Server, config);
    t.send(open_frame(2, 1024)).await;
    let pending = bounded("incoming", t.incoming.accept()).await.unwrap();
    let mut s = pending.accept().unwrap();
    assert!(matches!(
        t.recv().await,
        Frame::OpenOk {
            stream: 2,
            window: 1000
        }
    ));
    t.send(data(2, &[1; 600])).await;
    t.send(data(2, &[2; 400])).await;
    assert!(t.barrier(1).await.is_empty());
    assert_eq!(s.debug_buffered(), 1000);
    t.send(data(2, &[3; 1])).await;
    assert!(matches!(
        t.recv().await,
        Frame::Rst {
            stream: 2,
            code: ResetCode::FlowControl,
            ..
        }
    ));
    let (err, _) = read_until_error(&mut s).await;
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    assert_eq!(protocol_errors(&t, "flow_control"), 1);
    // More offending frames on the reset stream bring no second RST.
    t.send(data(2, &[4; 10])).await;
    assert!(t.barrier(2).await.is_empty());
    drop(s);
    // Once the handle is gone the id is unknown.
    t.send(data(2, &[5; 1])).await;
    assert!(matches!(
        t.recv().await,
        Frame::Rst {
            stream: 2,
            code: ResetCode::UnknownStream,
            ..
        }
    ));
    t.finish().await;
}

#[tokio::test]
async fn data_after_fin_resets_the_stream() {
    let mut t = scripted();
    let mut s = peer_opens(&mut t, 2, 1024).await;
    t.send(data(2, b"abc")).await;
    t.send(Frame::Fin { stream: 2 }).await;
    t.send(data(2, b"late")).await;
    assert!(matches!(
        t.recv().await,
        Frame::Rst {
            stream: 2,
            code: ResetCode::Protocol,
            ..
        }
    ));
    let (err, _) = read_until_error(&mut s).await;
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    assert_eq!(protocol_errors(&t, "data_after_fin"), 1);
    drop(s);
    t.finish().await;
}

#[tokio::test]
async fn reading_everything_grants_the_whole_window_back() {
    let mut t = scripted();
    let window = MuxConfig::default().window;
    let mut s = peer_opens(&mut t, 2, 1024).await;
    let chunk = vec![7u8; 64 * 1024];
    for _ in 0..2 {
        let mut sent = 0u32;
        while sent < window {
            t.send(data(2, &chunk)).await;
            sent += chunk.len() as u32;
        }
        let mut buf = vec![0u8; window as usize];
        s.read_exact(&mut buf).await.unwrap();
        // Every byte read is granted back (in batches), so the peer can send a whole window
        // again; a second round over the limit would be reset.
        let mut granted = 0u32;
        while granted < window {
            match t.recv().await {
                Frame::Window {
                    stream: 2,
                    increment,
                } => granted += increment,
                other => panic!("expected WINDOW, got {other:?}"),
            }
        }
        assert_eq!(granted, window);
    }
    assert_eq!(s.debug_buffered(), 0);
    drop(s);
    t.finish().await;
}

#[tokio::test]
async fn open_with_stream_id_zero_ends_the_session() {
    let mut t = scripted();
    t.send(open_frame(0, 1024)).await;
    bounded("session ends", t.session.closed()).await;
    assert!(matches!(
        t.session.end_reason(),
        Some(SessionEnd::Protocol(_))
    ));
    assert!(matches!(t.finish().await, SessionEnd::Protocol(_)));
}

#[tokio::test]
async fn open_with_the_wrong_parity_ends_the_session() {
    let mut t = scripted();
    // Odd ids belong to the server, which is the session under test.
    t.send(open_frame(3, 1024)).await;
    bounded("session ends", t.session.closed()).await;
    let end = t.finish().await;
    assert!(
        matches!(&end, SessionEnd::Protocol(m) if m.contains("parity")),
        "{end:?}"
    );
}

#[tokio::test]
async fn open_reusing_an_id_ends_the_session() {
    let mut t = scripted();
    let s = peer_opens(&mut t, 4, 1024).await;
    t.send(open_frame(4, 1024)).await;
    bounded("session ends", t.session.closed()).await;
    let mut s = s;
    let (err, _) = read_until_error(&mut s).await;
    assert_eq!(err.kind(), io::ErrorKind::ConnectionAborted);
    drop(s);
    let end = t.finish().await;
    assert!(
        matches!(&end, SessionEnd::Protocol(m) if m.contains("reused")),
        "{end:?}"
    );

    // A lower id than one already seen is a reuse too.
    let mut t = scripted();
    let s = peer_opens(&mut t, 6, 1024).await;
    t.send(open_frame(2, 1024)).await;
    bounded("session ends", t.session.closed()).await;
    drop(s);
    assert!(matches!(t.finish().await, SessionEnd::Protocol(_)));
}

#[tokio::test]
async fn open_with_an_undecodable_target_is_refused_as_unsupported() {
    let mut t = scripted();
    // type OPEN, stream 2, window 1024 (varint), timeout 100, then a target that is not one.
    let mut message = vec![1u8, 2, 0x80, 0x08, 100];
    message.extend_from_slice(b"udp/\xff\x00:0");
    t.send_raw(&message).await;
    match t.recv().await {
        Frame::OpenErr { stream, code, .. } => {
            assert_eq!(stream, 2);
            assert_eq!(code, OpenErrorCode::Unsupported);
        }
        other => panic!("expected OPEN_ERR, got {other:?}"),
    }
    assert_eq!(protocol_errors(&t, "bad_target"), 1);
    // The session goes on, and the refused id counts as used.
    assert!(t.barrier(1).await.is_empty());
    let s = peer_opens(&mut t, 4, 1024).await;
    drop(s);
    t.finish().await;
}

#[tokio::test]
async fn a_malformed_frame_on_a_known_stream_resets_only_that_stream() {
    let mut t = scripted();
    let mut s = peer_opens(&mut t, 2, 1024).await;
    let other = peer_opens(&mut t, 4, 1024).await;
    // WINDOW with trailing bytes.
    t.send_raw(&[5, 2, 10, 0xAA]).await;
    assert!(matches!(
        t.recv().await,
        Frame::Rst {
            stream: 2,
            code: ResetCode::Protocol,
            ..
        }
    ));
    // The same again: no second RST.
    t.send_raw(&[5, 2, 10, 0xAA]).await;
    assert!(t.barrier(1).await.is_empty());
    let (err, _) = read_until_error(&mut s).await;
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    // A DATA payload over max_data (the length prefix itself is within bounds).
    let mut other = other;
    let mut message = vec![4u8, 4];
    message.extend(std::iter::repeat_n(
        0u8,
        MuxConfig::default().max_data as usize + 1,
    ));
    t.send_raw(&message).await;
    assert!(matches!(
        t.recv().await,
        Frame::Rst {
            stream: 4,
            code: ResetCode::Protocol,
            ..
        }
    ));
    let (err, _) = read_until_error(&mut other).await;
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    assert!(!t.session.is_closed());
    assert_eq!(protocol_errors(&t, "too_large"), 1);
    drop((s, other));
    t.finish().await;
}

#[tokio::test]
async fn a_malformed_frame_for_a_stream_that_is_not_open_resets_only_that_stream() {
    let mut t = scripted();
    let mut s = peer_opens(&mut t, 2, 1024).await;
    // FIN with a body, for stream 10 that was never opened: the frame names its stream.
    t.send_raw(&[6, 10, 0xAA, 0xBB]).await;
    assert!(matches!(
        t.recv().await,
        Frame::Rst {
            stream: 10,
            code: ResetCode::UnknownStream,
            ..
        }
    ));
    // A malformed WINDOW for an unknown stream is dropped, as a valid one would be.
    t.send_raw(&[5, 12, 10, 0xAA]).await;
    assert!(t.barrier(1).await.is_empty());
    assert!(!t.session.is_closed());
    assert_eq!(protocol_errors(&t, "trailing_bytes"), 2);
    // The open stream is untouched.
    s.write_all(b"ok").await.unwrap();
    assert_eq!(t.recv().await, data(2, b"ok"));
    drop(s);
    t.finish().await;
}

#[tokio::test]
async fn an_unattributable_frame_ends_the_session() {
    let mut t = scripted();
    // A length prefix over the limit: the byte stream cannot be resynchronised.
    let mut buf = bytes::BytesMut::new();
    tether_proto::varint::put_varint(&mut buf, 10 * 1024 * 1024);
    futures::SinkExt::flush(&mut t.peer).await.unwrap();
    t.peer.get_mut().write_all(&buf).await.unwrap();
    bounded("session ends", t.session.closed()).await;
    assert!(matches!(t.finish().await, SessionEnd::Protocol(_)));
}

#[tokio::test]
async fn unknown_frame_types_are_ignored() {
    let mut t = scripted();
    let s = peer_opens(&mut t, 2, 1024).await;
    t.send_raw(&[42, 2, 1, 2, 3]).await;
    t.send_raw(&[200, 0]).await;
    t.send(Frame::Unknown {
        frame_type: 99,
        stream: 77,
    })
    .await;
    assert!(t.barrier(5).await.is_empty());
    assert!(!t.session.is_closed());
    drop(s);
    t.finish().await;
}

#[tokio::test]
async fn ping_is_answered_with_pong_and_the_same_nonce() {
    let mut t = scripted();
    for nonce in [0, 1, u64::MAX, 0xDEAD_BEEF] {
        t.send(Frame::Ping { nonce }).await;
        assert_eq!(t.recv().await, Frame::Pong { nonce });
    }
    t.finish().await;
}

#[tokio::test(start_paused = true)]
async fn session_ping_measures_the_round_trip_time() {
    let mut t = scripted();
    let session = t.session.clone();
    let ping = tokio::spawn(async move { session.ping().await });
    let nonce = match t.recv_any().await {
        Frame::Ping { nonce } => nonce,
        other => panic!("expected PING, got {other:?}"),
    };
    // An unknown nonce is ignored.
    t.send(Frame::Pong {
        nonce: nonce.wrapping_add(1000),
    })
    .await;
    tokio::time::advance(Duration::from_millis(250)).await;
    t.send(Frame::Pong { nonce }).await;
    let rtt = bounded("ping", ping).await.unwrap().unwrap();
    assert!(rtt >= Duration::from_millis(250), "{rtt:?}");
    assert!(rtt < Duration::from_millis(300), "{rtt:?}");
    assert_eq!(t.session.stats().rtt, Some(rtt));
    t.finish().await;
}

#[tokio::test(start_paused = true)]
async fn a_silent_peer_ends_the_session_with_idle_timeout() {
    let mut t = scripted();
    let idle = MuxConfig::default().idle_timeout;
    let started = tokio::time::Instant::now();
    // The peer reads (pings arrive) but never sends anything.
    let session = t.session.clone();
    let ended = tokio::time::timeout(idle * 2, async {
        tokio::select! {
            _ = session.closed() => {}
            _ = async { loop { let _ = futures::StreamExt::next(&mut t.peer).await; } } => {}
        }
    });
    ended
        .await
        .expect("session ends within twice the idle timeout");
    let elapsed = started.elapsed();
    assert!(elapsed >= idle, "{elapsed:?}");
    assert!(
        elapsed <= idle + idle / 4 + Duration::from_secs(1),
        "{elapsed:?}"
    );
    assert!(matches!(
        t.session.end_reason(),
        Some(SessionEnd::IdleTimeout)
    ));
    assert!(matches!(t.finish().await, SessionEnd::IdleTimeout));
}

#[tokio::test(start_paused = true)]
async fn a_peer_that_falls_silent_is_declared_dead_within_a_tenth_past_the_idle_timeout() {
    let mut t = scripted();
    let idle = MuxConfig::default().idle_timeout;
    // The last frame from the peer arrives between two keepalive checks.
    tokio::time::sleep(Duration::from_millis(1_300)).await;
    t.send(Frame::Ping { nonce: 7 }).await;
    let last_frame = tokio::time::Instant::now();
    let session = t.session.clone();
    tokio::time::timeout(idle * 2, async {
        tokio::select! {
            _ = session.closed() => {}
            _ = async { loop { let _ = futures::StreamExt::next(&mut t.peer).await; } } => {}
        }
    })
    .await
    .expect("session ends within twice the idle timeout");
    let silent = last_frame.elapsed();
    assert!(silent >= idle, "{silent:?}");
    assert!(
        silent <= idle + idle / 10,
        "declared dead after {silent:?} of silence"
    );
    assert!(matches!(t.finish().await, SessionEnd::IdleTimeout));
}

#[tokio::test(start_paused = true)]
async fn a_peer_that_answers_pings_stays_alive() {
    let mut t = scripted();
    let idle = MuxConfig::default().idle_timeout;
    let deadline = tokio::time::Instant::now() + idle * 4;
    while tokio::time::Instant::now() < deadline {
        if let Frame::Ping { nonce } = t.recv_any().await {
            t.send(Frame::Pong { nonce }).await;
        }
    }
    assert!(!t.session.is_closed());
    assert!(t.session.stats().rtt.is_some());
    t.finish().await;
}

#[tokio::test]
async fn sync_resets_unlisted_streams_up_to_high_only() {
    let mut t = scripted();
    // The session opens 1, 3 and 5; the peer opens 2.
    let mut s1 = session_opens(&mut t, 1024).await;
    let mut s3 = session_opens(&mut t, 1024).await;
    let mut s5 = session_opens(&mut t, 1024).await;
    let mut s2 = peer_opens(&mut t, 2, 1024).await;
    assert_eq!((s1.id(), s3.id(), s5.id()), (1, 3, 5));
    // Stream 3 finishes both ways, with bytes still unread on this side.
    t.send(data(3, b"tail")).await;
    t.send(Frame::Fin { stream: 3 }).await;
    s3.shutdown().await.unwrap();
    assert_eq!(t.recv().await, Frame::Fin { stream: 3 });
    assert!(t.barrier(1).await.is_empty());
    // The peer's snapshot saw our ids up to 3: it lists 2 only (3 is finished there, 1 is gone,
    // 5 came after the snapshot).
    t.send(Frame::Sync {
        high: 3,
        open: vec![2],
    })
    .await;
    assert!(
        t.barrier(2).await.is_empty(),
        "a reaped stream is not reset on the wire"
    );
    let (err, _) = read_until_error(&mut s1).await;
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    // The finished stream keeps its bytes and ends with EOF.
    let mut rest = Vec::new();
    s3.read_to_end(&mut rest).await.unwrap();
    assert_eq!(rest, b"tail");
    // 5 and 2 survive.
    s5.write_all(b"five").await.unwrap();
    assert_eq!(t.recv().await, data(5, b"five"));
    s2.write_all(b"two").await.unwrap();
    assert_eq!(t.recv().await, data(2, b"two"));
    assert_eq!(protocol_errors(&t, "sync_reaped"), 1);
    drop((s1, s2, s3, s5));
    t.finish().await;
}

#[tokio::test(start_paused = true)]
async fn the_session_sends_sync_listing_its_live_streams() {
    let mut t = scripted();
    let s1 = session_opens(&mut t, 1024).await;
    let s2 = peer_opens(&mut t, 2, 1024).await;
    let s4 = peer_opens(&mut t, 4, 1024).await;
    drop(s4);
    assert!(matches!(t.recv().await, Frame::Rst { stream: 4, .. }));
    let sync = loop {
        match t.recv_any().await {
            Frame::Sync { high, open } => break (high, open),
            Frame::Ping { nonce } => t.send(Frame::Pong { nonce }).await,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(sync, (4, vec![1, 2]));
    drop((s1, s2));
    t.finish().await;
}

#[tokio::test]
async fn goaway_from_the_peer_makes_open_fail_but_streams_go_on() {
    let mut t = scripted();
    let mut s = peer_opens(&mut t, 2, 1024).await;
    t.send(Frame::GoAway {
        code: GoAwayCode::Replaced,
        message: "newer session".into(),
    })
    .await;
    assert!(t.barrier(1).await.is_empty());
    assert_eq!(
        t.session.peer_goaway(),
        Some((GoAwayCode::Replaced, "newer session".to_owned()))
    );
    assert!(matches!(
        t.session.open(target()).await,
        Err(OpenError::Draining)
    ));
    t.send(data(2, b"still here")).await;
    let mut buf = [0u8; 10];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"still here");
    s.write_all(b"me too").await.unwrap();
    assert_eq!(t.recv().await, data(2, b"me too"));
    drop(s);
    t.finish().await;
}

#[tokio::test]
async fn after_a_local_goaway_new_opens_are_refused_with_draining() {
    let mut t = scripted();
    let s = peer_opens(&mut t, 2, 1024).await;
    t.session.goaway(GoAwayCode::Shutdown, "bye");
    assert_eq!(
        t.recv().await,
        Frame::GoAway {
            code: GoAwayCode::Shutdown,
            message: "bye".into()
        }
    );
    t.send(open_frame(4, 1024)).await;
    assert!(matches!(
        t.recv().await,
        Frame::OpenErr {
            stream: 4,
            code: OpenErrorCode::Draining,
            ..
        }
    ));
    assert!(matches!(
        t.session.open(target()).await,
        Err(OpenError::Draining)
    ));
    drop(s);
    t.finish().await;
}

#[tokio::test]
async fn an_open_refused_by_the_peer_fails_and_is_released() {
    let mut t = scripted();
    let session = t.session.clone();
    let opening = tokio::spawn(async move { session.open(target()).await });
    let Frame::Open { stream, .. } = t.recv().await else {
        panic!("expected OPEN");
    };
    t.send(Frame::OpenErr {
        stream,
        code: OpenErrorCode::Unreachable,
        message: "no route".into(),
    })
    .await;
    let err = bounded("open", opening).await.unwrap().unwrap_err();
    assert!(matches!(
        err,
        OpenError::Refused {
            code: OpenErrorCode::Unreachable,
            ..
        }
    ));
    assert_eq!(t.session.stats().streams, 0);
    // A reset before the answer fails the open too.
    let session = t.session.clone();
    let opening = tokio::spawn(async move { session.open(target()).await });
    let Frame::Open { stream, .. } = t.recv().await else {
        panic!("expected OPEN");
    };
    t.send(Frame::Rst {
        stream,
        code: ResetCode::Internal,
        message: String::new(),
    })
    .await;
    let err = bounded("open", opening).await.unwrap().unwrap_err();
    assert!(matches!(err, OpenError::Reset), "{err:?}");
    assert_eq!(t.session.stats().streams, 0);
    t.finish().await;
}

/// Collects the frames of `stream` until `last` matches, checking the DATA bytes in order.
async fn collect_until(t: &mut Scripted, stream: u64, mut last: impl FnMut(&Frame) -> bool) -> u64 {
    let mut bytes = 0u64;
    loop {
        let frame = t.recv().await;
        match &frame {
            Frame::Data { stream: s, payload } if *s == stream => {
                assert!(payload.iter().all(|b| *b == 0xAB));
                bytes += payload.len() as u64;
            }
            f if last(f) => return bytes,
            Frame::OpenOk { .. } | Frame::Window { .. } => {}
            other => panic!("unexpected {other:?} after {bytes} bytes"),
        }
    }
}

#[tokio::test]
async fn fin_and_rst_leave_after_the_queued_data_on_the_wire() {
    const LEN: usize = 768 * 1024;
    let mut t = scripted();
    // A backlog larger than the pipe: the session's writer is still busy with it when the
    // handle shuts down (or is dropped).
    t.send(open_frame(2, 4 * 1024 * 1024)).await;
    let pending = bounded("incoming", t.incoming.accept()).await.unwrap();
    let mut s = pending.accept().unwrap();
    s.write_all(&vec![0xAB; LEN]).await.unwrap();
    s.shutdown().await.unwrap();
    let sent = collect_until(&mut t, 2, |f| *f == Frame::Fin { stream: 2 }).await;
    assert_eq!(sent, LEN as u64, "FIN before all DATA");
    // Unfinished (no FIN from the peer), so dropping resets, after everything queued.
    drop(s);
    assert!(matches!(
        t.recv().await,
        Frame::Rst {
            stream: 2,
            code: ResetCode::Cancelled,
            ..
        }
    ));

    t.send(open_frame(4, 4 * 1024 * 1024)).await;
    let pending = bounded("incoming", t.incoming.accept()).await.unwrap();
    let mut s = pending.accept().unwrap();
    s.write_all(&vec![0xAB; LEN]).await.unwrap();
    drop(s);
    let sent = collect_until(&mut t, 4, |f| matches!(f, Frame::Rst { stream: 4, .. })).await;
    assert_eq!(sent, LEN as u64, "RST before all DATA");
    wait_until("slots released", || t.session.stats().streams == 0).await;
    t.finish().await;
}

#[tokio::test]
async fn a_ping_in_flight_fails_when_the_session_dies() {
    let mut t = scripted();
    let session = t.session.clone();
    let ping = tokio::spawn(async move { session.ping().await });
    assert!(matches!(t.recv_any().await, Frame::Ping { .. }));
    // The peer goes away without answering.
    let peer = std::mem::replace(
        &mut t.peer,
        tether_mux::transport::framed(tokio::io::duplex(64).0, MuxConfig::default().limits()),
    );
    drop(peer);
    let err = bounded("ping", ping).await.unwrap().unwrap_err();
    assert!(matches!(err, OpenError::SessionClosed), "{err:?}");
    assert!(matches!(t.finish().await, SessionEnd::PeerClosed));
}

/// Payloads a slow reader has not read yet are delivered in order, whether they were kept as
/// they came (large ones) or copied together (small ones behind others), and by either read.
#[tokio::test]
async fn buffered_large_and_small_payloads_keep_their_order() {
    let mut t = scripted();
    let mut handle = peer_opens(&mut t, 2, 256 * 1024).await;
    let sizes = [10usize, 40_000, 5, 7, 50_000, 3, 33_000];
    let mut expected = Vec::new();
    for (i, size) in sizes.iter().enumerate() {
        let payload: Vec<u8> = (0..*size).map(|j| (i * 31 + j % 251) as u8).collect();
        t.send(data(2, &payload)).await;
        expected.extend_from_slice(&payload);
    }
    t.barrier(1).await;
    assert_eq!(handle.debug_buffered(), expected.len());
    // The first bytes as a chunk (no copy), the rest through AsyncRead.
    let first = std::future::poll_fn(|cx| handle.poll_read_chunk(cx, 4))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first[..], expected[..4]);
    let mut rest = vec![0u8; expected.len() - 4];
    bounded("read", handle.read_exact(&mut rest)).await.unwrap();
    assert_eq!(rest, expected[4..]);
    assert_eq!(handle.debug_buffered(), 0);
    t.send(Frame::Fin { stream: 2 }).await;
    let end = std::future::poll_fn(|cx| handle.poll_read_chunk(cx, 1024))
        .await
        .unwrap();
    assert!(end.is_none(), "FIN reads as the end of the stream");
    drop(handle);
    t.finish().await;
}

/// A chunk written without copying goes out as DATA frames of at most `max_data`, in order and
/// within the peer's window.
#[tokio::test]
async fn written_chunks_become_data_frames_within_credit() {
    let mut t = scripted();
    let mut handle = session_opens(&mut t, 100_000).await;
    let payload: Bytes = (0..150_000u32).map(|i| (i % 253) as u8).collect();
    let mut left = payload.clone();
    let mut taken = 0;
    // 100,000 bytes of credit: the writes stop there until a WINDOW arrives.
    while taken < 100_000 {
        let n = std::future::poll_fn(|cx| handle.poll_write_chunk(cx, &mut left))
            .await
            .unwrap();
        assert!(n <= MuxConfig::default().max_data as usize);
        taken += n;
    }
    assert_eq!(taken, 100_000);
    let blocked = futures::poll!(std::future::poll_fn(
        |cx| handle.poll_write_chunk(cx, &mut left)
    ));
    assert!(blocked.is_pending(), "no credit left");
    t.send(Frame::Window {
        stream: handle.id(),
        increment: 50_000,
    })
    .await;
    while !left.is_empty() {
        std::future::poll_fn(|cx| handle.poll_write_chunk(cx, &mut left))
            .await
            .unwrap();
    }
    let mut got = Vec::new();
    while got.len() < payload.len() {
        match t.recv().await {
            Frame::Data { stream, payload } => {
                assert_eq!(stream, handle.id());
                got.extend_from_slice(&payload);
            }
            other => panic!("expected DATA, got {other:?}"),
        }
    }
    assert_eq!(got, payload);
    drop(handle);
    t.finish().await;
}

#[tokio::test(start_paused = true)]
async fn a_silent_peer_that_stopped_reading_ends_the_driver_without_a_close_flush() {
    // A short idle timeout, as a fast-failover deployment sets: the close flush's own bound
    // would be a large part of it.
    let idle = Duration::from_secs(2);
    let mut t = Scripted::new(
        Role::Server,
        MuxConfig {
            idle_timeout: idle,
            ping_interval: Duration::from_millis(250),
            ..MuxConfig::default()
        },
    );
    let mut stream = session_opens(&mut t, 4 << 20).await;
    // The peer neither reads nor sends (a blackholed link): the stream's bytes fill the pipe
    // and the writer blocks on it.
    let writing = tokio::spawn(async move {
        let chunk = vec![0x5Au8; 64 * 1024];
        while stream.write_all(&chunk).await.is_ok() {}
    });
    let last_frame = tokio::time::Instant::now();
    let end = tokio::time::timeout(idle * 2, &mut t.driver)
        .await
        .expect("the driver ends within twice the idle timeout")
        .unwrap();
    let silent = last_frame.elapsed();
    assert!(matches!(end, SessionEnd::IdleTimeout), "{end:?}");
    assert!(
        silent <= idle + idle / 10,
        "the driver returned {silent:?} after the peer's last frame"
    );
    bounded("writer", writing).await.unwrap();
    // The transport is closed although the session's handle is still held: the peer reads
    // what was buffered, then the end.
    bounded("the transport's end", async {
        while let Some(Ok(_)) = futures::StreamExt::next(&mut t.peer).await {}
    })
    .await;
}
