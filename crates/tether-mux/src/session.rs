//! `Session` (the cloneable handle: open, ping, goaway, close) and `SessionDriver` (the reader,
//! writer and timers that move frames between the transport and the streams).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Buf;
use futures::StreamExt;
use tether_proto::{Frame, GoAwayCode, OpenErrorCode, TargetAddr};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::DropGuard;
use tracing::{debug, trace};

use crate::config::{MuxConfig, Role};
use crate::error::{OpenError, SessionEnd};
use crate::incoming::{Incoming, PendingOpen};
use crate::metrics::MuxMetrics;
use crate::state::{Applied, Phase, Shared, Slot, Wakers, new_shared};
use crate::stream::MuxStream;
use crate::transport::FrameTransport;
use crate::writer::{CLOSE_FLUSH_TIMEOUT, WriterCore, write_loop};

/// A handle to a session. Clones share it; when the last clone is dropped the session ends and
/// every stream on it fails.
#[derive(Clone)]
pub struct Session {
    inner: Arc<Handle>,
}

struct Handle {
    shared: Arc<Shared>,
    _close_on_drop: DropGuard,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").finish_non_exhaustive()
    }
}

/// Counters of one session.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionStats {
    /// Streams in the table (open, opening, or finishing).
    pub streams: usize,
    /// Payload bytes received.
    pub bytes_rx: u64,
    /// Payload bytes sent.
    pub bytes_tx: u64,
    /// The last measured round-trip time.
    pub rtt: Option<Duration>,
}

/// The future that runs a session. Spawn it on the owner's task tracker; it ends when the
/// session ends, and returns why.
#[must_use = "a session does nothing unless its driver runs"]
pub struct SessionDriver {
    shared: Arc<Shared>,
    transport: Box<dyn FrameTransportObj>,
    data_rx: mpsc::Receiver<tether_proto::Frame>,
    incoming_tx: mpsc::Sender<PendingOpen>,
}

/// Object-safe view of a transport so the driver is not generic.
pub(crate) trait FrameTransportObj:
    futures::Stream<Item = Result<Frame, crate::TransportError>>
    + futures::Sink<Frame, Error = crate::TransportError>
    + Send
    + Unpin
{
}

impl<T: FrameTransport> FrameTransportObj for T {}

impl Session {
    /// Creates a session over `transport`. Returns the handle, the queue of streams the peer
    /// opens, and the driver future that must be spawned.
    pub fn new<T: FrameTransport>(
        transport: T,
        role: Role,
        config: MuxConfig,
        metrics: MuxMetrics,
    ) -> (Session, Incoming, SessionDriver) {
        let backlog = config.accept_backlog.max(1);
        let (shared, data_rx) = new_shared(role, config, metrics);
        let (incoming_tx, incoming_rx) = mpsc::channel(backlog);
        let session = Session {
            inner: Arc::new(Handle {
                shared: shared.clone(),
                _close_on_drop: shared.cancel.clone().drop_guard(),
            }),
        };
        let driver = SessionDriver {
            shared,
            transport: Box::new(transport),
            data_rx,
            incoming_tx,
        };
        (session, Incoming { rx: incoming_rx }, driver)
    }

    fn shared(&self) -> &Arc<Shared> {
        &self.inner.shared
    }

    /// Opens a stream to `target` on the far side, waiting for OPEN_OK.
    pub async fn open(&self, target: TargetAddr) -> Result<MuxStream, OpenError> {
        self.open_with_timeout(target, self.shared().config.dial_timeout)
            .await
    }

    /// Opens a stream, asking the far side to give up dialing after `dial_timeout`.
    pub async fn open_with_timeout(
        &self,
        target: TargetAddr,
        dial_timeout: Duration,
    ) -> Result<MuxStream, OpenError> {
        let shared = self.shared();
        let (reply_tx, reply_rx) = oneshot::channel();
        let id = {
            let mut state = shared.lock();
            if state.end.is_some() {
                return Err(OpenError::SessionClosed);
            }
            if state.local_goaway || state.peer_goaway.is_some() {
                return Err(OpenError::Draining);
            }
            if state.streams.len() >= shared.config.max_streams {
                return Err(OpenError::Limit);
            }
            let id = state.next_id;
            state.next_id += 2;
            state.streams.insert(
                id,
                Slot::new(Phase::Opening(Some(reply_tx)), shared.config.window, 0),
            );
            shared.metrics.stream_opened();
            state.push_control(Frame::Open {
                stream: id,
                window: shared.config.window,
                timeout_ms: u32::try_from(dial_timeout.as_millis()).unwrap_or(u32::MAX),
                target,
            });
            id
        };
        shared.kick_writer();
        // From here the guard owns the slot: any early return or cancellation resets it.
        let mut guard = OpenGuard {
            shared: shared.clone(),
            id,
            armed: true,
        };
        let wait = dial_timeout + shared.config.open_grace;
        match tokio::time::timeout(wait, reply_rx).await {
            Ok(Ok(Ok(()))) => {
                guard.armed = false;
                Ok(MuxStream::new(shared.clone(), id))
            }
            Ok(Ok(Err(err))) => Err(err),
            Ok(Err(_)) => Err(OpenError::SessionClosed),
            Err(_) => Err(OpenError::Timeout(wait)),
        }
    }

    /// Sends a PING and waits for its PONG; returns the round-trip time. The caller bounds the
    /// wait with its own timeout.
    pub async fn ping(&self) -> Result<Duration, OpenError> {
        let (tx, rx) = oneshot::channel();
        {
            let mut state = self.shared().lock();
            if state.end.is_some() {
                return Err(OpenError::SessionClosed);
            }
            state.send_ping(Some(tx));
        }
        self.shared().kick_writer();
        rx.await.map_err(|_| OpenError::SessionClosed)
    }

    /// Sends GOAWAY: this side takes no new streams; existing ones carry on.
    pub fn goaway(&self, code: GoAwayCode, message: &str) {
        {
            let mut state = self.shared().lock();
            if state.local_goaway || state.end.is_some() {
                return;
            }
            state.local_goaway = true;
            state.push_control(Frame::GoAway {
                code,
                message: message.to_owned(),
            });
        }
        self.shared().kick_writer();
    }

    /// Ends the session now: streams fail, the transport is closed.
    pub fn close(&self) {
        self.shared().finish(SessionEnd::Local);
    }

    /// Resolves once the session has ended.
    pub async fn closed(&self) {
        self.shared().cancel.cancelled().await;
    }

    /// Whether the session has ended.
    pub fn is_closed(&self) -> bool {
        self.shared().cancel.is_cancelled()
    }

    /// Why the session ended, once it has.
    pub fn end_reason(&self) -> Option<SessionEnd> {
        self.shared().ended()
    }

    /// The peer's GOAWAY, if it sent one.
    pub fn peer_goaway(&self) -> Option<(GoAwayCode, String)> {
        self.shared().lock().peer_goaway.clone()
    }

    /// Live counters.
    pub fn stats(&self) -> SessionStats {
        let shared = self.shared();
        let state = shared.lock();
        SessionStats {
            streams: state.streams.len(),
            bytes_rx: shared.bytes_rx.load(Ordering::Relaxed),
            bytes_tx: shared.bytes_tx.load(Ordering::Relaxed),
            rtt: state.rtt,
        }
    }

    /// How long ago the session was created.
    pub fn age(&self) -> Duration {
        self.shared().created.elapsed()
    }
}

/// Resets a stream whose open was abandoned (timeout, error, or the caller's future dropped).
struct OpenGuard {
    shared: Arc<Shared>,
    id: u64,
    armed: bool,
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut wakers = Wakers::default();
        {
            let mut state = self.shared.lock();
            let send_rst = state.end.is_none();
            if let Some(slot) = state.streams.get_mut(&self.id) {
                let answered = slot.failure.is_some();
                slot.handle_dropped = true;
                if !answered {
                    slot.fail(
                        crate::state::StreamFailure {
                            kind: std::io::ErrorKind::TimedOut,
                            message: "open abandoned".into(),
                            reason: crate::CloseReason::Refused,
                        },
                        &mut wakers,
                    );
                    if send_rst {
                        state.push_control(Frame::Rst {
                            stream: self.id,
                            code: tether_proto::ResetCode::Cancelled,
                            message: "open abandoned".into(),
                        });
                    }
                }
                state.maybe_remove(self.id, &self.shared.metrics);
            }
        }
        wakers.wake_all();
        self.shared.kick_writer();
    }
}

// === impl SessionDriver ===

impl SessionDriver {
    /// Runs the session until it ends; returns why.
    pub async fn run(self) -> SessionEnd {
        let SessionDriver {
            shared,
            transport,
            data_rx,
            incoming_tx,
        } = self;
        // If this future is dropped mid-way, the session still ends cleanly for its streams.
        let _finish_on_drop = FinishOnDrop(shared.clone());
        let (sink, stream) = transport.split();
        *shared.writer.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(WriterCore::new(sink, data_rx));
        let mut writer = AbortOnDrop(tokio::spawn(write_loop(shared.clone())));
        let reason = read_loop(&shared, stream, incoming_tx).await;
        shared.finish(reason);
        // The writer flushes its last frames and closes the transport; bounded, then aborted.
        let _ = tokio::time::timeout(
            CLOSE_FLUSH_TIMEOUT + Duration::from_millis(500),
            &mut writer.0,
        )
        .await;
        drop(writer);
        let end = shared.ended().unwrap_or(SessionEnd::Local);
        debug!(reason = %end, "session ended");
        end
    }
}

struct FinishOnDrop(Arc<Shared>);

impl Drop for FinishOnDrop {
    fn drop(&mut self) {
        self.0.finish(SessionEnd::Local);
    }
}

struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

type FrameSource = futures::stream::SplitStream<Box<dyn FrameTransportObj>>;

async fn read_loop(
    shared: &Arc<Shared>,
    mut source: FrameSource,
    incoming_tx: mpsc::Sender<PendingOpen>,
) -> SessionEnd {
    let config = &shared.config;
    let check_every = config
        .ping_interval
        .min(config.idle_timeout / 4)
        .max(Duration::from_millis(10));
    let mut check = tokio::time::interval_at(Instant::now() + check_every, check_every);
    check.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last_rx = Instant::now();
    let mut last_ping = Instant::now();
    let mut last_sync = Instant::now();
    // Its own deadline, not the keepalive tick: a tick of `idle_timeout / 4` would let a dead
    // peer live up to a quarter longer. Armed lazily: when it fires early (frames arrived
    // since), it is moved to the last frame plus `idle_timeout`, so a busy session pays one
    // timer per idle period, not one per frame.
    let idle = tokio::time::sleep_until(last_rx + config.idle_timeout);
    tokio::pin!(idle);
    loop {
        tokio::select! {
            biased;
            _ = shared.cancel.cancelled() => {
                return shared.ended().unwrap_or(SessionEnd::Local);
            }
            _ = &mut idle => {
                if Instant::now().duration_since(last_rx) >= config.idle_timeout {
                    return SessionEnd::IdleTimeout;
                }
                idle.as_mut().reset(last_rx + config.idle_timeout);
            }
            // The timer goes before the transport so that a peer that never pauses cannot
            // starve keepalive and SYNC.
            _ = check.tick() => {
                let now = Instant::now();
                if now.duration_since(last_rx) >= config.idle_timeout {
                    return SessionEnd::IdleTimeout;
                }
                let mut queued = false;
                {
                    let mut state = shared.lock();
                    if now.duration_since(last_ping) >= config.ping_interval {
                        last_ping = now;
                        state.send_ping(None);
                        queued = true;
                    }
                    if let Some(every) = config.sync_interval
                        && now.duration_since(last_sync) >= every
                    {
                        last_sync = now;
                        let sync = state.sync_frame();
                        if tether_proto::codec::encoded_len(&sync) <= config.limits().max_message_len() {
                            state.push_control(sync);
                            queued = true;
                        }
                    }
                }
                if queued {
                    shared.kick_writer();
                }
            }
            item = source.next() => {
                let frame = match item {
                    None => return SessionEnd::PeerClosed,
                    Some(Ok(frame)) => frame,
                    Some(Err(crate::TransportError::Malformed(err))) => {
                        last_rx = Instant::now();
                        let mut wakers = Wakers::default();
                        let result = shared.lock().apply_malformed(&err, shared, &mut wakers);
                        wakers.wake_all();
                        shared.kick_writer();
                        if let Err(end) = result {
                            return end;
                        }
                        continue;
                    }
                    Some(Err(err)) => return err.into(),
                };
                last_rx = Instant::now();
                trace!(?frame, "frame received");
                let mut wakers = Wakers::default();
                let (applied, queued) = {
                    let mut state = shared.lock();
                    let before = state.control.len();
                    let applied = state.apply(frame, shared, &mut wakers);
                    (applied, state.control.len() != before)
                };
                wakers.wake_all();
                // Most frames (DATA above all) queue nothing: leave the writer asleep then.
                if queued {
                    shared.kick_writer();
                }
                match applied {
                    Err(end) => return end,
                    Ok(Applied::Done) => {}
                    Ok(Applied::Deliver { stream, sink, mut payload }) => {
                        // One non-blocking write: what does not fit is left to the stream's
                        // consumer (and a write error is kept for it to report), so the
                        // reader never waits here.
                        let written = sink.try_deliver(&payload);
                        payload.advance(written);
                        let mut wakers = Wakers::default();
                        let queued = {
                            let mut state = shared.lock();
                            let before = state.control.len();
                            state.delivered(stream, written, payload, config, &mut wakers);
                            state.control.len() != before
                        };
                        wakers.wake_all();
                        if queued {
                            shared.kick_writer();
                        }
                    }
                    Ok(Applied::Incoming { stream, target, timeout_ms }) => {
                        let pending = PendingOpen::new(shared.clone(), stream, target, timeout_ms);
                        match incoming_tx.try_send(pending) {
                            Ok(()) => {}
                            Err(mpsc::error::TrySendError::Full(pending)) => {
                                pending.reject(OpenErrorCode::Limit, "accept backlog full");
                            }
                            Err(mpsc::error::TrySendError::Closed(pending)) => {
                                pending.reject(
                                    OpenErrorCode::Unsupported,
                                    "this side does not accept streams",
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}
