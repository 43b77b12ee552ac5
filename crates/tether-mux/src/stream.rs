//! `MuxStream`: one tunneled stream as `AsyncRead + AsyncWrite`, whose drop releases its state
//! and tells the peer. A thin caller of the core through [`Shared::act`].

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use tether_proto::{Frame, ResetCode, StreamId};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::PollSender;

use crate::core::{ReadTarget, RecvBuf};
use crate::io::DeliverSink;
use crate::shared::Shared;

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
        self.shared.act(|conn, waiters| {
            waiters.set_sink(self.id, None);
            conn.detach_sink(self.id)
        })
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

/// The application's read buffer as the core's copy target.
struct ReadBufTarget<'a, 'b>(&'a mut ReadBuf<'b>);

impl ReadTarget for ReadBufTarget<'_, '_> {
    fn remaining(&self) -> usize {
        self.0.remaining()
    }

    fn put_slice(&mut self, bytes: &[u8]) {
        self.0.put_slice(bytes);
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
        self.shared
            .act(|conn, _| conn.reset(self.id, code, message));
    }

    /// Bytes received for this stream and not yet read (at most the configured window).
    #[doc(hidden)]
    pub fn debug_buffered(&self) -> usize {
        self.shared.read(|conn| conn.buffered(self.id))
    }

    fn closed_error(&self) -> io::Error {
        io::Error::new(io::ErrorKind::ConnectionAborted, "tunnel session closed")
    }

    /// Shared body of the reads (see [`crate::core::Conn::consume`]); registers the task's
    /// waker when nothing is there yet.
    fn poll_consume<R>(
        &mut self,
        cx: &mut Context<'_>,
        take: impl FnOnce(&mut RecvBuf) -> (R, usize),
        holds: bool,
    ) -> Poll<io::Result<Option<R>>> {
        let id = self.id;
        let now = self.shared.now();
        self.shared.act(|conn, waiters| {
            let result = conn.consume(id, take, holds, now);
            if result.is_pending() {
                waiters.wait_read(id, cx.waker());
            }
            result
        })
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
    pub(crate) fn attach_sink(&self, sink: Arc<dyn DeliverSink>) -> SinkHandle {
        let id = self.id;
        self.shared.act(|conn, waiters| {
            if conn.attach_sink(id) {
                waiters.set_sink(id, Some(sink));
            }
        });
        SinkHandle {
            shared: self.shared.clone(),
            id,
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

    /// Asks the core for credit; registers the task's waker when there is none.
    fn poll_credit(
        &self,
        cx: &mut Context<'_>,
        want: usize,
        reserve: bool,
    ) -> Poll<io::Result<usize>> {
        let id = self.id;
        self.shared.act(|conn, waiters| {
            let result = conn.send_credit(id, want, reserve);
            if result.is_pending() {
                waiters.wait_write(id, cx.waker());
            }
            result
        })
    }

    /// Waits for send credit and a slot in the data queue; returns how many of `want` bytes
    /// may go in the next DATA frame. The caller must then call [`Self::send_reserved`].
    fn poll_reserve_send(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<usize>> {
        // Check for credit first so that a stream without credit does not hold a queue slot.
        ready!(self.poll_credit(cx, want, false))?;
        if ready!(self.sender.poll_reserve(cx)).is_err() {
            return Poll::Ready(Err(self.closed_error()));
        }
        match self.poll_credit(cx, want, true) {
            Poll::Ready(Ok(n)) => Poll::Ready(Ok(n)),
            other => {
                self.sender.abort_send();
                other
            }
        }
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
            .poll_consume(
                cx,
                |recv| ((), recv.read_into(&mut ReadBufTarget(buf))),
                false,
            )
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
        let id = this.id;
        if this.shared.read(|conn| conn.fin_state(id))? {
            return Poll::Ready(Ok(()));
        }
        if ready!(this.sender.poll_reserve(cx)).is_err() {
            return Poll::Ready(Err(this.closed_error()));
        }
        if let Err(err) = this.shared.act(|conn, _| conn.reserve_fin(id)) {
            this.sender.abort_send();
            return Poll::Ready(Err(err));
        }
        if this.sender.send_item(Frame::Fin { stream: id }).is_err() {
            return Poll::Ready(Err(this.closed_error()));
        }
        this.shared.kick_writer();
        Poll::Ready(Ok(()))
    }
}

impl Drop for MuxStream {
    fn drop(&mut self) {
        let id = self.id;
        self.shared.act(|conn, _| conn.drop_handle(id));
    }
}
