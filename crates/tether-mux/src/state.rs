//! The session's shared state: the stream table, the control queue, and how each received frame
//! changes them. Everything here runs under one short `std::sync::Mutex`, never across an await.

use bytes::{Buf, Bytes, BytesMut};
use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Waker;
use std::time::Duration;
use tether_proto::{Frame, GoAwayCode, OpenErrorCode, ProtoError, ResetCode, StreamId};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{MuxConfig, Role};
use crate::direct::Sink;
use crate::error::{OpenError, SessionEnd};
use crate::metrics::{CloseReason, MuxMetrics};

/// The stream table never shrinks below this many slots.
const MIN_TABLE_CAPACITY: usize = 64;

/// Most unanswered pings remembered for RTT measurement.
const MAX_PENDING_PINGS: usize = 16;

/// Everything the session's tasks and handles share.
pub(crate) struct Shared {
    pub(crate) state: Mutex<State>,
    /// Wakes the writer task (frames queued that no handle could write inline).
    pub(crate) writer_notify: Notify,
    /// The writer's state, installed by the session driver (see `writer.rs`).
    pub(crate) writer: crate::writer::WriterSlot,
    pub(crate) config: MuxConfig,
    pub(crate) metrics: MuxMetrics,
    /// Cancelled when the session ends, for any reason.
    pub(crate) cancel: CancellationToken,
    /// DATA and FIN frames from stream handles, in write order.
    pub(crate) data_tx: mpsc::Sender<Frame>,
    pub(crate) bytes_rx: AtomicU64,
    pub(crate) bytes_tx: AtomicU64,
    pub(crate) created: Instant,
}

impl Shared {
    pub(crate) fn new(
        role: Role,
        config: MuxConfig,
        metrics: MuxMetrics,
        data_tx: mpsc::Sender<Frame>,
    ) -> Self {
        Self {
            state: Mutex::new(State {
                streams: HashMap::new(),
                next_id: role.first_id(),
                max_peer_id: 0,
                role,
                control: VecDeque::new(),
                end: None,
                local_goaway: false,
                peer_goaway: None,
                pings: VecDeque::new(),
                next_nonce: 1,
                rtt: None,
            }),
            writer_notify: Notify::new(),
            writer: Mutex::new(None),
            config,
            metrics,
            cancel: CancellationToken::new(),
            data_tx,
            bytes_rx: AtomicU64::new(0),
            bytes_tx: AtomicU64::new(0),
            created: Instant::now(),
        }
    }

    /// Locks the state. A poisoned lock means a panic elsewhere already broke an invariant;
    /// the state is still structurally valid, so keep going rather than cascade the panic.
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records the end of the session (the first reason wins), fails every stream and stops the
    /// tasks.
    pub(crate) fn finish(&self, reason: SessionEnd) {
        let wakers = {
            let mut state = self.lock();
            state.end_session(reason, &self.metrics)
        };
        wakers.wake_all();
        self.cancel.cancel();
        self.writer_notify.notify_one();
    }

    pub(crate) fn ended(&self) -> Option<SessionEnd> {
        self.lock().end.clone()
    }
}

/// Where a stream is in its open handshake.
pub(crate) enum Phase {
    /// We sent OPEN; the opener waits on the sender for the peer's window or an error.
    Opening(Option<oneshot::Sender<Result<(), OpenError>>>),
    /// The peer sent OPEN; the application has not answered yet.
    Accepting,
    /// Data may flow.
    Open,
}

/// How a stream failed, replayed to its handle.
#[derive(Clone)]
pub(crate) struct StreamFailure {
    pub(crate) kind: io::ErrorKind,
    pub(crate) message: String,
    pub(crate) reason: CloseReason,
}

impl StreamFailure {
    pub(crate) fn to_io(&self) -> io::Error {
        io::Error::new(self.kind, self.message.clone())
    }
}

/// Bytes received for a stream and not read yet.
///
/// Bytes received for one stream and not yet read, in order.
///
/// A payload is kept as it came (zero-copy) when nothing is buffered (the common case of a
/// reader keeping up) or when it is at least [`KEEP_CHUNK`] bytes (bulk transfers, where the
/// reader is a frame or two behind). Smaller payloads arriving behind others are copied into an
/// owned chunk. Transports hand out payloads that share their receive buffers, so keeping every
/// small payload would let a peer pin a whole receive buffer per byte of window; this way a
/// stream pins at most one small payload's buffer plus `window / KEEP_CHUNK` large ones.
#[derive(Default)]
pub(crate) struct RecvBuf {
    chunks: VecDeque<Chunk>,
    len: usize,
}

enum Chunk {
    /// A payload as the transport delivered it.
    Shared(Bytes),
    /// Small payloads copied together.
    Owned(BytesMut),
}

/// Payloads at least this large are queued without copying even behind others.
pub(crate) const KEEP_CHUNK: usize = 32 * 1024;

impl RecvBuf {
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn push(&mut self, payload: Bytes) {
        if payload.is_empty() {
            return;
        }
        self.len += payload.len();
        if self.chunks.is_empty() || payload.len() >= KEEP_CHUNK {
            self.chunks.push_back(Chunk::Shared(payload));
            return;
        }
        match self.chunks.back_mut() {
            Some(Chunk::Owned(owned)) => owned.extend_from_slice(&payload),
            _ => self
                .chunks
                .push_back(Chunk::Owned(BytesMut::from(&payload[..]))),
        }
    }

    /// Moves as many bytes as fit into `dst`; returns how many.
    pub(crate) fn read_into(&mut self, dst: &mut tokio::io::ReadBuf<'_>) -> usize {
        let mut copied = 0;
        while dst.remaining() > 0 {
            let Some(front) = self.chunks.front_mut() else {
                break;
            };
            let bytes: &[u8] = match front {
                Chunk::Shared(b) => b,
                Chunk::Owned(b) => b,
            };
            let n = bytes.len().min(dst.remaining());
            dst.put_slice(&bytes[..n]);
            copied += n;
            if n == bytes.len() {
                // Drop the reference to the transport's buffer, not just the bytes.
                self.chunks.pop_front();
            } else {
                match front {
                    Chunk::Shared(b) => b.advance(n),
                    Chunk::Owned(b) => b.advance(n),
                }
            }
        }
        self.len -= copied;
        self.release_if_empty();
        copied
    }

    /// Takes up to `max` bytes from the front without copying them.
    pub(crate) fn take_chunk(&mut self, max: usize) -> Bytes {
        let Some(front) = self.chunks.front_mut() else {
            return Bytes::new();
        };
        let taken = match front {
            Chunk::Shared(b) if b.len() <= max => {
                let taken = std::mem::take(b);
                self.chunks.pop_front();
                taken
            }
            Chunk::Shared(b) => b.split_to(max),
            Chunk::Owned(b) if b.len() <= max => {
                let taken = std::mem::take(b).freeze();
                self.chunks.pop_front();
                taken
            }
            Chunk::Owned(b) => b.split_to(max).freeze(),
        };
        self.len -= taken.len();
        self.release_if_empty();
        taken
    }

    /// An empty buffer keeps no allocation (an idle stream costs nothing here).
    fn release_if_empty(&mut self) {
        if self.len == 0 && self.chunks.capacity() > 0 {
            self.chunks = VecDeque::new();
        }
    }
}

/// One stream's state.
pub(crate) struct Slot {
    pub(crate) phase: Phase,
    pub(crate) recv_buf: RecvBuf,
    /// Bytes the peer may still send before it needs a WINDOW.
    pub(crate) recv_allowance: u64,
    /// Bytes consumed by the reader and not yet granted back.
    pub(crate) unacked: u64,
    pub(crate) recv_fin: bool,
    /// Bytes we may still send.
    pub(crate) send_credit: u64,
    pub(crate) send_fin: bool,
    /// This stream's frames waiting in the data queue.
    pub(crate) queued: usize,
    pub(crate) failure: Option<StreamFailure>,
    pub(crate) handle_dropped: bool,
    /// Send RST once the frames already queued for this stream are written.
    pub(crate) rst_after_drain: Option<ResetCode>,
    pub(crate) read_waker: Option<Waker>,
    pub(crate) write_waker: Option<Waker>,
    /// The local socket the session's reader may write received bytes into itself.
    pub(crate) sink: Option<Arc<Sink>>,
    /// The consumer holds bytes it took and has not finished writing: a direct write now
    /// would overtake them.
    pub(crate) pump_holds: bool,
    /// The reader is writing into `sink` (outside the lock).
    pub(crate) direct_writing: bool,
    /// Bytes the reader wrote into `sink`.
    pub(crate) direct_bytes: u64,
}

impl Slot {
    pub(crate) fn new(phase: Phase, window: u32, send_credit: u64) -> Self {
        Self {
            phase,
            recv_buf: RecvBuf::default(),
            recv_allowance: u64::from(window),
            unacked: 0,
            recv_fin: false,
            send_credit,
            send_fin: false,
            queued: 0,
            failure: None,
            handle_dropped: false,
            rst_after_drain: None,
            read_waker: None,
            write_waker: None,
            sink: None,
            pump_holds: false,
            direct_writing: false,
            direct_bytes: 0,
        }
    }

    /// Counts `n` bytes as consumed by the reader; returns the WINDOW frame that grants credit
    /// back when enough has been consumed (a quarter window by default, so the sender stays
    /// busy without a WINDOW frame per read).
    pub(crate) fn consumed(&mut self, id: StreamId, n: usize, config: &MuxConfig) -> Option<Frame> {
        self.unacked += n as u64;
        let every = config
            .window_update
            .map_or(u64::from(config.window) / 4, u64::from)
            .max(1);
        if self.failure.is_some() || self.recv_fin || self.unacked < every {
            return None;
        }
        let increment = self.unacked.min(u64::from(u32::MAX));
        self.unacked -= increment;
        self.recv_allowance += increment;
        Some(Frame::Window {
            stream: id,
            increment: increment as u32,
        })
    }

    /// Whether the reader may write a payload into the stream's socket now: one is attached,
    /// and no byte received before is buffered, held by the consumer, or being written.
    fn can_deliver_directly(&self) -> bool {
        self.sink.is_some() && self.recv_buf.is_empty() && !self.pump_holds && !self.direct_writing
    }

    /// Marks the stream failed (the first failure wins) and collects its wakers.
    pub(crate) fn fail(&mut self, failure: StreamFailure, wakers: &mut Wakers) {
        if self.failure.is_none() {
            self.failure = Some(failure);
        }
        // Buffered bytes are kept so that data received before the failure can still be read.
        wakers.take(&mut self.read_waker);
        wakers.take(&mut self.write_waker);
        if let Phase::Opening(reply) = &mut self.phase
            && let Some(reply) = reply.take()
        {
            let _ = reply.send(Err(OpenError::Reset));
        }
    }

    fn close_reason(&self) -> CloseReason {
        match &self.failure {
            Some(failure) => failure.reason,
            None if self.recv_fin && self.send_fin => CloseReason::Fin,
            None => CloseReason::Reset,
        }
    }

    /// Whether the stream still counts as open on the wire (listed in SYNC).
    fn is_live(&self) -> bool {
        self.failure.is_none() && !(self.recv_fin && self.send_fin && self.queued == 0)
    }
}

/// Wakers collected under the lock and woken after it is released.
#[derive(Default)]
pub(crate) struct Wakers(Vec<Waker>);

impl Wakers {
    pub(crate) fn take(&mut self, slot: &mut Option<Waker>) {
        if let Some(waker) = slot.take() {
            self.0.push(waker);
        }
    }

    pub(crate) fn wake_all(self) {
        for waker in self.0 {
            waker.wake();
        }
    }
}

/// The mutable session state.
pub(crate) struct State {
    pub(crate) streams: HashMap<StreamId, Slot>,
    pub(crate) next_id: StreamId,
    /// Highest stream id the peer has opened.
    pub(crate) max_peer_id: StreamId,
    pub(crate) role: Role,
    /// Frames written before any queued DATA: OPEN*, WINDOW, RST, PING, PONG, SYNC, GOAWAY.
    pub(crate) control: VecDeque<Frame>,
    pub(crate) end: Option<SessionEnd>,
    pub(crate) local_goaway: bool,
    pub(crate) peer_goaway: Option<(GoAwayCode, String)>,
    pub(crate) pings: VecDeque<(u64, Instant, Option<oneshot::Sender<Duration>>)>,
    pub(crate) next_nonce: u64,
    pub(crate) rtt: Option<Duration>,
}

/// What the reader must do after a frame was applied.
pub(crate) enum Applied {
    /// Nothing more.
    Done,
    /// Write `payload` into `sink` outside the lock (non-blocking), then report with
    /// [`State::delivered`].
    Deliver {
        stream: StreamId,
        sink: Arc<Sink>,
        payload: Bytes,
    },
    /// The peer opened a stream: hand it to the application.
    Incoming {
        stream: StreamId,
        target: tether_proto::TargetAddr,
        timeout_ms: u32,
    },
}

impl State {
    /// Queues a frame the session must send (never dropped).
    pub(crate) fn push_control(&mut self, frame: Frame) {
        self.control.push_back(frame);
    }

    /// Queues a reply the peer provoked (PONG, RST for an unknown stream); dropped when the
    /// queue is over its bound, so a flooding peer cannot grow it.
    fn push_reply(&mut self, frame: Frame, max: usize) -> bool {
        if self.control.len() >= max {
            return false;
        }
        self.control.push_back(frame);
        true
    }

    /// Answers a frame for a stream this side does not know with RST `unknown_stream`.
    fn reply_unknown_stream(&mut self, stream: StreamId, max: usize) {
        self.push_reply(
            Frame::Rst {
                stream,
                code: ResetCode::UnknownStream,
                message: String::new(),
            },
            max,
        );
    }

    pub(crate) fn send_ping(&mut self, reply: Option<oneshot::Sender<Duration>>) {
        let nonce = self.next_nonce;
        self.next_nonce = self.next_nonce.wrapping_add(1);
        if self.pings.len() >= MAX_PENDING_PINGS {
            self.pings.pop_front();
        }
        self.pings.push_back((nonce, Instant::now(), reply));
        self.push_control(Frame::Ping { nonce });
    }

    /// Removes the slot if nothing refers to it any more, counting the close.
    pub(crate) fn maybe_remove(&mut self, id: StreamId, metrics: &MuxMetrics) {
        let Some(slot) = self.streams.get(&id) else {
            return;
        };
        if slot.handle_dropped && slot.queued == 0 {
            let reason = slot.close_reason();
            self.streams.remove(&id);
            metrics.stream_closed(reason);
            // A burst of streams leaves a table sized for the burst; give most of it back once
            // three quarters are free (halving at a quarter full keeps the cost amortised).
            let capacity = self.streams.capacity();
            if capacity > MIN_TABLE_CAPACITY && self.streams.len() * 4 < capacity {
                self.streams.shrink_to(self.streams.len() * 2);
            }
        }
    }

    /// After an [`Applied::Deliver`]: `written` bytes reached the socket, `rest` did not (the
    /// socket was full or failed) and goes to the stream's buffer for its consumer, which
    /// writes it or meets the error itself.
    pub(crate) fn delivered(
        &mut self,
        id: StreamId,
        written: usize,
        rest: Bytes,
        config: &MuxConfig,
        wakers: &mut Wakers,
    ) {
        let Some(slot) = self.streams.get_mut(&id) else {
            return;
        };
        slot.direct_writing = false;
        slot.direct_bytes += written as u64;
        let window = slot.consumed(id, written, config);
        if !rest.is_empty() {
            slot.recv_buf.push(rest);
            wakers.take(&mut slot.read_waker);
        }
        if let Some(window) = window {
            self.push_control(window);
        }
    }

    /// Resets stream `id` locally with `code`, telling the peer.
    fn reset_stream(&mut self, id: StreamId, code: ResetCode, message: &str, wakers: &mut Wakers) {
        if let Some(slot) = self.streams.get_mut(&id) {
            if slot.failure.is_some() {
                // Already reset or failed: one RST per stream, so that a peer repeating the
                // offending frame cannot grow the control queue.
                return;
            }
            slot.fail(
                StreamFailure {
                    kind: io::ErrorKind::ConnectionReset,
                    message: format!("stream reset locally ({}): {message}", code.label()),
                    reason: CloseReason::Reset,
                },
                wakers,
            );
        }
        self.push_control(Frame::Rst {
            stream: id,
            code,
            message: message.to_owned(),
        });
    }

    pub(crate) fn end_session(&mut self, reason: SessionEnd, metrics: &MuxMetrics) -> Wakers {
        let mut wakers = Wakers::default();
        if self.end.is_some() {
            return wakers;
        }
        let message = format!("tunnel session lost: {reason}");
        self.end = Some(reason);
        let ids: Vec<StreamId> = self.streams.keys().copied().collect();
        for id in ids {
            if let Some(slot) = self.streams.get_mut(&id) {
                // Answer a pending open first: `fail` would report it as a stream reset.
                if let Phase::Opening(reply) = &mut slot.phase
                    && let Some(reply) = reply.take()
                {
                    let _ = reply.send(Err(OpenError::SessionClosed));
                }
                slot.fail(
                    StreamFailure {
                        kind: io::ErrorKind::ConnectionAborted,
                        message: message.clone(),
                        reason: CloseReason::SessionLost,
                    },
                    &mut wakers,
                );
                // The writer is gone: nothing queued will be written.
                slot.queued = 0;
            }
            self.maybe_remove(id, metrics);
        }
        self.pings.clear();
        wakers
    }

    /// Applies one received frame.
    pub(crate) fn apply(
        &mut self,
        frame: Frame,
        shared: &Shared,
        wakers: &mut Wakers,
    ) -> Result<Applied, SessionEnd> {
        let config = &shared.config;
        let metrics = &shared.metrics;
        match frame {
            Frame::Data { stream, payload } => {
                let len = payload.len() as u64;
                let Some(slot) = self.streams.get_mut(&stream) else {
                    // Usually a race with a reset we sent; answer so a confused peer learns.
                    self.reply_unknown_stream(stream, config.max_control_queue);
                    return Ok(Applied::Done);
                };
                if slot.failure.is_some() {
                    return Ok(Applied::Done);
                }
                if len > u64::from(config.max_data) {
                    // Only reachable with `max_data` below the decoder's floor.
                    metrics
                        .protocol_errors
                        .with_label_values(&["too_large"])
                        .inc();
                    self.reset_stream(stream, ResetCode::Protocol, "DATA over max_data", wakers);
                    return Ok(Applied::Done);
                }
                if slot.recv_fin {
                    metrics
                        .protocol_errors
                        .with_label_values(&["data_after_fin"])
                        .inc();
                    self.reset_stream(stream, ResetCode::Protocol, "DATA after FIN", wakers);
                    return Ok(Applied::Done);
                }
                if len > slot.recv_allowance {
                    metrics
                        .protocol_errors
                        .with_label_values(&["flow_control"])
                        .inc();
                    self.reset_stream(
                        stream,
                        ResetCode::FlowControl,
                        "DATA beyond the granted window",
                        wakers,
                    );
                    return Ok(Applied::Done);
                }
                if len > 0 {
                    slot.recv_allowance -= len;
                    shared.bytes_rx.fetch_add(len, Ordering::Relaxed);
                    metrics.bytes_rx.inc_by(len);
                    if slot.can_deliver_directly()
                        && let Some(sink) = slot.sink.clone()
                    {
                        slot.direct_writing = true;
                        return Ok(Applied::Deliver {
                            stream,
                            sink,
                            payload,
                        });
                    }
                    slot.recv_buf.push(payload);
                    wakers.take(&mut slot.read_waker);
                }
            }
            Frame::Window { stream, increment } => {
                if let Some(slot) = self.streams.get_mut(&stream) {
                    slot.send_credit = slot.send_credit.saturating_add(u64::from(increment));
                    if slot.send_credit > u64::from(u32::MAX) {
                        metrics
                            .protocol_errors
                            .with_label_values(&["window_overflow"])
                            .inc();
                        self.reset_stream(
                            stream,
                            ResetCode::FlowControl,
                            "window overflow",
                            wakers,
                        );
                    } else {
                        wakers.take(&mut slot.write_waker);
                    }
                }
            }
            Frame::Fin { stream } => match self.streams.get_mut(&stream) {
                Some(slot) if slot.failure.is_none() => {
                    if slot.recv_fin {
                        metrics
                            .protocol_errors
                            .with_label_values(&["double_fin"])
                            .inc();
                        self.reset_stream(stream, ResetCode::Protocol, "FIN twice", wakers);
                    } else {
                        slot.recv_fin = true;
                        wakers.take(&mut slot.read_waker);
                    }
                }
                Some(_) => {}
                None => self.reply_unknown_stream(stream, config.max_control_queue),
            },
            Frame::Rst {
                stream,
                code,
                message,
            } => {
                if let Some(slot) = self.streams.get_mut(&stream) {
                    let reason = match slot.phase {
                        Phase::Opening(_) => CloseReason::Refused,
                        _ => CloseReason::Reset,
                    };
                    slot.fail(
                        StreamFailure {
                            kind: io::ErrorKind::ConnectionReset,
                            message: format!("stream reset by peer ({}): {message}", code.label()),
                            reason,
                        },
                        wakers,
                    );
                }
            }
            Frame::Open {
                stream,
                window,
                timeout_ms,
                target,
            } => {
                self.check_new_peer_id(stream)?;
                self.max_peer_id = stream;
                let refusal = if self.local_goaway {
                    Some((OpenErrorCode::Draining, "session is draining"))
                } else if self.streams.len() >= config.max_streams {
                    Some((OpenErrorCode::Limit, "session stream limit reached"))
                } else {
                    None
                };
                if let Some((code, message)) = refusal {
                    metrics.stream_opened();
                    metrics.stream_closed(CloseReason::Refused);
                    // Bounded: a peer flooding OPENs cannot grow the control queue.
                    self.push_reply(
                        Frame::OpenErr {
                            stream,
                            code,
                            message: message.into(),
                        },
                        config.max_control_queue,
                    );
                    return Ok(Applied::Done);
                }
                self.streams.insert(
                    stream,
                    Slot::new(Phase::Accepting, config.window, u64::from(window)),
                );
                metrics.stream_opened();
                return Ok(Applied::Incoming {
                    stream,
                    target,
                    timeout_ms,
                });
            }
            Frame::OpenOk { stream, window } => {
                if let Some(slot) = self.streams.get_mut(&stream)
                    && let Phase::Opening(reply) = &mut slot.phase
                {
                    let reply = reply.take();
                    slot.phase = Phase::Open;
                    slot.send_credit = u64::from(window);
                    if let Some(reply) = reply {
                        let _ = reply.send(Ok(()));
                    }
                }
            }
            Frame::OpenErr {
                stream,
                code,
                message,
            } => {
                if let Some(slot) = self.streams.get_mut(&stream) {
                    let failure = StreamFailure {
                        kind: io::ErrorKind::ConnectionRefused,
                        message: format!("open refused ({}): {message}", code.label()),
                        reason: CloseReason::Refused,
                    };
                    match &mut slot.phase {
                        Phase::Opening(reply) => {
                            let reply = reply.take();
                            slot.failure = Some(failure);
                            if let Some(reply) = reply {
                                let _ = reply.send(Err(OpenError::Refused { code, message }));
                            }
                        }
                        // A refusal after the stream was opened: the remotedialer translation
                        // opens optimistically and learns of a failed dial later. Counted as
                        // refused, like a refusal in time.
                        Phase::Open => slot.fail(failure, wakers),
                        Phase::Accepting => {}
                    }
                }
            }
            Frame::Ping { nonce } => {
                self.push_reply(Frame::Pong { nonce }, config.max_control_queue);
            }
            Frame::Pong { nonce } => {
                if let Some(pos) = self.pings.iter().position(|(n, _, _)| *n == nonce)
                    && let Some((_, sent, reply)) = self.pings.remove(pos)
                {
                    let rtt = sent.elapsed();
                    self.rtt = Some(rtt);
                    if let Some(reply) = reply {
                        let _ = reply.send(rtt);
                    }
                }
            }
            Frame::Sync { high, open } => {
                let stale: Vec<StreamId> = self
                    .streams
                    .iter()
                    .filter(|(id, slot)| {
                        // A stream finished both ways is legitimately gone from the peer's list;
                        // resetting it here would throw away bytes not yet read.
                        let finished = slot.recv_fin && slot.send_fin;
                        **id <= high
                            && slot.failure.is_none()
                            && !finished
                            && open.binary_search(id).is_err()
                    })
                    .map(|(id, _)| *id)
                    .collect();
                for id in stale {
                    metrics
                        .protocol_errors
                        .with_label_values(&["sync_reaped"])
                        .inc();
                    if let Some(slot) = self.streams.get_mut(&id) {
                        slot.fail(
                            StreamFailure {
                                kind: io::ErrorKind::ConnectionReset,
                                message: "stream unknown to the peer (reaped by SYNC)".into(),
                                reason: CloseReason::Reset,
                            },
                            wakers,
                        );
                    }
                }
            }
            Frame::GoAway { code, message } => {
                self.peer_goaway = Some((code, message));
            }
            Frame::Unknown { .. } => {}
        }
        Ok(Applied::Done)
    }

    fn check_new_peer_id(&self, id: StreamId) -> Result<(), SessionEnd> {
        if !self.role.is_peer_id(id) {
            return Err(SessionEnd::Protocol(format!(
                "peer opened stream {id} with the wrong parity"
            )));
        }
        if id <= self.max_peer_id {
            return Err(SessionEnd::Protocol(format!(
                "peer reused stream id {id} (highest so far {})",
                self.max_peer_id
            )));
        }
        Ok(())
    }

    /// Handles a frame that failed to decode: reset its stream if it has one we know, refuse a
    /// new OPEN with a bad target, and end the session otherwise.
    pub(crate) fn apply_malformed(
        &mut self,
        err: &ProtoError,
        shared: &Shared,
        wakers: &mut Wakers,
    ) -> Result<(), SessionEnd> {
        shared
            .metrics
            .protocol_errors
            .with_label_values(&[err.kind.label()])
            .inc();
        let is_open = err.frame_type == Some(tether_proto::FrameType::Open as u8);
        match err.stream {
            Some(id) if id != 0 && self.streams.contains_key(&id) => {
                self.reset_stream(id, ResetCode::Protocol, "malformed frame", wakers);
                Ok(())
            }
            Some(id) if is_open && self.check_new_peer_id(id).is_ok() => {
                self.max_peer_id = id;
                shared.metrics.stream_opened();
                shared.metrics.stream_closed(CloseReason::Refused);
                self.push_reply(
                    Frame::OpenErr {
                        stream: id,
                        code: OpenErrorCode::Unsupported,
                        message: err.kind.to_string(),
                    },
                    shared.config.max_control_queue,
                );
                Ok(())
            }
            // A stream frame that names a stream that is not open: answered as a valid one
            // would be (RST for DATA and FIN, nothing for the rest), the session goes on.
            Some(id) if id != 0 && !is_open && is_stream_frame(err.frame_type) => {
                let answers = [
                    tether_proto::FrameType::Data as u8,
                    tether_proto::FrameType::Fin as u8,
                ];
                if err.frame_type.is_some_and(|t| answers.contains(&t)) {
                    self.reply_unknown_stream(id, shared.config.max_control_queue);
                }
                Ok(())
            }
            _ => Err(SessionEnd::Protocol(err.to_string())),
        }
    }

    /// The SYNC this side would send now: the highest peer id seen, and our live streams.
    pub(crate) fn sync_frame(&self) -> Frame {
        let mut open: Vec<StreamId> = self
            .streams
            .iter()
            .filter(|(_, slot)| slot.is_live())
            .map(|(id, _)| *id)
            .collect();
        open.sort_unstable();
        Frame::Sync {
            high: self.max_peer_id,
            open,
        }
    }
}

/// Creates the shared state for a new session.
pub(crate) fn new_shared(
    role: Role,
    config: MuxConfig,
    metrics: MuxMetrics,
) -> (Arc<Shared>, mpsc::Receiver<Frame>) {
    let (data_tx, data_rx) = mpsc::channel(config.write_queue.max(1));
    (
        Arc::new(Shared::new(role, config, metrics, data_tx)),
        data_rx,
    )
}

/// True for the frame types that belong to one stream (a malformed one of these with a
/// stream id names the stream it concerns).
fn is_stream_frame(frame_type: Option<u8>) -> bool {
    use tether_proto::FrameType;
    frame_type.is_some_and(|t| {
        [
            FrameType::OpenOk,
            FrameType::OpenErr,
            FrameType::Data,
            FrameType::Window,
            FrameType::Fin,
            FrameType::Rst,
        ]
        .iter()
        .any(|k| *k as u8 == t)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stream_table_gives_back_its_room_after_a_burst() {
        let metrics = MuxMetrics::unregistered();
        let (shared, _data_rx) = new_shared(Role::Server, MuxConfig::default(), metrics.clone());
        let mut state = shared.lock();
        let ids: Vec<StreamId> = (0..5_000u64).map(|i| i * 2 + 2).collect();
        for &id in &ids {
            let mut slot = Slot::new(Phase::Accepting, 1024, 1024);
            slot.handle_dropped = true;
            state.streams.insert(id, slot);
        }
        let burst = state.streams.capacity();
        assert!(burst >= 5_000, "{burst}");
        // Half of them closed: still sized for the rest.
        for &id in &ids[..2_500] {
            state.maybe_remove(id, &metrics);
        }
        assert!(state.streams.capacity() >= 2_500);
        for &id in &ids[2_500..] {
            state.maybe_remove(id, &metrics);
        }
        assert!(state.streams.is_empty());
        assert!(
            state.streams.capacity() <= 2 * MIN_TABLE_CAPACITY,
            "capacity {} after the burst of {burst}",
            state.streams.capacity()
        );
    }

    /// Applies DATA for stream 2 (opened) and tells whether the reader was asked to write it
    /// directly.
    fn apply_data(shared: &Shared, payload: &'static [u8]) -> bool {
        let mut wakers = Wakers::default();
        let applied = shared.lock().apply(
            Frame::Data {
                stream: 2,
                payload: Bytes::from_static(payload),
            },
            shared,
            &mut wakers,
        );
        matches!(applied, Ok(Applied::Deliver { .. }))
    }

    #[tokio::test]
    async fn direct_delivery_never_overtakes_bytes_received_before() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (tcp, _accepted) = tokio::join!(
            tokio::net::TcpStream::connect(listener.local_addr().unwrap()),
            listener.accept()
        );
        let sink = Arc::new(Sink::new(tcp.unwrap()));
        let metrics = MuxMetrics::unregistered();
        let config = MuxConfig::default();
        let (shared, _data_rx) = new_shared(Role::Server, config.clone(), metrics);
        let mut slot = Slot::new(Phase::Open, config.window, 1024);
        slot.sink = Some(sink);
        shared.lock().streams.insert(2, slot);

        assert!(
            apply_data(&shared, b"first"),
            "nothing before it: written directly"
        );
        // Until the reader reports, a second payload queues behind the first.
        assert!(!apply_data(&shared, b"second"));
        let mut wakers = Wakers::default();
        shared
            .lock()
            .delivered(2, 5, Bytes::new(), &config, &mut wakers);
        // "second" is still buffered: the next payload queues behind it.
        assert!(!apply_data(&shared, b"third"));
        let slot_state = |shared: &Shared| {
            let state = shared.lock();
            let slot = &state.streams[&2];
            (slot.recv_buf.len(), slot.direct_bytes)
        };
        assert_eq!(slot_state(&shared), (11, 5));
        // The consumer takes everything but holds it, unwritten: still no direct write.
        {
            let mut state = shared.lock();
            let slot = state.streams.get_mut(&2).unwrap();
            assert_eq!(slot.recv_buf.take_chunk(64)[..], *b"second");
            assert_eq!(slot.recv_buf.take_chunk(64)[..], *b"third");
            slot.pump_holds = true;
        }
        assert!(!apply_data(&shared, b"fourth"));
        {
            let mut state = shared.lock();
            let slot = state.streams.get_mut(&2).unwrap();
            assert_eq!(slot.recv_buf.take_chunk(64)[..], *b"fourth");
            slot.pump_holds = false;
        }
        // Nothing buffered, held or in flight: direct again.
        assert!(apply_data(&shared, b"fifth"));
    }
}
