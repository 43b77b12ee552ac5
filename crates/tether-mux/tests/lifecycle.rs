//! Session and stream lifecycle between two real sessions: session death, stream caps, open
//! refusal and timeout, GOAWAY, PING.
#![allow(clippy::unwrap_used)]

mod common;

use std::io;
use std::time::Duration;

use common::{Pair, bounded, read_until_error, target, wait_until};
use tether_mux::{CloseReason, MuxConfig, OpenError, SessionEnd};
use tether_proto::{GoAwayCode, OpenErrorCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// After the session died, every stream errors on read and write, and no open succeeds.
async fn assert_dead(streams: &mut [tether_mux::MuxStream]) {
    for stream in streams.iter_mut() {
        let (err, _) = read_until_error(stream).await;
        assert_ne!(err.kind(), io::ErrorKind::WouldBlock);
        let err = stream.write_all(b"x").await.unwrap_err();
        assert!(
            matches!(
                err.kind(),
                io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
            ),
            "{err:?}"
        );
    }
}

#[tokio::test]
async fn dropping_the_session_fails_every_stream_on_both_sides() {
    let mut pair = Pair::new();
    let mut server_streams = Vec::new();
    let mut agent_streams = Vec::new();
    for i in 0..3 {
        let (mut s, a) = pair.open().await;
        // Some streams have unread bytes buffered at the far side, some half-closed.
        if i > 0 {
            s.write_all(&[i as u8; 5000]).await.unwrap();
        }
        if i == 2 {
            s.shutdown().await.unwrap();
        }
        server_streams.push(s);
        agent_streams.push(a);
    }
    // A reader blocked at the moment of death is woken with an error.
    let mut blocked = agent_streams.remove(0);
    let blocked_reader = tokio::spawn(async move {
        let (err, n) = read_until_error(&mut blocked).await;
        (err, n, blocked)
    });
    // Drop the server's only Session handle (the pair keeps a spare agent handle in its place);
    // its stream handles are still alive, but the session ends.
    let server = std::mem::replace(&mut pair.server, pair.agent.clone());
    drop(server);
    bounded("agent sees the end", pair.agent.closed()).await;
    assert_eq!(pair.agent.end_reason().unwrap().label(), "peer_closed");
    let (err, n, blocked) = bounded("blocked reader", blocked_reader).await.unwrap();
    assert_eq!(n, 0);
    assert_eq!(err.kind(), io::ErrorKind::ConnectionAborted);
    // The half-closed stream's bytes and FIN were written before the session died (an idle
    // writer sends at once), so its reading direction is complete; writing to it fails.
    let mut half_closed = agent_streams.pop().unwrap();
    let mut got = Vec::new();
    bounded("half-closed read", half_closed.read_to_end(&mut got))
        .await
        .unwrap();
    assert_eq!(got, [2u8; 5000]);
    let err = half_closed.write_all(b"x").await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::ConnectionAborted, "{err:?}");
    assert_dead(&mut agent_streams).await;
    assert_dead(&mut server_streams).await;
    assert!(matches!(
        pair.agent.open(target()).await,
        Err(OpenError::SessionClosed)
    ));
    drop((server_streams, agent_streams, blocked, half_closed));
    let (server_end, agent_end) = pair.finish().await;
    assert!(matches!(server_end, SessionEnd::Local), "{server_end:?}");
    assert!(matches!(agent_end, SessionEnd::PeerClosed), "{agent_end:?}");
}

#[tokio::test]
async fn close_fails_streams_and_pending_opens() {
    let mut pair = Pair::new();
    let (s, a) = pair.open().await;
    // An open in flight when the session closes fails with SessionClosed, not a reset.
    let server = pair.server.clone();
    let opening = tokio::spawn(async move { server.open(target()).await });
    let pending = bounded("second open arrives", pair.agent_in.accept())
        .await
        .unwrap();
    pair.server.close();
    let err = bounded("open fails", opening).await.unwrap().unwrap_err();
    assert!(matches!(err, OpenError::SessionClosed), "{err:?}");
    assert!(pair.server.is_closed());
    assert!(matches!(pair.server.end_reason(), Some(SessionEnd::Local)));
    bounded("agent sees the end", pair.agent.closed()).await;
    // The agent's pending open can no longer be accepted.
    assert!(matches!(pending.accept(), Err(OpenError::SessionClosed)));
    assert!(
        bounded("incoming ends", pair.agent_in.accept())
            .await
            .is_none()
    );
    let mut streams = [s, a];
    assert_dead(&mut streams).await;
    assert!(matches!(
        pair.server.open(target()).await,
        Err(OpenError::SessionClosed)
    ));
    drop(streams);
    assert_eq!(
        pair.server_metrics.closed_count(CloseReason::SessionLost),
        2
    );
    pair.finish().await;
}

#[tokio::test]
async fn bytes_before_a_fin_stay_readable_after_the_session_dies() {
    let mut pair = Pair::new();
    let (mut s, mut a) = pair.open().await;
    s.write_all(b"complete message").await.unwrap();
    s.shutdown().await.unwrap();
    // Wait until the FIN arrived (the agent's buffered bytes are all there), then kill.
    let mut buf = [0u8; 8];
    a.read_exact(&mut buf).await.unwrap();
    let pong = bounded("ping", pair.server.ping()).await;
    assert!(pong.is_ok());
    pair.server.close();
    bounded("agent sees the end", pair.agent.closed()).await;
    let mut rest = Vec::new();
    a.read_to_end(&mut rest).await.unwrap();
    assert_eq!(&rest, b" message");
    assert!(a.write_all(b"late").await.is_err());
    drop((s, a));
    pair.finish().await;
}

#[tokio::test]
async fn the_fifth_open_over_the_stream_cap_is_refused_with_limit() {
    let agent = MuxConfig {
        max_streams: 4,
        ..MuxConfig::default()
    };
    let mut pair = Pair::with_configs(MuxConfig::default(), agent);
    let mut streams = Vec::new();
    for _ in 0..4 {
        streams.push(pair.open().await);
    }
    let err = bounded("fifth open", pair.server.open(target()))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            OpenError::Refused {
                code: OpenErrorCode::Limit,
                ..
            }
        ),
        "{err:?}"
    );
    // The cap is on streams alive: once one is gone, a new open fits.
    drop(streams.pop());
    wait_until("agent released a slot", || pair.agent.stats().streams == 3).await;
    streams.push(pair.open().await);
    // The local cap applies to this side's own opens too.
    let err = pair.agent.open(target()).await.unwrap_err();
    assert!(matches!(err, OpenError::Limit), "{err:?}");
    drop(streams);
    pair.finish().await;
}

#[tokio::test]
async fn a_rejected_open_reports_the_acceptors_code() {
    let mut pair = Pair::new();
    let (opened, ()) = tokio::join!(pair.server.open(target()), async {
        let pending = pair.agent_in.accept().await.unwrap();
        assert_eq!(pending.target(), &target());
        assert_eq!(pending.timeout(), MuxConfig::default().dial_timeout);
        pending.reject(OpenErrorCode::Denied, "policy says no");
    });
    match opened.unwrap_err() {
        OpenError::Refused { code, message } => {
            assert_eq!(code, OpenErrorCode::Denied);
            assert_eq!(message, "policy says no");
        }
        other => panic!("{other:?}"),
    }
    // A pending open dropped unanswered is refused too.
    let (opened, ()) = tokio::join!(pair.server.open(target()), async {
        drop(pair.agent_in.accept().await.unwrap());
    });
    assert!(matches!(
        opened.unwrap_err(),
        OpenError::Refused {
            code: OpenErrorCode::Internal,
            ..
        }
    ));
    wait_until("slots released", || {
        pair.server.stats().streams == 0 && pair.agent.stats().streams == 0
    })
    .await;
    assert_eq!(pair.server_metrics.closed_count(CloseReason::Refused), 2);
    assert_eq!(pair.agent_metrics.closed_count(CloseReason::Refused), 2);
    pair.finish().await;
}

#[tokio::test(start_paused = true)]
async fn an_unanswered_open_times_out_and_is_cleaned_up_on_both_sides() {
    let mut pair = Pair::new();
    let dial = Duration::from_secs(3);
    let started = tokio::time::Instant::now();
    let (opened, pending) = tokio::join!(pair.server.open_with_timeout(target(), dial), async {
        pair.agent_in.accept().await.unwrap()
    });
    let waited = started.elapsed();
    let err = opened.unwrap_err();
    let expected = dial + MuxConfig::default().open_grace;
    assert!(
        matches!(err, OpenError::Timeout(d) if d == expected),
        "{err:?}"
    );
    assert!(waited >= expected, "{waited:?}");
    assert_eq!(pending.timeout(), dial);
    assert_eq!(pair.server.stats().streams, 0);
    // The opener's RST reached the acceptor before this PING's answer.
    bounded("ping", pair.server.ping()).await.unwrap();
    assert!(matches!(pending.accept(), Err(OpenError::Reset)));
    assert_eq!(pair.agent.stats().streams, 0);
    assert_eq!(pair.server_metrics.closed_count(CloseReason::Refused), 1);
    pair.finish().await;
}

#[tokio::test]
async fn a_cancelled_open_resets_the_stream() {
    let mut pair = Pair::new();
    let server = pair.server.clone();
    let opening = tokio::spawn(async move { server.open(target()).await });
    let pending = bounded("open arrives", pair.agent_in.accept())
        .await
        .unwrap();
    opening.abort();
    assert!(opening.await.unwrap_err().is_cancelled());
    assert_eq!(pair.server.stats().streams, 0);
    bounded("ping", pair.server.ping()).await.unwrap();
    assert!(matches!(pending.accept(), Err(OpenError::Reset)));
    pair.finish().await;
}

#[tokio::test]
async fn goaway_from_the_peer_stops_new_opens_but_not_existing_streams() {
    let mut pair = Pair::new();
    let (mut s, mut a) = pair.open().await;
    pair.agent.goaway(GoAwayCode::Shutdown, "restarting");
    // The agent itself opens nothing more either.
    assert!(matches!(
        pair.agent.open(target()).await,
        Err(OpenError::Draining)
    ));
    wait_until("GOAWAY arrives", || pair.server.peer_goaway().is_some()).await;
    let (code, message) = pair.server.peer_goaway().unwrap();
    assert_eq!(code, GoAwayCode::Shutdown);
    assert_eq!(message, "restarting");
    assert!(matches!(
        pair.server.open(target()).await,
        Err(OpenError::Draining)
    ));
    // The existing stream still works both ways and finishes cleanly.
    s.write_all(b"ping").await.unwrap();
    s.shutdown().await.unwrap();
    let mut got = Vec::new();
    a.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"ping");
    a.write_all(b"pong").await.unwrap();
    a.shutdown().await.unwrap();
    got.clear();
    s.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"pong");
    drop((s, a));
    assert!(!pair.server.is_closed());
    pair.finish().await;
}

#[tokio::test]
async fn ping_measures_the_round_trip() {
    let pair = Pair::new();
    assert_eq!(pair.server.stats().rtt, None);
    let rtt = bounded("ping", pair.server.ping()).await.unwrap();
    assert!(rtt < Duration::from_secs(5));
    assert_eq!(pair.server.stats().rtt, Some(rtt));
    let rtt = bounded("ping", pair.agent.ping()).await.unwrap();
    assert_eq!(pair.agent.stats().rtt, Some(rtt));
    assert!(pair.server.age() >= Duration::ZERO);
    pair.finish().await;
}

#[tokio::test(start_paused = true)]
async fn keepalive_keeps_an_idle_pair_alive() {
    let pair = Pair::new();
    // Many idle timeouts pass in paused time; pings keep both sides alive.
    tokio::time::sleep(MuxConfig::default().idle_timeout * 5).await;
    assert!(!pair.server.is_closed());
    assert!(!pair.agent.is_closed());
    assert!(pair.server.stats().rtt.is_some());
    let (server_end, agent_end) = pair.finish().await;
    assert!(matches!(
        server_end,
        SessionEnd::Local | SessionEnd::PeerClosed
    ));
    assert!(matches!(
        agent_end,
        SessionEnd::Local | SessionEnd::PeerClosed
    ));
}
