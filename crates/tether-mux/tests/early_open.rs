//! Over a link with a real delay (a relay in the test that holds every byte for the one-way
//! delay): with the one-round-trip open negotiated, connect plus the first byte's echo takes
//! one round trip; without it (an older peer on either side), two. And a stream's window grows
//! so that one stream moves far more than one initial window per round trip.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{bounded, target};
use tether_mux::transport::framed;
use tether_mux::{Incoming, MuxConfig, MuxMetrics, Role, Session};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// One way of the test link.
const ONE_WAY: Duration = Duration::from_millis(50);
const RTT: Duration = Duration::from_millis(100);

/// Copies `from` into `to`, each chunk written `ONE_WAY` after it was read.
async fn delay_copy(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin + Send + 'static,
) {
    let (tx, mut rx) = mpsc::channel::<(Instant, Bytes)>(4096);
    let writer = tokio::spawn(async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    });
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let chunk = Bytes::copy_from_slice(&buf[..n]);
                if tx.send((Instant::now() + ONE_WAY, chunk)).await.is_err() {
                    break;
                }
            }
        }
    }
    drop(tx);
    let _ = writer.await;
}

/// A server and an agent session joined through the delay relay; the agent echoes every
/// stream the server opens.
struct Link {
    server: Session,
    _server_in: Incoming,
    agent: Session,
    tasks: JoinSet<()>,
}

fn link(server_cfg: MuxConfig, agent_cfg: MuxConfig) -> Link {
    let (a, a_relay) = tokio::io::duplex(1 << 20);
    let (b, b_relay) = tokio::io::duplex(1 << 20);
    let mut tasks = JoinSet::new();
    let (a_read, a_write) = tokio::io::split(a_relay);
    let (b_read, b_write) = tokio::io::split(b_relay);
    tasks.spawn(delay_copy(a_read, b_write));
    tasks.spawn(delay_copy(b_read, a_write));
    let (server, server_in, sd) = Session::new(
        framed(a, server_cfg.limits()),
        Role::Server,
        server_cfg,
        MuxMetrics::unregistered(),
    );
    let (agent, agent_in, ad) = Session::new(
        framed(b, agent_cfg.limits()),
        Role::Agent,
        agent_cfg,
        MuxMetrics::unregistered(),
    );
    tasks.spawn(async move {
        let _ = sd.run().await;
    });
    tasks.spawn(async move {
        let _ = ad.run().await;
    });
    tasks.spawn(echo_all(agent_in));
    Link {
        server,
        _server_in: server_in,
        agent,
        tasks,
    }
}

/// Accepts every stream (as a target dial that takes no time) and echoes it.
async fn echo_all(mut incoming: Incoming) {
    let mut echoes = JoinSet::new();
    while let Some(pending) = incoming.accept().await {
        let Ok(mut stream) = pending.accept() else {
            continue;
        };
        echoes.spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n) = stream.read(&mut buf).await {
                if n == 0 || stream.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
            let _ = stream.shutdown().await;
        });
    }
}

/// Both sides' configurations after a handshake in which each offered what its config says.
fn negotiated(server: MuxConfig, agent: MuxConfig) -> (MuxConfig, MuxConfig) {
    let (server_offer, agent_offer) = (server.offer(), agent.offer());
    (
        server.negotiate(&agent_offer),
        agent.negotiate(&server_offer),
    )
}

/// The best of three: open, write one byte, read its echo.
async fn connect_and_first_byte(link: &Link) -> Duration {
    let mut best = Duration::MAX;
    for _ in 0..3 {
        let started = Instant::now();
        let (mut stream, answer) = link
            .server
            .open_early(target(), Duration::from_secs(10))
            .await
            .unwrap();
        stream.write_all(b"x").await.unwrap();
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).await.unwrap();
        best = best.min(started.elapsed());
        assert_eq!(answer.outcome().await.unwrap().unwrap(), ());
        drop(stream);
    }
    best
}

#[tokio::test]
async fn connect_and_first_byte_take_one_round_trip_with_the_capability() {
    let (server, agent) = negotiated(MuxConfig::default(), MuxConfig::default());
    assert!(server.peer_early_data.is_some() && agent.peer_early_data.is_some());
    let link = link(server, agent);
    assert!(link.server.early_data());
    let took = bounded("early", connect_and_first_byte(&link)).await;
    eprintln!("connect + first byte with early data: {took:?} (round trip {RTT:?})");
    assert!(took >= RTT, "{took:?}: faster than the link");
    assert!(took < RTT * 3 / 2, "{took:?}: more than one round trip");
    drop(link.tasks);
    drop(link.agent);
}

#[tokio::test]
async fn without_the_capability_on_either_side_it_takes_two() {
    let off = MuxConfig {
        early_data: 0,
        ..MuxConfig::default()
    };
    // An older server (it offers nothing), then an older agent.
    for (server, agent) in [
        (off.clone(), MuxConfig::default()),
        (MuxConfig::default(), off.clone()),
    ] {
        let (server, agent) = negotiated(server, agent);
        assert!(server.peer_early_data.is_none() && agent.peer_early_data.is_none());
        let link = link(server, agent);
        assert!(!link.server.early_data());
        let took = bounded("plain", connect_and_first_byte(&link)).await;
        eprintln!("connect + first byte without early data: {took:?} (round trip {RTT:?})");
        assert!(took >= RTT * 2, "{took:?}: less than two round trips");
        drop(link.tasks);
    }
}

#[tokio::test]
async fn a_refused_early_open_fails_its_stream_with_the_refusal() {
    let (server, agent) = negotiated(MuxConfig::default(), MuxConfig::default());
    let (a, b) = tokio::io::duplex(1 << 20);
    let metrics = MuxMetrics::unregistered();
    let (s, _s_in, sd) = Session::new(framed(a, server.limits()), Role::Server, server, metrics);
    let metrics = MuxMetrics::unregistered();
    let (_g, mut g_in, gd) = Session::new(framed(b, agent.limits()), Role::Agent, agent, metrics);
    let mut tasks = JoinSet::new();
    tasks.spawn(async move {
        let _ = sd.run().await;
    });
    tasks.spawn(async move {
        let _ = gd.run().await;
    });
    tasks.spawn(async move {
        while let Some(pending) = g_in.accept().await {
            pending.reject(tether_proto::OpenErrorCode::Refused, "connection refused");
        }
    });
    let (mut stream, answer) = s
        .open_early(target(), Duration::from_secs(10))
        .await
        .unwrap();
    stream.write_all(b"hello").await.unwrap();
    let err = bounded("refusal", answer.outcome())
        .await
        .unwrap()
        .unwrap_err();
    assert!(err.to_string().contains("refused"), "{err}");
    let mut buf = [0u8; 8];
    let read = bounded("read", stream.read(&mut buf)).await.unwrap_err();
    assert_eq!(read.kind(), std::io::ErrorKind::ConnectionRefused, "{read}");
    assert!(
        read.to_string().contains("open refused (refused)"),
        "{read}"
    );
}

#[tokio::test]
async fn one_stream_moves_many_initial_windows_per_round_trip() {
    let config = MuxConfig {
        window: 64 * 1024,
        max_window: 8 * 1024 * 1024,
        ..MuxConfig::default()
    };
    let link = link(config.clone(), config);
    let (mut stream, _answer) = link
        .server
        .open_early(target(), Duration::from_secs(10))
        .await
        .unwrap();
    // 8 MiB out and echoed back: with a fixed 64 KiB window that is 128 round trips each
    // way (over 12 s); a window that grows needs a handful.
    let total = 8 * 1024 * 1024;
    let started = Instant::now();
    let chunk = vec![7u8; 64 * 1024];
    let (mut read, mut write) = tokio::io::split(stream);
    let writer = async {
        for _ in 0..total / chunk.len() {
            write.write_all(&chunk).await.unwrap();
        }
        write.shutdown().await.unwrap();
    };
    let reader = async {
        let mut got = 0usize;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = read.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            got += n;
        }
        got
    };
    let ((), got) = bounded("transfer", async { tokio::join!(writer, reader) }).await;
    let took = started.elapsed();
    eprintln!("8 MiB echoed over a {RTT:?} link in {took:?}");
    assert_eq!(got, total);
    let fixed = RTT * (total / (64 * 1024)) as u32;
    assert!(
        took < fixed / 4,
        "{took:?}, fixed window would take {fixed:?}"
    );
    let granted = link.agent.stats().granted;
    assert!(granted <= MuxConfig::default().window_budget, "{granted}");
    stream = read.unsplit(write);
    drop(stream);
}
