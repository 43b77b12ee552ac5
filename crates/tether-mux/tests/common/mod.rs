//! Test helpers shared by the multiplexer's integration tests: a session pair or a scripted raw
//! peer over an in-memory pipe, data patterns, and the end-of-test leak checks.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::io;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tether_mux::transport::{FramedTransport, framed};
use tether_mux::{Incoming, MuxConfig, MuxMetrics, MuxStream, Role, Session, SessionEnd};
use tether_proto::{Frame, TargetAddr};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::task::JoinHandle;

/// Bytes the in-memory pipe buffers in each direction.
pub const PIPE: usize = 256 * 1024;
/// Upper bound for any single wait in a test.
pub const WAIT: Duration = Duration::from_secs(30);

pub fn target() -> TargetAddr {
    "127.0.0.1:9".parse().unwrap()
}

fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

/// Polls `cond` until it holds, yielding to the runtime in between; panics after [`WAIT`]
/// (tokio time: with paused time the yields' short sleeps advance the clock).
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut spins = 0u32;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        spins += 1;
        if spins % 64 == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        } else {
            tokio::task::yield_now().await;
        }
    }
}

/// Bounds a future with [`WAIT`].
pub async fn bounded<F: std::future::Future>(what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(WAIT, fut).await {
        Ok(out) => out,
        Err(_) => panic!("timed out: {what}"),
    }
}

/// Asserts that every stream counted as opened was counted as closed, and none is active.
async fn assert_metrics_converge(name: &str, metrics: &MuxMetrics) {
    wait_until(&format!("{name} metrics to converge"), || {
        metrics.active.get() == 0 && metrics.opened.get() == metrics.closed_total()
    })
    .await;
}

async fn assert_tasks_back_to(start: usize) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let now = alive_tasks();
        if now <= start {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{now} tasks alive, {start} at the start of the test"
        );
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Two sessions (server and agent) joined by an in-memory pipe, with their drivers spawned.
pub struct Pair {
    pub server: Session,
    pub server_in: Incoming,
    pub agent: Session,
    pub agent_in: Incoming,
    pub server_metrics: MuxMetrics,
    pub agent_metrics: MuxMetrics,
    pub server_driver: JoinHandle<SessionEnd>,
    pub agent_driver: JoinHandle<SessionEnd>,
    tasks_at_start: usize,
}

impl Pair {
    pub fn new() -> Self {
        Self::with_configs(MuxConfig::default(), MuxConfig::default())
    }

    pub fn with_config(config: MuxConfig) -> Self {
        Self::with_configs(config.clone(), config)
    }

    pub fn with_configs(server: MuxConfig, agent: MuxConfig) -> Self {
        Self::with_pipe(server, agent, PIPE)
    }

    pub fn with_pipe(server_cfg: MuxConfig, agent_cfg: MuxConfig, pipe: usize) -> Self {
        let tasks_at_start = alive_tasks();
        let (a, b) = tokio::io::duplex(pipe);
        let server_metrics = MuxMetrics::unregistered();
        let agent_metrics = MuxMetrics::unregistered();
        let (server, server_in, sd) = Session::new(
            framed(a, server_cfg.limits()),
            Role::Server,
            server_cfg,
            server_metrics.clone(),
        );
        let (agent, agent_in, ad) = Session::new(
            framed(b, agent_cfg.limits()),
            Role::Agent,
            agent_cfg,
            agent_metrics.clone(),
        );
        Self {
            server,
            server_in,
            agent,
            agent_in,
            server_metrics,
            agent_metrics,
            server_driver: tokio::spawn(sd.run()),
            agent_driver: tokio::spawn(ad.run()),
            tasks_at_start,
        }
    }

    /// The server opens a stream and the agent accepts it: `(server end, agent end)`.
    pub async fn open(&mut self) -> (MuxStream, MuxStream) {
        let (opened, accepted) = bounded("open and accept", async {
            tokio::join!(self.server.open(target()), async {
                let pending = self.agent_in.accept().await.expect("agent session alive");
                pending.accept()
            })
        })
        .await;
        (opened.expect("open"), accepted.expect("accept"))
    }

    /// Ends both sessions (every stream handle must be dropped by now, or be dropped later by
    /// the caller) and runs the leak checks. Returns how each driver ended.
    pub async fn finish(self) -> (SessionEnd, SessionEnd) {
        let Pair {
            server,
            server_in,
            agent,
            agent_in,
            server_metrics,
            agent_metrics,
            server_driver,
            agent_driver,
            tasks_at_start,
        } = self;
        drop((server, server_in, agent, agent_in));
        let server_end = bounded("server driver", server_driver).await.unwrap();
        let agent_end = bounded("agent driver", agent_driver).await.unwrap();
        assert_metrics_converge("server", &server_metrics).await;
        assert_metrics_converge("agent", &agent_metrics).await;
        assert_tasks_back_to(tasks_at_start).await;
        (server_end, agent_end)
    }
}

/// A real session on one end of the pipe and a hand-driven frame transport on the other.
pub struct Scripted {
    pub session: Session,
    pub incoming: Incoming,
    pub metrics: MuxMetrics,
    pub peer: FramedTransport<DuplexStream>,
    pub driver: JoinHandle<SessionEnd>,
    tasks_at_start: usize,
}

impl Scripted {
    /// The session plays `role`; the scripted peer plays the other one.
    pub fn new(role: Role, config: MuxConfig) -> Self {
        let tasks_at_start = alive_tasks();
        let (a, b) = tokio::io::duplex(PIPE);
        let metrics = MuxMetrics::unregistered();
        let peer = framed(b, config.limits());
        let (session, incoming, driver) =
            Session::new(framed(a, config.limits()), role, config, metrics.clone());
        Self {
            session,
            incoming,
            metrics,
            peer,
            driver: tokio::spawn(driver.run()),
            tasks_at_start,
        }
    }

    pub async fn send(&mut self, frame: Frame) {
        bounded("send frame", self.peer.send(frame)).await.unwrap();
    }

    /// Sends `message` (one encoded frame, possibly malformed) with a valid length prefix.
    pub async fn send_raw(&mut self, message: &[u8]) {
        let mut buf = bytes::BytesMut::new();
        tether_proto::varint::put_varint(&mut buf, message.len() as u64);
        buf.extend_from_slice(message);
        bounded("flush", self.peer.flush()).await.unwrap();
        bounded("raw write", self.peer.get_mut().write_all(&buf))
            .await
            .unwrap();
    }

    /// The next frame from the session, keepalive (PING, SYNC) skipped.
    pub async fn recv(&mut self) -> Frame {
        loop {
            match self.recv_any().await {
                Frame::Ping { .. } | Frame::Sync { .. } => continue,
                frame => return frame,
            }
        }
    }

    /// The next frame from the session, whatever it is.
    pub async fn recv_any(&mut self) -> Frame {
        bounded("frame from session", self.peer.next())
            .await
            .expect("session closed the transport")
            .expect("frame decodes")
    }

    /// Round-trips a PING through the session: every frame sent before it has been applied
    /// once this returns. Frames the session sends meanwhile are returned.
    pub async fn barrier(&mut self, nonce: u64) -> Vec<Frame> {
        self.send(Frame::Ping { nonce }).await;
        let mut seen = Vec::new();
        loop {
            match self.recv_any().await {
                Frame::Pong { nonce: n } if n == nonce => return seen,
                Frame::Ping { .. } | Frame::Sync { .. } => {}
                frame => seen.push(frame),
            }
        }
    }

    /// Closes the peer side, waits for the driver and runs the leak checks.
    pub async fn finish(self) -> SessionEnd {
        let Scripted {
            session,
            incoming,
            metrics,
            peer,
            driver,
            tasks_at_start,
        } = self;
        drop((session, incoming, peer));
        let end = bounded("driver", driver).await.unwrap();
        assert_metrics_converge("session", &metrics).await;
        assert_tasks_back_to(tasks_at_start).await;
        end
    }
}

/// A deterministic, non-periodic byte pattern: byte `i` of stream `seed`.
pub struct Pattern {
    seed: u64,
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

impl Pattern {
    pub fn new(seed: u64) -> Self {
        Self { seed }
    }

    /// Fills `buf` with the bytes at offsets `offset..offset + buf.len()`.
    pub fn fill(&self, offset: u64, buf: &mut [u8]) {
        for (i, b) in buf.iter_mut().enumerate() {
            let pos = offset + i as u64;
            let word = splitmix(self.seed ^ (pos / 8).wrapping_mul(0x100_0000_01B3));
            *b = (word >> ((pos % 8) * 8)) as u8;
        }
    }
}

/// Writes `len` bytes of `pattern` then shuts down.
pub async fn write_pattern(
    stream: &mut (impl AsyncWriteExt + Unpin),
    pattern: &Pattern,
    len: u64,
) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut off = 0u64;
    while off < len {
        let n = (len - off).min(buf.len() as u64) as usize;
        pattern.fill(off, &mut buf[..n]);
        stream.write_all(&buf[..n]).await?;
        off += n as u64;
    }
    stream.shutdown().await
}

/// Reads to EOF, checking every byte against `pattern`; returns the length read.
pub async fn read_pattern(
    stream: &mut (impl AsyncReadExt + Unpin),
    pattern: &Pattern,
) -> io::Result<u64> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut expect = vec![0u8; 64 * 1024];
    let mut off = 0u64;
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(off);
        }
        pattern.fill(off, &mut expect[..n]);
        if buf[..n] != expect[..n] {
            let at = buf[..n]
                .iter()
                .zip(&expect[..n])
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            panic!("byte {} differs from the pattern", off + at as u64);
        }
        off += n as u64;
    }
}

/// Reads until the stream fails; panics on a clean EOF. Returns the error and the bytes read.
pub async fn read_until_error(stream: &mut MuxStream) -> (io::Error, u64) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        match bounded("read until error", stream.read(&mut buf)).await {
            Ok(0) => panic!("clean EOF after {total} bytes where an error was due"),
            Ok(n) => total += n as u64,
            Err(err) => return (err, total),
        }
    }
}
