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

use crate::state::{Shared, StreamFailure, Wakers};

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
        self.shared.writer_notify.notify_one();
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

impl AsyncRead for MuxStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let mut notify_writer = false;
        let result = {
            let mut state = this.shared.lock();
            let window = u64::from(this.shared.config.window);
            let Some(slot) = state.streams.get_mut(&this.id) else {
                return Poll::Ready(Err(this.closed_error()));
            };
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
                    Poll::Ready(Ok(()))
                } else if let Some(failure) = &slot.failure {
                    Poll::Ready(Err(failure.to_io()))
                } else {
                    slot.read_waker = Some(cx.waker().clone());
                    Poll::Pending
                }
            } else {
                let copied = slot.recv_buf.read_into(buf);
                slot.unacked += copied as u64;
                // Grant credit back in batches: a quarter window keeps the sender busy without
                // a WINDOW frame per read.
                let every = this
                    .shared
                    .config
                    .window_update
                    .map_or(window / 4, u64::from)
                    .max(1);
                let grant = slot.failure.is_none() && !slot.recv_fin && slot.unacked >= every;
                if grant {
                    let increment = slot.unacked.min(u64::from(u32::MAX));
                    slot.unacked -= increment;
                    slot.recv_allowance += increment;
                    state.push_control(Frame::Window {
                        stream: this.id,
                        increment: increment as u32,
                    });
                    notify_writer = true;
                }
                Poll::Ready(Ok(()))
            }
        };
        if notify_writer {
            this.shared.writer_notify.notify_one();
        }
        result
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
        // Check for credit first so that a stream without credit does not hold a queue slot.
        {
            let mut state = this.shared.lock();
            let Some(slot) = state.streams.get_mut(&this.id) else {
                return Poll::Ready(Err(this.closed_error()));
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
        if ready!(this.sender.poll_reserve(cx)).is_err() {
            return Poll::Ready(Err(this.closed_error()));
        }
        let n = {
            let mut state = this.shared.lock();
            let Some(slot) = state.streams.get_mut(&this.id) else {
                this.sender.abort_send();
                return Poll::Ready(Err(this.closed_error()));
            };
            if let Some(failure) = &slot.failure {
                this.sender.abort_send();
                return Poll::Ready(Err(failure.to_io()));
            }
            if slot.send_credit == 0 {
                this.sender.abort_send();
                slot.write_waker = Some(cx.waker().clone());
                return Poll::Pending;
            }
            let n = buf
                .len()
                .min(slot.send_credit.min(usize::MAX as u64) as usize)
                .min(this.shared.config.max_data as usize);
            slot.send_credit -= n as u64;
            slot.queued += 1;
            n
        };
        let frame = Frame::Data {
            stream: this.id,
            payload: Bytes::copy_from_slice(&buf[..n]),
        };
        if this.sender.send_item(frame).is_err() {
            return Poll::Ready(Err(this.closed_error()));
        }
        this.shared.bytes_tx.fetch_add(n as u64, Ordering::Relaxed);
        this.shared.metrics.bytes_tx.inc_by(n as u64);
        Poll::Ready(Ok(n))
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
        self.shared.writer_notify.notify_one();
    }
}

fn state_allows_rst(state: &crate::state::State) -> bool {
    state.end.is_none()
}
