//! The session's writer: drains control frames, then DATA and FIN frames, into the transport.
//! Whoever queued a frame writes it at once when the writer is idle (no task hand-off); the
//! writer task takes over when the transport is busy or pushes back.
//!
//! The writer state sits behind a `std::sync::Mutex` that is only ever taken with `try_lock`
//! by stream handles, and held for one synchronous, non-blocking pass over the transport (a
//! `poll`, never across an `.await`). A handle that finds it taken, or a pass that cannot finish
//! (the socket is full), wakes the writer task, which keeps polling with its own waker.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use futures::{Sink, SinkExt};
use tether_proto::Frame;
use tokio::sync::mpsc;

use crate::state::{Shared, State};
use crate::transport::TransportError;

/// How long the writer may spend flushing its last frames and closing the transport.
pub(crate) const CLOSE_FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// The transport's sending half, as the session driver splits it.
pub(crate) type FrameSink =
    futures::stream::SplitSink<Box<dyn crate::session::FrameTransportObj>, Frame>;

/// What a pass needs between calls: the sink, the data queue, and frames taken from the queues
/// but not yet accepted by the sink.
pub(crate) struct WriterCore {
    sink: FrameSink,
    data_rx: mpsc::Receiver<Frame>,
    /// Control frames swapped out of the shared queue, sent before anything else.
    control: VecDeque<Frame>,
    /// A DATA or FIN frame already accounted for, sent after `control`.
    data: Option<Frame>,
    /// Frames were handed to the sink since its last completed flush.
    unflushed: bool,
    /// The last pass ended in `Pending`: the transport holds the writer task's waker until a
    /// pass completes, so handles must not poll it (with their no-op waker they would
    /// replace the task's registration, and nobody would be woken).
    busy: bool,
}

/// The slot the session's writer lives in (`None` before the driver runs and after it ends).
pub(crate) type WriterSlot = Mutex<Option<WriterCore>>;

impl WriterCore {
    pub(crate) fn new(sink: FrameSink, data_rx: mpsc::Receiver<Frame>) -> Self {
        Self {
            sink,
            data_rx,
            control: VecDeque::new(),
            data: None,
            unflushed: false,
            busy: false,
        }
    }

    /// Writes every queued frame and flushes. `Ready(Ok)` means nothing is left queued as of
    /// this pass; `Pending` means the transport pushed back (`cx` is registered with it).
    pub(crate) fn poll_drain(
        &mut self,
        shared: &Shared,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), TransportError>> {
        let result = self.poll_pass(shared, cx);
        self.busy = result.is_pending();
        result
    }

    fn poll_pass(
        &mut self,
        shared: &Shared,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), TransportError>> {
        loop {
            if shared.cancel.is_cancelled() {
                // The session is ending: the writer task sends what control frames remain.
                return Poll::Ready(Ok(()));
            }
            if let Some(frame) = self.control.pop_front() {
                ready!(self.send(cx, frame, true))?;
                continue;
            }
            if let Some(frame) = self.data.take() {
                ready!(self.send(cx, frame, false))?;
                continue;
            }
            let mut state = shared.lock();
            if !state.control.is_empty() {
                std::mem::swap(&mut self.control, &mut state.control);
                continue;
            }
            match self.data_rx.try_recv() {
                Ok(frame) => {
                    // Anything queued before this frame was produced (an OPEN_OK for its
                    // stream) is in the control queue by now, and goes out first.
                    std::mem::swap(&mut self.control, &mut state.control);
                    self.data = take_data_frame(shared, &mut state, frame);
                }
                Err(_) => break,
            }
        }
        if self.unflushed {
            ready!(Pin::new(&mut self.sink).poll_flush(cx))?;
            self.unflushed = false;
        }
        Poll::Ready(Ok(()))
    }

    /// Hands `frame` to the sink; if the sink is not ready, puts the frame back where it came
    /// from (the front of the control queue, or the data slot) and returns `Pending`.
    fn send(
        &mut self,
        cx: &mut Context<'_>,
        frame: Frame,
        control: bool,
    ) -> Poll<Result<(), TransportError>> {
        match Pin::new(&mut self.sink).poll_ready(cx) {
            Poll::Pending => {
                if control {
                    self.control.push_front(frame);
                } else {
                    self.data = Some(frame);
                }
                Poll::Pending
            }
            Poll::Ready(Err(err)) => Poll::Ready(Err(err)),
            Poll::Ready(Ok(())) => {
                self.unflushed = true;
                Poll::Ready(Pin::new(&mut self.sink).start_send(frame))
            }
        }
    }
}

impl Shared {
    /// Gets frames just queued on their way: written here and now if the writer is idle and the
    /// transport takes them without waiting, otherwise by the writer task. Call with the state
    /// lock released.
    pub(crate) fn kick_writer(&self) {
        if let Ok(mut slot) = self.writer.try_lock()
            && let Some(core) = slot.as_mut()
            && !core.busy
        {
            // A pass that finishes registers no waker anywhere; one that cannot finish leaves
            // the rest to the writer task, which polls again with its own waker.
            let mut cx = Context::from_waker(Waker::noop());
            match core.poll_drain(self, &mut cx) {
                Poll::Ready(Ok(())) => return,
                Poll::Ready(Err(err)) => {
                    drop(slot);
                    self.finish(err.into());
                    return;
                }
                // `busy` is set now: the writer task takes over with its own waker.
                Poll::Pending => {}
            }
        }
        self.writer_notify.notify_one();
    }
}

/// The writer task: drains whenever it is notified (frames queued while a pass could not run
/// inline, or the transport became ready), until the session ends; then sends the remaining
/// control frames (GOAWAY, RSTs) and closes the transport.
pub(crate) async fn write_loop(shared: Arc<Shared>) {
    loop {
        if shared.cancel.is_cancelled() {
            break;
        }
        let result = std::future::poll_fn(|cx| {
            let mut slot = shared.writer.lock().unwrap_or_else(|p| p.into_inner());
            match slot.as_mut() {
                Some(core) => core.poll_drain(&shared, cx),
                None => Poll::Ready(Ok(())),
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
    let Some(mut core) = core else {
        return;
    };
    let _ = tokio::time::timeout(CLOSE_FLUSH_TIMEOUT, async {
        let mut control: Vec<Frame> = core.control.drain(..).collect();
        control.extend(shared.lock().control.drain(..));
        for frame in control {
            core.sink.feed(frame).await?;
        }
        core.sink.close().await
    })
    .await;
}

/// Accounts for a DATA or FIN leaving the queue; drops it if its stream was reset meanwhile.
/// A RST it queues goes out after `frame` (the caller swapped the control queue out already).
fn take_data_frame(shared: &Shared, state: &mut State, frame: Frame) -> Option<Frame> {
    let id = frame.stream();
    let slot = state.streams.get_mut(&id)?;
    slot.queued = slot.queued.saturating_sub(1);
    let keep = slot.failure.is_none() || slot.rst_after_drain.is_some();
    if slot.queued == 0
        && let Some(code) = slot.rst_after_drain.take()
    {
        // Queued behind this frame, so the peer sees the data, then the reset.
        let rst = Frame::Rst {
            stream: id,
            code,
            message: String::new(),
        };
        // The writer itself runs this, and drains the control queue next.
        state.push_control(rst);
    }
    state.maybe_remove(id, &shared.metrics);
    keep.then_some(frame)
}
