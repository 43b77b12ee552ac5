//! `SessionDriver`: the reader, the writer task and the timers that move frames between the
//! transport and the core, and deliver what the core asks for (received bytes into attached
//! sockets, the peer's opens to the application).

use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes};
use futures::StreamExt;
use tether_proto::{Frame, OpenErrorCode, StreamId};
use tokio::sync::mpsc;
use tracing::{debug, trace};

use crate::core::Applied;
use crate::error::SessionEnd;
use crate::incoming::PendingOpen;
use crate::io::DeliverSink;
use crate::shared::Shared;
use crate::transport::{FrameTransportObj, TransportError};
use crate::writer::{CLOSE_FLUSH_TIMEOUT, WriterCore};

/// The future that runs a session. Spawn it on the owner's task tracker; it ends when the
/// session ends, and returns why.
#[must_use = "a session does nothing unless its driver runs"]
pub struct SessionDriver {
    shared: Arc<Shared>,
    transport: Box<dyn FrameTransportObj>,
    data_rx: mpsc::Receiver<Frame>,
    incoming_tx: mpsc::Sender<PendingOpen>,
}

impl SessionDriver {
    pub(crate) fn new(
        shared: Arc<Shared>,
        transport: Box<dyn FrameTransportObj>,
        data_rx: mpsc::Receiver<Frame>,
        incoming_tx: mpsc::Sender<PendingOpen>,
    ) -> Self {
        Self {
            shared,
            transport,
            data_rx,
            incoming_tx,
        }
    }

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
        let peer_may_read = reason.peer_may_read();
        shared.finish(reason);
        // The writer flushes its last frames and closes the transport; bounded, then aborted.
        // A peer that fell silent reads nothing more: its session ends at once rather than
        // waiting on a full socket (a blackholed link).
        if peer_may_read {
            let _ = tokio::time::timeout(
                CLOSE_FLUSH_TIMEOUT + Duration::from_millis(500),
                &mut writer.0,
            )
            .await;
        }
        drop(writer);
        // An aborted writer leaves its half of the transport behind: dropping it here closes
        // the connection even while handles keep the session's state alive.
        let unclosed = shared
            .writer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        drop(unclosed);
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

type FrameStream = futures::stream::SplitStream<Box<dyn FrameTransportObj>>;

/// What the reader does after the core applied a frame.
enum Then {
    Nothing,
    Deliver(StreamId, Arc<dyn DeliverSink>, Bytes),
    Incoming(PendingOpen),
}

async fn read_loop(
    shared: &Arc<Shared>,
    mut source: FrameStream,
    incoming_tx: mpsc::Sender<PendingOpen>,
) -> SessionEnd {
    // One timer for the core's deadlines (idle, PING, SYNC). Frames move the idle deadline
    // only later, so it is re-armed when it fires, not per frame: a busy session pays one
    // timer per period.
    let timer = tokio::time::sleep_until(shared.instant(shared.read(|conn| conn.poll_timeout())));
    tokio::pin!(timer);
    loop {
        tokio::select! {
            biased;
            _ = shared.cancel.cancelled() => {
                return shared.ended().unwrap_or(SessionEnd::Local);
            }
            // The timer goes before the transport so that a peer that never pauses cannot
            // starve keepalive, SYNC and the idle check.
            _ = &mut timer => {
                let now = shared.now();
                let next = shared.act(|conn, _| {
                    conn.handle_timeout(now).map(|()| conn.poll_timeout())
                });
                match next {
                    Ok(next) => timer.as_mut().reset(shared.instant(next)),
                    Err(end) => return end,
                }
            }
            item = source.next() => {
                let frame = match item {
                    None => return SessionEnd::PeerClosed,
                    Some(Ok(frame)) => frame,
                    Some(Err(TransportError::Malformed(err))) => {
                        let now = shared.now();
                        if let Err(end) = shared.act(|conn, _| conn.handle_malformed(&err, now)) {
                            return end;
                        }
                        continue;
                    }
                    Some(Err(err)) => return err.into(),
                };
                trace!(?frame, "frame received");
                match apply(shared, frame) {
                    Err(end) => return end,
                    Ok(Then::Nothing) => {}
                    Ok(Then::Deliver(stream, sink, payload)) => deliver(shared, stream, &*sink, payload),
                    Ok(Then::Incoming(pending)) => hand_over(&incoming_tx, pending),
                }
            }
        }
    }
}

/// Applies one received frame to the core.
fn apply(shared: &Arc<Shared>, frame: Frame) -> Result<Then, SessionEnd> {
    let now = shared.now();
    shared.act(|conn, waiters| {
        Ok(match conn.handle_frame(frame, now)? {
            Applied::Done => Then::Nothing,
            Applied::Deliver { stream, payload } => match waiters.sink(stream) {
                Some(sink) => Then::Deliver(stream, sink, payload),
                // The core and the shell attach and detach together, under the lock; should
                // they ever disagree, the payload is buffered for the stream's consumer.
                None => {
                    conn.delivered(stream, 0, payload, now);
                    Then::Nothing
                }
            },
            Applied::Incoming {
                stream,
                target,
                timeout_ms,
            } => Then::Incoming(PendingOpen::new(shared.clone(), stream, target, timeout_ms)),
        })
    })
}

/// One non-blocking write into the stream's socket: what does not fit is left to the stream's
/// consumer (and a write error is kept for it to report), so the reader never waits here.
fn deliver(shared: &Shared, stream: StreamId, sink: &dyn DeliverSink, mut payload: Bytes) {
    let written = sink.try_deliver(&payload);
    payload.advance(written);
    let now = shared.now();
    shared.act(|conn, _| conn.delivered(stream, written, payload, now));
}

/// Hands the peer's open to the application, or refuses it when nobody takes it.
fn hand_over(incoming_tx: &mpsc::Sender<PendingOpen>, pending: PendingOpen) {
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

/// The writer task: drains whenever it is notified (frames queued while a pass could not run
/// inline, or the transport became ready), until the session ends; then sends the remaining
/// control frames (GOAWAY, RSTs) and closes the transport.
async fn write_loop(shared: Arc<Shared>) {
    loop {
        if shared.cancel.is_cancelled() {
            break;
        }
        let result = std::future::poll_fn(|cx| {
            let mut slot = shared.writer.lock().unwrap_or_else(|p| p.into_inner());
            match slot.as_mut() {
                Some(core) => core.poll_drain(&*shared, cx),
                None => std::task::Poll::Ready(Ok(())),
            }
        });
        let result = tokio::select! {
            biased;
            _ = shared.cancel.cancelled() => break,
            result = result => result,
        };
        if let Err(err) = result {
            shared.finish(err.into());
            return;
        }
        tokio::select! {
            biased;
            _ = shared.cancel.cancelled() => break,
            _ = shared.writer_notify.notified() => {}
        }
    }
    let core = shared
        .writer
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    if let Some(core) = core {
        core.close(&*shared).await;
    }
}
