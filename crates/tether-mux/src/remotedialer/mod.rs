//! remotedialer mode: a [`FrameTransport`](crate::FrameTransport) that speaks the Go
//! rancher/remotedialer protocol on the wire and tether.v1 frames towards the multiplexer, so a
//! [`Session`](crate::Session) (and every `MuxStream` user: forwards, the agent's handler)
//! works unchanged over a remotedialer peer.
//!
//! The transport sits on a [`MessageTransport`]: WebSocket binary messages plus ping and pong
//! control frames (multiplexer PINGs become WebSocket pings; a Go peer only understands those).
//! A small writer task, owned by the transport, is the only user of the socket's sending half, so
//! that messages produced while reading (Pause, Resume, Errors for refused Connects) go out even
//! when the multiplexer has nothing to write.

mod error_text;
mod translate;

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::stream::{SplitSink, SplitStream};
use futures::{Sink, SinkExt, Stream, StreamExt};
use tether_proto::Frame;
use tether_proto::remotedialer::{RdLimits, decode, encode};
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::{debug, trace};

pub use translate::{RdCounters, RdSettings, Translator};

use crate::config::{MuxConfig, Role};
use crate::transport::TransportError;

/// Most messages waiting for the writer task before the multiplexer's writer waits.
const OUTBOX_CAP: usize = 64;
/// Most messages waiting before the reader stops reading. Far above [`OUTBOX_CAP`]: the excess
/// can only be the reader's own replies (Pause, Resume, Errors), and a reader that waited for
/// Data to drain could deadlock with a peer doing the same.
const OUTBOX_READER_CAP: usize = 1024;
/// Most bytes waiting for the writer task. Credit goes back to the local writer when a Data
/// message enters the outbox, so this also bounds what can follow a peer's Pause.
const OUTBOX_BYTES: usize = 256 * 1024;
/// Most frames waiting for the multiplexer's reader before its writer waits.
const TO_MUX_CAP: usize = 256;
/// Most ping nonces remembered until a pong answers them.
const MAX_OUTSTANDING_PINGS: usize = 16;
/// A frame type no tether.v1 peer sends: handed to the multiplexer when a WebSocket ping
/// arrives, so that the peer's pings count as liveness (the multiplexer ignores unknown types).
const LIVENESS_FRAME: u8 = 0xfe;

/// A WebSocket message as the remotedialer mode needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WsMessage {
    /// One tunnel message.
    Binary(Bytes),
    /// A ping control frame.
    Ping(Bytes),
    /// A pong control frame.
    Pong(Bytes),
    /// A close frame with a status code and a reason (at most 123 bytes); only sent, the
    /// adapters end their stream when one arrives.
    Close {
        /// The status code (RFC 6455 section 7.4).
        code: u16,
        /// Why, for the peer's logs.
        reason: String,
    },
}

/// WebSocket close codes the transport sends.
pub mod close_code {
    /// The session ended in an orderly way.
    pub const NORMAL: u16 = 1000;
    /// This side is going away: shutdown, or the session was replaced.
    pub const GOING_AWAY: u16 = 1001;
    /// The peer broke the WebSocket or remotedialer protocol.
    pub const PROTOCOL_ERROR: u16 = 1002;
}

/// Most bytes of a close frame's reason (125 bytes of payload less the code).
const MAX_CLOSE_REASON: usize = 123;

/// `text` cut to fit a close frame, at a character boundary.
fn close_reason(text: &str) -> String {
    let mut end = text.len().min(MAX_CLOSE_REASON);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// A bidirectional channel of WebSocket messages. Blanket-implemented for anything that fits;
/// the daemons adapt their WebSocket libraries to it.
pub trait MessageTransport:
    Stream<Item = Result<WsMessage, TransportError>>
    + Sink<WsMessage, Error = TransportError>
    + Send
    + Unpin
    + 'static
{
}

impl<T> MessageTransport for T where
    T: Stream<Item = Result<WsMessage, TransportError>>
        + Sink<WsMessage, Error = TransportError>
        + Send
        + Unpin
        + 'static
{
}

/// The multiplexer settings for a remotedialer session, from the daemon's usual ones.
///
/// - The receive window becomes the hard limit of unread bytes per connection (16 MiB or
///   more): Pause is only advisory for a Go peer, which keeps sending what is in flight (its
///   socket buffers and ours), so a peer that goes beyond is reset (`flow_control`).
/// - Read bytes are returned every 64 KiB, so that the mapping knows the unread bytes closely
///   enough for Pause (above 2 MiB) and Resume (below 256 KiB).
/// - As a client: WebSocket pings every 5 s (a Go server drops a client after 60 s without
///   one) and SyncConnections every 60 s. As a server: no SyncConnections (a Go client would
///   reap on receipt).
pub fn mux_config(role: Role, base: &MuxConfig) -> MuxConfig {
    let mut config = base.clone();
    config.window = config.window.max(16 * 1024 * 1024);
    config.window_update = Some(64 * 1024);
    // Go's data follows its Connect at once; it reaches the session before the accept.
    config.data_before_accept = true;
    config.peer_early_data = None;
    match role {
        Role::Agent => {
            config.ping_interval = config.ping_interval.min(Duration::from_secs(5));
            config.sync_interval = Some(Duration::from_secs(60));
        }
        Role::Server => config.sync_interval = None,
    }
    config
}

/// The mapping settings matching a multiplexer configuration.
pub fn settings_for(config: &MuxConfig) -> RdSettings {
    RdSettings {
        max_data: config.max_data,
        max_conns: config.max_streams,
        dial_timeout: config.dial_timeout,
        ..RdSettings::default()
    }
}

#[derive(Default)]
struct OutboxState {
    queue: VecDeque<WsMessage>,
    /// Bytes of the messages in `queue`.
    bytes: usize,
    closing: bool,
    /// The close frame sent when closing; normal closure unless something else was decided
    /// first (a GOAWAY: going away; a broken peer: protocol error).
    close_frame: Option<(u16, String)>,
    failed: Option<String>,
    /// The multiplexer's writer, waiting for room.
    sink_waker: Option<Waker>,
    /// The reader, waiting for room before it reads more.
    read_waker: Option<Waker>,
}

impl OutboxState {
    fn is_full(&self) -> bool {
        self.queue.len() >= OUTBOX_CAP || self.bytes >= OUTBOX_BYTES
    }
}

#[derive(Default)]
struct Outbox {
    state: Mutex<OutboxState>,
    notify: Notify,
}

impl Outbox {
    fn lock(&self) -> MutexGuard<'_, OutboxState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A remotedialer peer seen as a tether.v1 frame transport. Create it, keep
/// [`counters`](Self::counters) if wanted, and pass it to [`Session::new`](crate::Session::new)
/// with [`mux_config`].
pub struct RdTransport<M: MessageTransport> {
    source: SplitStream<M>,
    translator: Translator,
    outbox: Arc<Outbox>,
    writer: tokio::task::JoinHandle<()>,
    limits: RdLimits,
    next_msg_id: i64,
    ended: bool,
    /// The multiplexer's reader, to wake when the writer side produced frames for it.
    reader: Option<Waker>,
    /// The multiplexer's writer, waiting for `to_mux` to drain.
    mux_space: Option<Waker>,
    /// Nonces of the pings sent and not answered yet, oldest first.
    pings: VecDeque<u64>,
}

impl<M: MessageTransport> std::fmt::Debug for RdTransport<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdTransport").finish_non_exhaustive()
    }
}

impl<M: MessageTransport> RdTransport<M> {
    /// Wraps `inner`; this side of the session is `role` (the server sends Connects, the agent
    /// answers them). Must be called inside a tokio runtime: it spawns the writer task, which
    /// ends when the transport is closed or dropped.
    pub fn new(inner: M, role: Role, settings: RdSettings, limits: RdLimits) -> Self {
        let (sink, source) = inner.split();
        let outbox = Arc::new(Outbox::default());
        let writer = tokio::spawn(write_loop(sink, outbox.clone()));
        Self {
            source,
            translator: Translator::new(role, settings),
            outbox,
            writer,
            limits,
            next_msg_id: 1,
            ended: false,
            reader: None,
            mux_space: None,
            pings: VecDeque::new(),
        }
    }

    /// The mapping's counters (Pause/Resume sent, strays ignored, reaped connections).
    pub fn counters(&self) -> Arc<RdCounters> {
        self.translator.counters.clone()
    }

    /// Moves the translator's wire messages into the outbox and wakes the writer task.
    fn ship(&mut self) -> Result<(), TransportError> {
        if self.translator.to_wire.is_empty() {
            return Ok(());
        }
        {
            let mut out = self.outbox.lock();
            if let Some(failed) = &out.failed {
                return Err(TransportError::Other(failed.clone()));
            }
            while let Some(message) = self.translator.to_wire.pop_front() {
                trace!(?message, "remotedialer message queued");
                let mut buf = BytesMut::new();
                encode(self.next_msg_id, &message, &mut buf);
                self.next_msg_id = self.next_msg_id.wrapping_add(1);
                out.bytes += buf.len();
                out.queue.push_back(WsMessage::Binary(buf.freeze()));
            }
        }
        self.outbox.notify.notify_one();
        Ok(())
    }

    /// Sets the close frame to send when the transport closes, unless one is set already.
    fn decide_close(&self, code: u16, reason: &str) {
        self.outbox
            .lock()
            .close_frame
            .get_or_insert_with(|| (code, close_reason(reason)));
    }

    /// A pong from the peer. One echoing a nonce (tether peers) answers that ping. Any other
    /// (Go answers every ping with an empty pong) answers every outstanding ping, oldest
    /// first, so the multiplexer's RTT ends up measured from the last ping: a peer that
    /// answers at all is alive, and no ping waits for an echo that never comes.
    fn pong(&mut self, payload: &[u8]) {
        let echoed = <[u8; 8]>::try_from(payload)
            .ok()
            .map(u64::from_be_bytes)
            .and_then(|nonce| self.pings.iter().position(|n| *n == nonce));
        let answered: Vec<u64> = match echoed {
            Some(pos) => self.pings.remove(pos).into_iter().collect(),
            None => self.pings.drain(..).collect(),
        };
        for nonce in answered {
            self.translator.to_mux.push_back(Frame::Pong { nonce });
        }
    }

    fn wake_reader_if_needed(&mut self) {
        if !self.translator.to_mux.is_empty()
            && let Some(waker) = self.reader.take()
        {
            waker.wake();
        }
    }
}

impl<M: MessageTransport> Drop for RdTransport<M> {
    fn drop(&mut self) {
        self.writer.abort();
    }
}

impl<M: MessageTransport> Stream for RdTransport<M> {
    type Item = Result<Frame, TransportError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            this.ship()?;
            if let Some(frame) = this.translator.to_mux.pop_front() {
                if this.translator.to_mux.len() < TO_MUX_CAP / 2
                    && let Some(waker) = this.mux_space.take()
                {
                    waker.wake();
                }
                return Poll::Ready(Some(Ok(frame)));
            }
            if this.ended {
                return Poll::Ready(None);
            }
            if !this
                .reader
                .as_ref()
                .is_some_and(|w| w.will_wake(cx.waker()))
            {
                this.reader = Some(cx.waker().clone());
            }
            {
                let mut out = this.outbox.lock();
                if let Some(failed) = &out.failed {
                    return Poll::Ready(Some(Err(TransportError::Other(failed.clone()))));
                }
                if out.queue.len() >= OUTBOX_READER_CAP {
                    // The peer does not read our replies: wait for the writer.
                    out.read_waker = Some(cx.waker().clone());
                    return Poll::Pending;
                }
            }
            let message = match ready!(this.source.poll_next_unpin(cx)) {
                None => {
                    this.ended = true;
                    continue;
                }
                Some(Err(err)) => {
                    if !matches!(err, TransportError::Io(_)) {
                        this.decide_close(close_code::PROTOCOL_ERROR, &err.to_string());
                    }
                    return Poll::Ready(Some(Err(err)));
                }
                Some(Ok(message)) => message,
            };
            this.translator.maybe_tick(Instant::now());
            match message {
                WsMessage::Binary(bytes) => match decode(&bytes, &this.limits) {
                    Ok(decoded) => {
                        trace!(id = decoded.id, message = ?decoded.message, "remotedialer message");
                        this.translator.from_wire(decoded.message, Instant::now());
                    }
                    Err(err) => this.translator.from_wire_malformed(&err),
                },
                WsMessage::Ping(_) => {
                    return Poll::Ready(Some(Ok(Frame::Unknown {
                        frame_type: LIVENESS_FRAME,
                        stream: 0,
                    })));
                }
                // Never produced by the adapters; the end of the stream stands for it.
                WsMessage::Close { .. } => {
                    this.ended = true;
                }
                WsMessage::Pong(payload) => {
                    this.pong(&payload);
                    if this.translator.to_mux.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::Unknown {
                            frame_type: LIVENESS_FRAME,
                            stream: 0,
                        })));
                    }
                }
            }
        }
    }
}

impl<M: MessageTransport> Sink<Frame> for RdTransport<M> {
    type Error = TransportError;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        let this = &mut *self;
        this.ship()?;
        if this.translator.to_mux.len() >= TO_MUX_CAP {
            this.mux_space = Some(cx.waker().clone());
            this.wake_reader_if_needed();
            return Poll::Pending;
        }
        let mut out = this.outbox.lock();
        if let Some(failed) = &out.failed {
            return Poll::Ready(Err(TransportError::Other(failed.clone())));
        }
        if out.is_full() {
            out.sink_waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        Poll::Ready(Ok(()))
    }

    fn start_send(mut self: Pin<&mut Self>, frame: Frame) -> Result<(), Self::Error> {
        let this = &mut *self;
        if let Frame::Ping { nonce } = frame {
            if this.pings.len() >= MAX_OUTSTANDING_PINGS {
                this.pings.pop_front();
            }
            this.pings.push_back(nonce);
            this.translator.tick(Instant::now());
            this.wake_reader_if_needed();
            this.outbox
                .lock()
                .queue
                .push_back(WsMessage::Ping(Bytes::copy_from_slice(
                    &nonce.to_be_bytes(),
                )));
            this.outbox.notify.notify_one();
            return Ok(());
        }
        if let Frame::GoAway { message, .. } = &frame {
            debug!("GOAWAY has no remotedialer equivalent; the session closes later");
            this.decide_close(close_code::GOING_AWAY, message);
        }
        this.translator.from_mux(frame, Instant::now());
        this.ship()?;
        this.wake_reader_if_needed();
        Ok(())
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Result<(), Self::Error>> {
        // Messages are handed to the writer task in order; it flushes after every batch.
        self.ship()?;
        Poll::Ready(Ok(()))
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        let this = &mut *self;
        let _ = this.ship();
        this.outbox.lock().closing = true;
        this.outbox.notify.notify_one();
        let _ = ready!(Pin::new(&mut this.writer).poll(cx));
        Poll::Ready(Ok(()))
    }
}

/// The only user of the socket's sending half: writes what the outbox holds, in order.
async fn write_loop<M: MessageTransport>(mut sink: SplitSink<M, WsMessage>, outbox: Arc<Outbox>) {
    loop {
        let (batch, closing) = {
            let mut out = outbox.lock();
            let batch: Vec<WsMessage> = out.queue.drain(..).collect();
            out.bytes = 0;
            (batch, out.closing)
        };
        if !batch.is_empty() {
            for message in batch {
                if let Err(err) = sink.feed(message).await {
                    fail(&outbox, err);
                    return;
                }
            }
            if let Err(err) = sink.flush().await {
                fail(&outbox, err);
                return;
            }
            wake_waiters(&outbox);
            continue;
        }
        if closing {
            let close_frame = outbox.lock().close_frame.take();
            let (code, reason) = close_frame.unwrap_or((close_code::NORMAL, String::new()));
            // The socket may be gone already; the close frame is a courtesy.
            let _ = sink.send(WsMessage::Close { code, reason }).await;
            let _ = sink.close().await;
            return;
        }
        wake_waiters(&outbox);
        outbox.notify.notified().await;
    }
}

fn wake_waiters(outbox: &Outbox) {
    let (a, b) = {
        let mut out = outbox.lock();
        (out.sink_waker.take(), out.read_waker.take())
    };
    for waker in [a, b].into_iter().flatten() {
        waker.wake();
    }
}

fn fail(outbox: &Outbox, err: TransportError) {
    debug!(error = %err, "remotedialer writer failed");
    outbox.lock().failed = Some(format!("write failed: {err}"));
    wake_waiters(outbox);
}
