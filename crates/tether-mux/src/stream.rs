//! `MuxStream`: one tunneled stream as `AsyncRead + AsyncWrite`, whose drop releases its state
//! and tells the peer.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use tether_proto::{Frame, ResetCode, StreamId};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::PollSender;

use crate::direct::Sink;
use crate::state::{Shared, StreamFailure, Wakers};

/// Detaches a stream's direct-delivery socket (see [`MuxStream::attach_sink`]).
pub(crate) struct SinkHandle {
    shared: Arc<Shared>,
    id: StreamId,
}

impl SinkHandle {
    /// Detaches the socket; returns the bytes the reader delivered into it since the last
    /// call. The reader starts no write into the socket after this; one already started (only
    /// possible when the pipe was abandoned: a pipe finishes only after the peer's FIN, which
    /// the reader applies after its writes) completes into the socket, which stays open until
    /// then because the reader holds a reference to it.
    pub(crate) fn detach_sink(&self) -> u64 {
        let mut state = self.shared.lock();
        match state.streams.get_mut(&self.id) {
            Some(slot) => {
                slot.sink = None;
                std::mem::take(&mut slot.direct_bytes)
            }
            None => 0,
        }
    }
}

/// A stream of a session. Reading gives the peer's bytes, then EOF after its FIN, or an error
/// after a reset or the loss of the session (never a clean EOF then). `shutdown()` sends FIN
/// after every byte written before it. Dropping the handle before both directions finished
/// resets the stream.
pub struct MuxStream {
    shared: Arc<Shared>,
    id: StreamId,
    sender: PollSender<Frame>,
}

impl std::fmt::Debug for MuxStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MuxStream").field("id", &self.id).finish()
    }
}

impl MuxStream {
    pub(crate) fn new(shared: Arc<Shared>, id: StreamId) -> Self {
        let sender = PollSender::new(shared.data_tx.clone());
        Self { shared, id, sender }
    }

    /// The stream id on the wire.
    pub fn id(&self) -> StreamId {
        self.id
    }

    /// Aborts both directions: the peer sees an error, never EOF.
    pub fn reset(&mut self, code: ResetCode, message: &str) {
        let mut wakers = Wakers::default();
        {
            let mut state = self.shared.lock();
            let Some(slot) = state.streams.get_mut(&self.id) else {
                return;
            };
            if slot.failure.is_some() {
                return;
            }
            slot.fail(
                StreamFailure {
                    kind: io::ErrorKind::ConnectionReset,
                    message: format!("stream reset locally ({}): {message}", code.label()),
                    reason: crate::CloseReason::Reset,
                },
                &mut wakers,
            );
            state.push_control(Frame::Rst {
                stream: self.id,
                code,
                message: message.to_owned(),
            });
        }
        wakers.wake_all();
        self.shared.kick_writer();
    }

    /// Bytes received for this stream and not yet read (at most the configured window).
    #[doc(hidden)]
    pub fn debug_buffered(&self) -> usize {
        let state = self.shared.lock();
        state
            .streams
            .get(&self.id)
            .map_or(0, |slot| slot.recv_buf.len())
    }

    fn closed_error(&self) -> io::Error {
        io::Error::new(io::ErrorKind::ConnectionAborted, "tunnel session closed")
    }
}

impl MuxStream {
    /// Shared body of the reads: EOF, failure, or `take` applied to the buffered bytes (which
    /// are not empty then), with the window credit granted back for what it took. `holds`:
    /// the caller keeps what it took unwritten until its next read (the pump), so no direct
    /// delivery may happen meanwhile.
    fn poll_consume<R>(
        &mut self,
        cx: &mut Context<'_>,
        take: impl FnOnce(&mut crate::state::RecvBuf) -> (R, usize),
        holds: bool,
    ) -> Poll<io::Result<Option<R>>> {
        let mut notify_writer = false;
        let result = {
            let mut state = self.shared.lock();
            let Some(slot) = state.streams.get_mut(&self.id) else {
                return Poll::Ready(Err(self.closed_error()));
            };
            // Whatever the pump took before was written: the reader may deliver directly again.
            slot.pump_holds = false;
            if let Some(failure) = &slot.failure
                && failure.kind == io::ErrorKind::ConnectionReset
            {
                // A reset discards what was buffered, as TCP does.
                return Poll::Ready(Err(failure.to_io()));
            }
            if slot.recv_buf.is_empty() {
                if slot.recv_fin {
                    // Every byte up to the peer's FIN was delivered; losing the session after
                    // that does not make this direction incomplete.
                    Poll::Ready(Ok(None))
                } else if let Some(failure) = &slot.failure {
                    Poll::Ready(Err(failure.to_io()))
                } else {
                    slot.read_waker = Some(cx.waker().clone());
                    Poll::Pending
                }
            } else {
                let (taken, copied) = take(&mut slot.recv_buf);
                // The caller holds the bytes until it asks again: a direct write by the
                // session's reader before then would overtake them.
                slot.pump_holds = holds;
                if let Some(window) = slot.consumed(self.id, copied, &self.shared.config) {
                    state.push_control(window);
                    notify_writer = true;
                }
                Poll::Ready(Ok(Some(taken)))
            }
        };
        if notify_writer {
            self.shared.kick_writer();
        }
        result
    }

    /// Reads up to `max` bytes as they were received, without copying them. `None` is the end
    /// of the stream; errors are as for `poll_read`.
    pub fn poll_read_chunk(
        &mut self,
        cx: &mut Context<'_>,
        max: usize,
    ) -> Poll<io::Result<Option<Bytes>>> {
        self.poll_consume(
            cx,
            |buf| {
                let chunk = buf.take_chunk(max.max(1));
                let n = chunk.len();
                (chunk, n)
            },
            true,
        )
    }

    /// Lets the session's reader write this stream's received bytes into `sink` itself while
    /// nothing is buffered or held (see [`crate::direct`]). The handle detaches it.
    pub(crate) fn attach_sink(&self, sink: Arc<Sink>) -> SinkHandle {
        if let Some(slot) = self.shared.lock().streams.get_mut(&self.id) {
            slot.sink = Some(sink);
        }
        SinkHandle {
            shared: self.shared.clone(),
            id: self.id,
        }
    }

    /// Writes a prefix of `data` (at most one DATA frame) by taking it out of `data`, without
    /// copying it. Returns how many bytes were taken; errors are as for `poll_write`.
    pub fn poll_write_chunk(
        &mut self,
        cx: &mut Context<'_>,
        data: &mut Bytes,
    ) -> Poll<io::Result<usize>> {
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let n = ready!(self.poll_reserve_send(cx, data.len()))?;
        let payload = data.split_to(n);
        Poll::Ready(self.send_reserved(payload))
    }

    /// Waits for send credit and a slot in the data queue; returns how many of `want` bytes
    /// may go in the next DATA frame. The caller must then call [`Self::send_reserved`].
    fn poll_reserve_send(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<usize>> {
        // Check for credit first so that a stream without credit does not hold a queue slot.
        {
            let mut state = self.shared.lock();
            let Some(slot) = state.streams.get_mut(&self.id) else {
                return Poll::Ready(Err(self.closed_error()));
            };
            if let Some(failure) = &slot.failure {
                return Poll::Ready(Err(failure.to_io()));
            }
            if slot.send_fin {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "write after shutdown",
                )));
            }
            if slot.send_credit == 0 {
                slot.write_waker = Some(cx.waker().clone());
                return Poll::Pending;
            }
        }
        if ready!(self.sender.poll_reserve(cx)).is_err() {
            return Poll::Ready(Err(self.closed_error()));
        }
        let mut state = self.shared.lock();
        let Some(slot) = state.streams.get_mut(&self.id) else {
            self.sender.abort_send();
            return Poll::Ready(Err(self.closed_error()));
        };
        if let Some(failure) = &slot.failure {
            self.sender.abort_send();
            return Poll::Ready(Err(failure.to_io()));
        }
        if slot.send_credit == 0 {
            self.sender.abort_send();
            slot.write_waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let n = want
            .min(slot.send_credit.min(usize::MAX as u64) as usize)
            .min(self.shared.config.max_data as usize);
        slot.send_credit -= n as u64;
        slot.queued += 1;
        Poll::Ready(Ok(n))
    }

    /// Queues `payload` (as long as [`Self::poll_reserve_send`] allowed) as a DATA frame.
    fn send_reserved(&mut self, payload: Bytes) -> io::Result<usize> {
        let n = payload.len();
        let frame = Frame::Data {
            stream: self.id,
            payload,
        };
        if self.sender.send_item(frame).is_err() {
            return Err(self.closed_error());
        }
        self.shared.bytes_tx.fetch_add(n as u64, Ordering::Relaxed);
        self.shared.metrics.bytes_tx.inc_by(n as u64);
        self.shared.kick_writer();
        Ok(n)
    }
}

impl AsyncRead for MuxStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        // `None` (end of stream) leaves `buf` unfilled, which is how EOF reads.
        self.get_mut()
            .poll_consume(cx, |recv| ((), recv.read_into(buf)), false)
            .map_ok(|_| ())
    }
}

impl AsyncWrite for MuxStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let n = ready!(this.poll_reserve_send(cx, buf.len()))?;
        Poll::Ready(this.send_reserved(Bytes::copy_from_slice(&buf[..n])))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Written bytes are already queued for the session's writer, in order.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        {
            let state = this.shared.lock();
            let Some(slot) = state.streams.get(&this.id) else {
                return Poll::Ready(Err(this.closed_error()));
            };
            if let Some(failure) = &slot.failure {
                return Poll::Ready(Err(failure.to_io()));
            }
            if slot.send_fin {
                return Poll::Ready(Ok(()));
            }
        }
        if ready!(this.sender.poll_reserve(cx)).is_err() {
            return Poll::Ready(Err(this.closed_error()));
        }
        {
            let mut state = this.shared.lock();
            let Some(slot) = state.streams.get_mut(&this.id) else {
                this.sender.abort_send();
                return Poll::Ready(Err(this.closed_error()));
            };
            if let Some(failure) = &slot.failure {
                this.sender.abort_send();
                return Poll::Ready(Err(failure.to_io()));
            }
            slot.send_fin = true;
            slot.queued += 1;
        }
        if this
            .sender
            .send_item(Frame::Fin { stream: this.id })
            .is_err()
        {
            return Poll::Ready(Err(this.closed_error()));
        }
        this.shared.kick_writer();
        Poll::Ready(Ok(()))
    }
}

impl Drop for MuxStream {
    fn drop(&mut self) {
        let mut wakers = Wakers::default();
        {
            let mut state = self.shared.lock();
            let Some(slot) = state.streams.get_mut(&self.id) else {
                return;
            };
            slot.handle_dropped = true;
            let finished = slot.send_fin && slot.recv_fin;
            if slot.failure.is_none() && !finished && state_allows_rst(&state) {
                let Some(slot) = state.streams.get_mut(&self.id) else {
                    return;
                };
                slot.fail(
                    StreamFailure {
                        kind: io::ErrorKind::ConnectionReset,
                        message: "stream handle dropped".into(),
                        reason: crate::CloseReason::Reset,
                    },
                    &mut wakers,
                );
                if slot.queued == 0 {
                    state.push_control(Frame::Rst {
                        stream: self.id,
                        code: ResetCode::Cancelled,
                        message: String::new(),
                    });
                } else {
                    // Let the DATA (and FIN) already queued go first.
                    slot.rst_after_drain = Some(ResetCode::Cancelled);
                }
            }
            state.maybe_remove(self.id, &self.shared.metrics);
        }
        wakers.wake_all();
        self.shared.kick_writer();
    }
}

fn state_allows_rst(state: &crate::state::State) -> bool {
    state.end.is_none()
}
