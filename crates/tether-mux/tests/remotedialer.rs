//! The remotedialer mode of the multiplexer over in-memory WebSocket messages: a tether server
//! and a tether agent in that mode, and each of them against a scripted Go-like peer that sends
//! and checks raw remotedialer messages.
#![allow(clippy::unwrap_used)]

mod common;

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use common::{Pattern, bounded, read_pattern, wait_until, write_pattern};
use futures::channel::mpsc;
use futures::{Sink, SinkExt, Stream, StreamExt};
use tether_mux::remotedialer::{
    RdCounters, RdSettings, RdTransport, WsMessage, close_code, mux_config, settings_for,
};
use tether_mux::{CloseReason, Incoming, MuxConfig, MuxMetrics, Role, Session, TransportError};
use tether_proto::remotedialer::{RdLimits, RdMessage, decode, encode_to_bytes};
use tether_proto::{OpenErrorCode, TargetAddr};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;

/// One end of an in-memory WebSocket: bounded queues of messages both ways.
struct MemWs {
    tx: mpsc::Sender<WsMessage>,
    rx: mpsc::Receiver<WsMessage>,
}

fn mem_pair() -> (MemWs, MemWs) {
    let (a_tx, b_rx) = mpsc::channel(16);
    let (b_tx, a_rx) = mpsc::channel(16);
    (MemWs { tx: a_tx, rx: a_rx }, MemWs { tx: b_tx, rx: b_rx })
}

impl Stream for MemWs {
    type Item = Result<WsMessage, TransportError>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_next_unpin(cx).map(|m| m.map(Ok))
    }
}

impl Sink<WsMessage> for MemWs {
    type Error = TransportError;
    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.tx
            .poll_ready(cx)
            .map_err(|e| TransportError::Other(e.to_string()))
    }
    fn start_send(mut self: Pin<&mut Self>, item: WsMessage) -> Result<(), Self::Error> {
        self.tx
            .start_send(item)
            .map_err(|e| TransportError::Other(e.to_string()))
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }
    fn poll_close(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Result<(), Self::Error>> {
        self.tx.close_channel();
        Poll::Ready(Ok(()))
    }
}

struct Side {
    session: Session,
    incoming: Incoming,
    counters: Arc<RdCounters>,
    metrics: MuxMetrics,
    driver: JoinHandle<tether_mux::SessionEnd>,
}

fn side(ws: MemWs, role: Role, base: &MuxConfig, tweak: impl FnOnce(&mut RdSettings)) -> Side {
    let config = mux_config(role, base);
    let mut settings = settings_for(&config);
    tweak(&mut settings);
    let transport = RdTransport::new(ws, role, settings, RdLimits::default());
    let counters = transport.counters();
    let metrics = MuxMetrics::unregistered();
    let (session, incoming, driver) = Session::new(transport, role, config, metrics.clone());
    Side {
        session,
        incoming,
        counters,
        metrics,
        driver: tokio::spawn(driver.run()),
    }
}

/// A scripted Go-like peer speaking raw remotedialer messages.
struct Raw {
    ws: MemWs,
    id: i64,
}

impl Raw {
    async fn send(&mut self, message: RdMessage) {
        self.id += 1;
        let bytes = encode_to_bytes(self.id, &message);
        self.ws.tx.send(WsMessage::Binary(bytes)).await.unwrap();
    }

    /// The next tunnel message, skipping (and answering) pings.
    async fn recv(&mut self) -> RdMessage {
        loop {
            let message = bounded("a message from the tether side", self.ws.rx.next())
                .await
                .expect("session ended");
            match message {
                WsMessage::Binary(bytes) => {
                    return decode(&bytes, &RdLimits::default()).unwrap().message;
                }
                WsMessage::Ping(payload) => {
                    self.ws.tx.send(WsMessage::Pong(payload)).await.unwrap();
                }
                WsMessage::Pong(_) => {}
                WsMessage::Close { code, reason } => {
                    panic!("session closed ({code} {reason})")
                }
            }
        }
    }

    /// Messages until one matches `pred`, which is returned.
    async fn recv_until(&mut self, mut pred: impl FnMut(&RdMessage) -> bool) -> RdMessage {
        loop {
            let message = self.recv().await;
            if pred(&message) {
                return message;
            }
        }
    }

    /// The tunnel messages that arrive within 200 ms (the caller first waited for its input
    /// to be handled, through a counter).
    async fn drain(&mut self) -> Vec<RdMessage> {
        let mut seen = Vec::new();
        while let Ok(Some(message)) =
            tokio::time::timeout(Duration::from_millis(200), self.ws.rx.next()).await
        {
            if let WsMessage::Binary(bytes) = message {
                seen.push(decode(&bytes, &RdLimits::default()).unwrap().message);
            }
        }
        seen
    }
}

fn target(port: u16) -> TargetAddr {
    format!("127.0.0.1:{port}").parse().unwrap()
}

fn connect(conn: u64, address: &str) -> RdMessage {
    RdMessage::Connect {
        conn,
        proto: "tcp".into(),
        address: address.into(),
    }
}

fn data(conn: u64, bytes: &[u8]) -> RdMessage {
    RdMessage::Data {
        conn,
        payload: Bytes::copy_from_slice(bytes),
    }
}

fn eof(conn: u64) -> RdMessage {
    RdMessage::Error {
        conn,
        message: "EOF".into(),
    }
}

/// Request/response over one connection: the request's length first, then its bytes and a
/// half-close; the agent side answers with as many bytes of another pattern and closes. (An
/// echo that waits for EOF cannot work: remotedialer has no half-close.)
#[tokio::test]
async fn tether_server_and_agent_move_bytes_exactly_both_ways() {
    let (a, b) = mem_pair();
    let base = MuxConfig::default();
    let server = side(a, Role::Server, &base, |_| {});
    let mut agent = side(b, Role::Agent, &base, |_| {});
    let responder = tokio::spawn(async move {
        let mut tasks = Vec::new();
        while tasks.len() < 8 {
            let pending = agent.incoming.accept().await.unwrap();
            assert_eq!(pending.target(), &target(7007));
            let mut stream = pending.accept().unwrap();
            tasks.push(tokio::spawn(async move {
                let seed = stream.read_u64().await.unwrap();
                let len = stream.read_u64().await.unwrap();
                let mut got = vec![0u8; len as usize];
                stream.read_exact(&mut got).await.unwrap();
                let mut want = vec![0u8; len as usize];
                Pattern::new(seed).fill(0, &mut want);
                assert!(got == want, "request bytes differ");
                write_pattern(&mut stream, &Pattern::new(seed + 100), len)
                    .await
                    .unwrap();
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        agent
    });
    let mut flows = Vec::new();
    for seed in 0..8u64 {
        let mut stream = server.session.open(target(7007)).await.unwrap();
        flows.push(tokio::spawn(async move {
            let len = 1_500_000 + seed * 7919;
            stream.write_u64(seed).await.unwrap();
            stream.write_u64(len).await.unwrap();
            let (mut r, mut w) = tokio::io::split(stream);
            let writer =
                tokio::spawn(async move { write_pattern(&mut w, &Pattern::new(seed), len).await });
            let got = read_pattern(&mut r, &Pattern::new(seed + 100))
                .await
                .unwrap();
            writer.await.unwrap().unwrap();
            assert_eq!(got, len);
        }));
    }
    for flow in flows {
        bounded("a flow", flow).await.unwrap();
    }
    let agent = bounded("the responder", responder).await.unwrap();
    // Every connection closed on both sides: nothing is left behind.
    wait_until("streams closed on both sides", || {
        server.session.stats().streams == 0
            && agent.session.stats().streams == 0
            && server.metrics.active.get() == 0
            && agent.metrics.active.get() == 0
    })
    .await;
    assert_eq!(server.metrics.opened.get(), 8);
    assert_eq!(server.metrics.opened.get(), server.metrics.closed_total());
    assert_eq!(agent.metrics.opened.get(), agent.metrics.closed_total());
    server.session.close();
    bounded("server driver", server.driver).await.unwrap();
    bounded("agent driver", agent.driver).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_peer_eof_without_local_close_is_reset_after_the_linger() {
    let (a, b) = mem_pair();
    // Nobody answers pings in this test: keep the session from idling out.
    let quiet = MuxConfig {
        idle_timeout: Duration::from_secs(3600),
        ..MuxConfig::default()
    };
    let server = side(a, Role::Server, &quiet, |s| {
        s.close_linger = Duration::from_secs(30);
    });
    let mut go = Raw { ws: b, id: 0 };
    let mut stream = server.session.open(target(7007)).await.unwrap();
    assert!(matches!(
        go.recv().await,
        RdMessage::Connect { conn: 2, .. }
    ));
    go.send(data(2, b"bye")).await;
    go.send(eof(2)).await;
    let mut buf = [0u8; 3];
    stream.read_exact(&mut buf).await.unwrap();
    assert_eq!(stream.read(&mut buf).await.unwrap(), 0);
    // The local side never closes; the Go peer has forgotten the connection.
    tokio::time::sleep(Duration::from_secs(50)).await;
    let err = stream.write_all(b"x").await.unwrap_err();
    assert!(err.to_string().contains("no half-close"), "{err}");
    drop(stream);
    wait_until("stream gone", || server.session.stats().streams == 0).await;
}

#[tokio::test(start_paused = true)]
async fn a_local_half_close_the_peer_never_answers_ends_after_the_linger() {
    let (a, b) = mem_pair();
    let quiet = MuxConfig {
        idle_timeout: Duration::from_secs(3600),
        ..MuxConfig::default()
    };
    let server = side(a, Role::Server, &quiet, |s| {
        s.close_linger = Duration::from_secs(30);
    });
    let mut go = Raw { ws: b, id: 0 };
    let mut stream = server.session.open(target(7007)).await.unwrap();
    assert!(matches!(
        go.recv().await,
        RdMessage::Connect { conn: 2, .. }
    ));
    stream.write_all(b"request").await.unwrap();
    stream.shutdown().await.unwrap();
    assert_eq!(go.recv().await, data(2, b"request"));
    // Data keeps the connection alive past the linger...
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_secs(20)).await;
        go.send(data(2, b"x")).await;
    }
    let mut buf = [0u8; 3];
    stream.read_exact(&mut buf).await.unwrap();
    assert!(!server.session.is_closed());
    // ...silence does not: the peer gets EOF, the local reader an error.
    tokio::time::sleep(Duration::from_secs(45)).await;
    assert_eq!(go.recv().await, eof(2));
    let err = stream.read(&mut buf).await.unwrap_err();
    assert!(err.to_string().contains("half-close"), "{err}");
    drop(stream);
    wait_until("stream gone", || server.session.stats().streams == 0).await;
}

#[tokio::test]
async fn server_dials_optimistically_and_closes_with_eof() {
    let (a, b) = mem_pair();
    let server = side(a, Role::Server, &MuxConfig::default(), |_| {});
    let mut go = Raw { ws: b, id: 100 };
    // The stream is usable before the peer says anything: no acknowledgement exists.
    let mut stream = server.session.open(target(7007)).await.unwrap();
    assert_eq!(go.recv().await, connect(2, "127.0.0.1:7007"));
    stream.write_all(b"ping").await.unwrap();
    assert_eq!(go.recv().await, data(2, b"ping"));
    go.send(data(2, b"pong-from-rawcli")).await;
    let mut buf = [0u8; 16];
    stream.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"pong-from-rawcli");
    // Our half-close alone sends nothing: remotedialer has no half-close.
    stream.shutdown().await.unwrap();
    go.send(data(2, b"more")).await;
    let mut more = [0u8; 4];
    stream.read_exact(&mut more).await.unwrap();
    assert_eq!(&more, b"more");
    // The peer's EOF ends its direction; both done, we send EOF once.
    go.send(eof(2)).await;
    assert_eq!(stream.read(&mut more).await.unwrap(), 0);
    assert_eq!(go.recv().await, eof(2));
    drop(stream);
    wait_until("stream gone", || server.session.stats().streams == 0).await;

    // A second connection gets the next id; a dial failure arrives as an Error.
    let mut failed = server.session.open(target(1)).await.unwrap();
    assert_eq!(go.recv().await, connect(3, "127.0.0.1:1"));
    go.send(RdMessage::Error {
        conn: 3,
        message: "dial tcp 127.0.0.1:1: connect: connection refused".into(),
    })
    .await;
    let err = failed.read(&mut more).await.unwrap_err();
    assert!(err.to_string().contains("connection refused"), "{err}");
    drop(failed);
    wait_until("failed stream gone", || server.session.stats().streams == 0).await;
    assert_eq!(server.metrics.opened.get(), server.metrics.closed_total());
}

#[tokio::test]
async fn local_close_before_peer_waits_for_peer_eof_and_reset_sends_error() {
    let (a, b) = mem_pair();
    let server = side(a, Role::Server, &MuxConfig::default(), |_| {});
    let mut go = Raw { ws: b, id: 0 };
    let stream = server.session.open(target(7007)).await.unwrap();
    assert!(matches!(
        go.recv().await,
        RdMessage::Connect { conn: 2, .. }
    ));
    // Dropping the handle mid-stream is an abort: the peer gets a non-EOF Error.
    drop(stream);
    match go.recv().await {
        RdMessage::Error { conn: 2, message } => assert_ne!(message, "EOF"),
        other => panic!("unexpected {other:?}"),
    }
    // The Go peer echoes the error; it is a stray by now and ignored.
    go.send(RdMessage::Error {
        conn: 2,
        message: "stream reset (cancelled)".into(),
    })
    .await;
    wait_until("stray counted", || {
        server.counters.strays_ignored.load(Ordering::Relaxed) == 1
    })
    .await;
    assert!(!server.session.is_closed());
}

#[tokio::test]
async fn agent_answers_connects_and_refuses_one_connection_only() {
    let (a, b) = mem_pair();
    let mut agent = side(b, Role::Agent, &MuxConfig::default(), |_| {});
    let mut go = Raw { ws: a, id: 0 };
    // Malformed or unsupported Connects get an Error for that id; the session stays.
    go.send(RdMessage::Connect {
        conn: 2,
        proto: "udp".into(),
        address: "127.0.0.1:53".into(),
    })
    .await;
    assert!(matches!(go.recv().await, RdMessage::Error { conn: 2, .. }));
    go.send(connect(3, "no-port")).await;
    assert!(matches!(go.recv().await, RdMessage::Error { conn: 3, .. }));
    // A refusal by the application (policy) is an Error for that connection only.
    go.send(connect(4, "10.0.0.1:22")).await;
    let pending = bounded("incoming", agent.incoming.accept()).await.unwrap();
    assert_eq!(
        pending.target(),
        &"10.0.0.1:22".parse::<TargetAddr>().unwrap()
    );
    pending.reject(OpenErrorCode::Denied, "denied by policy: 10.0.0.1:22");
    assert_eq!(
        go.recv().await,
        RdMessage::Error {
            conn: 4,
            message: "denied by policy: 10.0.0.1:22".into()
        }
    );
    // Data sent optimistically before the accept is delivered after it.
    go.send(connect(5, "127.0.0.1:7007")).await;
    go.send(data(5, b"early bytes")).await;
    let pending = bounded("incoming", agent.incoming.accept()).await.unwrap();
    let mut stream = pending.accept().unwrap();
    let mut buf = [0u8; 11];
    stream.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"early bytes");
    stream.write_all(b"reply").await.unwrap();
    assert_eq!(go.recv().await, data(5, b"reply"));
    go.send(eof(5)).await;
    assert_eq!(stream.read(&mut buf).await.unwrap(), 0);
    stream.shutdown().await.unwrap();
    assert_eq!(go.recv().await, eof(5));
    assert!(!agent.session.is_closed());
}

#[tokio::test]
async fn stray_messages_for_unknown_ids_are_ignored_quietly() {
    let (a, b) = mem_pair();
    let agent = side(b, Role::Agent, &MuxConfig::default(), |_| {});
    let mut go = Raw { ws: a, id: 0 };
    go.send(eof(77)).await;
    go.send(data(78, b"late")).await;
    go.send(RdMessage::Pause { conn: 79 }).await;
    go.send(RdMessage::Resume { conn: 80 }).await;
    go.send(RdMessage::AddClient { key: "a/1".into() }).await;
    go.send(RdMessage::Unknown {
        msg_type: 42,
        conn: 1,
    })
    .await;
    wait_until("strays counted", || {
        agent.counters.strays_ignored.load(Ordering::Relaxed) == 4
    })
    .await;
    // Nothing was sent back: no Error, nothing that could end a Go session.
    assert!(go.drain().await.is_empty());
    assert!(!agent.session.is_closed());
}

#[tokio::test]
async fn slow_reader_pauses_the_peer_and_resumes_when_drained() {
    let (a, b) = mem_pair();
    let mut agent = side(b, Role::Agent, &MuxConfig::default(), |_| {});
    let mut go = Raw { ws: a, id: 0 };
    go.send(connect(2, "127.0.0.1:7007")).await;
    let mut stream = bounded("incoming", agent.incoming.accept())
        .await
        .unwrap()
        .accept()
        .unwrap();
    // 3 MiB arrive while nobody reads: above 2 MiB unread, one Pause goes out.
    let chunk = vec![7u8; 32 * 1024];
    for _ in 0..96 {
        go.send(data(2, &chunk)).await;
    }
    assert_eq!(
        go.recv_until(|m| !matches!(m, RdMessage::SyncConnections { .. }))
            .await,
        RdMessage::Pause { conn: 2 }
    );
    assert_eq!(agent.counters.pauses_sent.load(Ordering::Relaxed), 1);
    // A Go peer keeps sending what is in flight: tolerated, no second Pause.
    for _ in 0..16 {
        go.send(data(2, &chunk)).await;
    }
    // Reading drains the buffer; below 256 KiB unread, one Resume goes out.
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0usize;
    while total < 112 * 32 * 1024 {
        total += stream.read(&mut buf).await.unwrap();
    }
    assert_eq!(
        go.recv_until(|m| !matches!(m, RdMessage::SyncConnections { .. }))
            .await,
        RdMessage::Resume { conn: 2 }
    );
    assert_eq!(agent.counters.pauses_sent.load(Ordering::Relaxed), 1);
    assert_eq!(agent.counters.resumes_sent.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn peer_pause_stops_the_writer_and_resume_wakes_it() {
    let (a, b) = mem_pair();
    let server = side(a, Role::Server, &MuxConfig::default(), |_| {});
    let mut go = Raw { ws: b, id: 0 };
    let stream = server.session.open(target(7007)).await.unwrap();
    assert!(matches!(
        go.recv().await,
        RdMessage::Connect { conn: 2, .. }
    ));
    go.send(RdMessage::Pause { conn: 2 }).await;
    wait_until("pause applied", || {
        server.counters.pauses_received.load(Ordering::Relaxed) == 1
    })
    .await;
    let total = 4 * 1024 * 1024u64;
    let writer = tokio::spawn(async move {
        let mut stream = stream;
        write_pattern(&mut stream, &Pattern::new(9), total)
            .await
            .unwrap();
        stream
    });
    // While paused, at most the send credit (256 KiB) gets out.
    let mut received = 0u64;
    while let Ok(message) = tokio::time::timeout(Duration::from_millis(300), go.recv()).await {
        if let RdMessage::Data { payload, .. } = message {
            received += payload.len() as u64;
        }
    }
    let credit = u64::from(RdSettings::default().send_credit);
    assert!(received <= credit, "{received} bytes sent while paused");
    assert!(!writer.is_finished());
    // Resume wakes the parked writer at once (the Go implementation forgets to).
    go.send(RdMessage::Resume { conn: 2 }).await;
    while received < total {
        if let RdMessage::Data { payload, .. } = go.recv().await {
            received += payload.len() as u64;
        }
    }
    assert_eq!(received, total);
    bounded("writer", writer).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn client_pings_every_5s_and_syncs_every_60s() {
    let (a, b) = mem_pair();
    let mut agent = side(b, Role::Agent, &MuxConfig::default(), |_| {});
    let mut go = a;
    let mut go_raw_id = 0i64;
    // Open one connection so the sync lists it.
    go_raw_id += 1;
    go.tx
        .send(WsMessage::Binary(encode_to_bytes(
            go_raw_id,
            &connect(2, "127.0.0.1:7007"),
        )))
        .await
        .unwrap();
    let _stream = agent.incoming.accept().await.unwrap().accept().unwrap();
    let start = tokio::time::Instant::now();
    let mut pings = 0;
    let sync = loop {
        match go.rx.next().await.unwrap() {
            WsMessage::Ping(payload) => {
                pings += 1;
                go.tx.send(WsMessage::Pong(payload)).await.unwrap();
            }
            WsMessage::Binary(bytes) => {
                break decode(&bytes, &RdLimits::default()).unwrap().message;
            }
            WsMessage::Pong(_) => {}
            WsMessage::Close { code, reason } => panic!("session closed ({code} {reason})"),
        }
    };
    let elapsed = start.elapsed();
    assert_eq!(sync, RdMessage::SyncConnections { conns: vec![2] });
    assert!(
        elapsed >= Duration::from_secs(59) && elapsed <= Duration::from_secs(61),
        "{elapsed:?}"
    );
    assert!((11..=12).contains(&pings), "{pings} pings in 60 s");
    assert!(!agent.session.is_closed());
}

#[tokio::test(start_paused = true)]
async fn server_reaps_only_connections_older_than_the_grace() {
    let (a, b) = mem_pair();
    let server = side(a, Role::Server, &MuxConfig::default(), |s| {
        s.sync_grace = Duration::from_secs(10);
    });
    let mut go = Raw { ws: b, id: 0 };
    let mut old = server.session.open(target(1)).await.unwrap();
    let kept = server.session.open(target(2)).await.unwrap();
    assert!(matches!(
        go.recv().await,
        RdMessage::Connect { conn: 2, .. }
    ));
    assert!(matches!(
        go.recv().await,
        RdMessage::Connect { conn: 3, .. }
    ));
    tokio::time::sleep(Duration::from_secs(30)).await;
    // A Connect still in flight when the client took its snapshot: not reaped.
    let young = server.session.open(target(3)).await.unwrap();
    assert!(matches!(
        go.recv().await,
        RdMessage::Connect { conn: 4, .. }
    ));
    go.send(RdMessage::SyncConnections { conns: vec![3] }).await;
    let mut buf = [0u8; 1];
    let err = bounded("reaped read", old.read(&mut buf))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("sync from client"), "{err}");
    assert_eq!(server.counters.reaped.load(Ordering::Relaxed), 1);
    drop(old);
    wait_until("reaped stream gone", || server.session.stats().streams == 2).await;
    drop((kept, young));
}

#[tokio::test]
async fn malformed_session_messages_never_end_the_session() {
    let (a, b) = mem_pair();
    let agent = side(b, Role::Agent, &MuxConfig::default(), |_| {});
    let mut go = a;
    // Undecodable, a bad SyncConnections length and an empty message.
    for raw in [vec![0xffu8; 11], vec![2, 0, 16, 1, 2, 3], vec![]] {
        go.send(WsMessage::Binary(Bytes::from(raw))).await.unwrap();
    }
    wait_until("malformed counted", || {
        agent.counters.malformed.load(Ordering::Relaxed) == 3
    })
    .await;
    assert!(!agent.session.is_closed());
}

/// Go answers every ping with an empty pong: each ping still completes with an RTT, and one
/// empty pong answers every ping that is outstanding (any pong proves the peer alive).
#[tokio::test]
async fn empty_pongs_like_go_answer_pings() {
    let (a, b) = mem_pair();
    let server = side(a, Role::Server, &MuxConfig::default(), |_| {});
    let mut go = b;
    // One at a time: each ping gets its empty pong.
    for _ in 0..3 {
        let ping = server.session.ping();
        let answer = async {
            loop {
                if let WsMessage::Ping(payload) = go.rx.next().await.unwrap() {
                    assert_eq!(payload.len(), 8, "the nonce travels in the ping");
                    go.tx.send(WsMessage::Pong(Bytes::new())).await.unwrap();
                    return;
                }
            }
        };
        let (rtt, ()) = bounded("ping answered by an empty pong", async {
            tokio::join!(ping, answer)
        })
        .await;
        assert!(rtt.unwrap() < Duration::from_secs(5));
    }
    assert!(server.session.stats().rtt.is_some());
    // Two pings out, one empty pong: both complete.
    let pings = async { tokio::join!(server.session.ping(), server.session.ping()) };
    let answer = async {
        let mut seen = 0;
        while seen < 2 {
            if let WsMessage::Ping(_) = go.rx.next().await.unwrap() {
                seen += 1;
            }
        }
        go.tx.send(WsMessage::Pong(Bytes::new())).await.unwrap();
    };
    let ((first, second), ()) =
        bounded("two pings, one pong", async { tokio::join!(pings, answer) }).await;
    first.unwrap();
    second.unwrap();
    assert!(!server.session.is_closed());
}

/// A pong echoing a nonce (tether peers, tungstenite's automatic pong) answers that ping only.
#[tokio::test]
async fn echoed_pong_answers_its_own_ping() {
    let (a, b) = mem_pair();
    let server = side(a, Role::Server, &MuxConfig::default(), |_| {});
    let mut go = b;
    let session = server.session.clone();
    let first = tokio::spawn(async move { session.ping().await });
    let first_nonce = loop {
        if let WsMessage::Ping(payload) = go.rx.next().await.unwrap() {
            break payload;
        }
    };
    let session = server.session.clone();
    let second = tokio::spawn(async move { session.ping().await });
    let second_nonce = loop {
        if let WsMessage::Ping(payload) = go.rx.next().await.unwrap() {
            break payload;
        }
    };
    assert_ne!(first_nonce, second_nonce);
    go.tx.send(WsMessage::Pong(second_nonce)).await.unwrap();
    bounded("second ping answered", second)
        .await
        .unwrap()
        .unwrap();
    assert!(!first.is_finished(), "the first ping has no answer yet");
    go.tx.send(WsMessage::Pong(first_nonce)).await.unwrap();
    bounded("first ping answered", first)
        .await
        .unwrap()
        .unwrap();
}

/// A Go agent reports a failed dial as an Error with Go's words: the stream that was opened
/// optimistically fails as refused (with the dial error code), counted `refused`; an Error
/// after the target answered is a reset with the matching code.
#[tokio::test]
async fn go_dial_failures_are_refusals_and_later_errors_resets() {
    let (a, b) = mem_pair();
    let server = side(a, Role::Server, &MuxConfig::default(), |_| {});
    let mut go = Raw { ws: b, id: 0 };
    let cases = [
        (
            "dial tcp 127.0.0.1:1: connect: connection refused",
            "refused",
        ),
        ("dial tcp 10.255.255.1:80: i/o timeout", "timed_out"),
        (
            "dial tcp 192.0.2.1:80: connect: no route to host",
            "unreachable",
        ),
        ("connect not allowed", "denied"),
    ];
    for (n, (text, code)) in cases.into_iter().enumerate() {
        let mut stream = server.session.open(target(1)).await.unwrap();
        let RdMessage::Connect { conn, .. } = go.recv().await else {
            panic!("expected Connect");
        };
        go.send(RdMessage::error(conn, text)).await;
        let mut buf = [0u8; 8];
        let err = bounded("refused read", stream.read(&mut buf))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
        assert!(err.to_string().contains(&format!("({code})")), "{err}");
        assert!(err.to_string().contains(text), "{err}");
        drop(stream);
        wait_until("refusal counted", || {
            server.metrics.closed_count(CloseReason::Refused) == n as u64 + 1
        })
        .await;
    }
    // The target answered, then the connection broke: a reset.
    let mut stream = server.session.open(target(1)).await.unwrap();
    let RdMessage::Connect { conn, .. } = go.recv().await else {
        panic!("expected Connect");
    };
    go.send(RdMessage::Data {
        conn,
        payload: Bytes::from_static(b"hi"),
    })
    .await;
    let mut buf = [0u8; 2];
    bounded("data", stream.read_exact(&mut buf)).await.unwrap();
    go.send(RdMessage::error(
        conn,
        "read tcp 127.0.0.1:4000->127.0.0.1:5000: read: connection reset by peer",
    ))
    .await;
    let err = bounded("reset read", stream.read(&mut buf))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
    assert!(err.to_string().contains("target_reset"), "{err}");
    drop(stream);
    wait_until("reset counted", || {
        server.metrics.closed_count(CloseReason::Reset) == 1
    })
    .await;
    assert_eq!(server.metrics.closed_count(CloseReason::Refused), 4);
    assert!(!server.session.is_closed());
}

/// A tether agent's refusals reach a Go server in Go's words, whatever its own message says.
#[tokio::test]
async fn agent_refusals_are_sent_in_go_words() {
    let (a, b) = mem_pair();
    let mut agent = side(b, Role::Agent, &MuxConfig::default(), |_| {});
    let mut go = Raw { ws: a, id: 0 };
    for (n, (code, words)) in [
        (OpenErrorCode::Refused, "connection refused"),
        (OpenErrorCode::Denied, "connect not allowed"),
        (OpenErrorCode::TimedOut, "i/o timeout"),
    ]
    .into_iter()
    .enumerate()
    {
        let conn = 2 + n as u64;
        go.send(connect(conn, "127.0.0.1:7007")).await;
        let pending = bounded("open", agent.incoming.accept()).await.unwrap();
        pending.reject(code, "the agent said no");
        let message = go
            .recv_until(|m| matches!(m, RdMessage::Error { .. }))
            .await;
        let RdMessage::Error { conn: got, message } = message else {
            unreachable!();
        };
        assert_eq!(got, conn);
        assert!(message.contains("the agent said no"), "{message}");
        assert!(message.contains(words), "{message}");
    }
}

/// The WebSocket close says why: going away after a GOAWAY (shutdown, replaced), normal
/// closure otherwise.
#[tokio::test]
async fn close_frames_carry_going_away_or_normal() {
    for goaway in [true, false] {
        let (a, b) = mem_pair();
        let server = side(a, Role::Server, &MuxConfig::default(), |_| {});
        let mut go = b;
        if goaway {
            server
                .session
                .goaway(tether_proto::GoAwayCode::Shutdown, "server shutting down");
        }
        // The GOAWAY has gone through the transport once a later ping has.
        let ping = server.session.ping();
        let answer = async {
            loop {
                if let WsMessage::Ping(payload) = go.rx.next().await.unwrap() {
                    go.tx.send(WsMessage::Pong(payload)).await.unwrap();
                    return;
                }
            }
        };
        let (rtt, ()) = bounded("ping", async { tokio::join!(ping, answer) }).await;
        rtt.unwrap();
        server.session.close();
        let close = bounded("close frame", async {
            loop {
                match go.rx.next().await {
                    Some(WsMessage::Close { code, reason }) => return Some((code, reason)),
                    Some(_) => {}
                    None => return None,
                }
            }
        })
        .await;
        let expected = if goaway {
            (close_code::GOING_AWAY, "server shutting down".to_owned())
        } else {
            (close_code::NORMAL, String::new())
        };
        assert_eq!(close, Some(expected));
        bounded("driver", server.driver).await.unwrap();
    }
}
