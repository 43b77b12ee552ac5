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
use std::task::{Context, Poll, ready};
use std::time::Duration;

use futures::{Sink, SinkExt};
use tether_proto::Frame;
use tokio::sync::mpsc;

use crate::transport::{FrameTransportObj, TransportError};

/// How long the writer may spend flushing its last frames and closing the transport.
pub(crate) const CLOSE_FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// The transport's sending half, as the session driver splits it.
pub(crate) type FrameSink = futures::stream::SplitSink<Box<dyn FrameTransportObj>, Frame>;

/// Where the writer takes its frames from (the session's shared state).
pub(crate) trait FrameSource {
    /// The session is ending: stop the normal passes.
    fn closing(&self) -> bool;
    /// Moves queued control frames to the back of `control`, or, with none queued, takes the
    /// next DATA or FIN frame from `data_rx` (moving any control frame queued before it to
    /// `control` first).
    fn next_frames(
        &self,
        control: &mut VecDeque<Frame>,
        data_rx: &mut mpsc::Receiver<Frame>,
    ) -> Next;
    /// The control frames left when the session ends.
    fn last_control(&self) -> Vec<Frame>;
}

/// What [`FrameSource::next_frames`] found.
pub(crate) enum Next {
    /// Control frames were moved, or a DATA frame of a reset stream was dropped: look again.
    Again,
    /// The next DATA or FIN frame, to send after the control frames.
    Data(Frame),
    /// Nothing is queued.
    Nothing,
}

/// What a pass needs between calls: the sink, the data queue, and frames taken from the queues
/// but not yet accepted by the sink.
pub(crate) struct WriterCore {
    sink: FrameSink,
    data_rx: mpsc::Receiver<Frame>,
    /// Control frames taken from the shared queue, sent before anything else.
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

    pub(crate) fn is_busy(&self) -> bool {
        self.busy
    }

    /// Writes every queued frame and flushes. `Ready(Ok)` means nothing is left queued as of
    /// this pass; `Pending` means the transport pushed back (`cx` is registered with it).
    pub(crate) fn poll_drain(
        &mut self,
        source: &impl FrameSource,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), TransportError>> {
        let result = self.poll_pass(source, cx);
        self.busy = result.is_pending();
        result
    }

    fn poll_pass(
        &mut self,
        source: &impl FrameSource,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), TransportError>> {
        loop {
            if source.closing() {
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
            match source.next_frames(&mut self.control, &mut self.data_rx) {
                Next::Again => {}
                Next::Data(frame) => self.data = Some(frame),
                Next::Nothing => break,
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

    /// The session ended: sends the control frames left (GOAWAY, RSTs) and closes the
    /// transport, within [`CLOSE_FLUSH_TIMEOUT`].
    pub(crate) async fn close(mut self, source: &impl FrameSource) {
        let _ = tokio::time::timeout(CLOSE_FLUSH_TIMEOUT, async {
            let mut control: Vec<Frame> = self.control.drain(..).collect();
            control.extend(source.last_control());
            for frame in control {
                self.sink.feed(frame).await?;
            }
            self.sink.close().await
        })
        .await;
    }
}
