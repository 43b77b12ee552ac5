//! The receiving side of a stream: the buffer of received bytes, DATA and FIN from the peer,
//! reads by the application, direct delivery into an attached socket, and the WINDOW frames
//! that grant credit back.

use std::collections::VecDeque;
use std::io;
use std::task::Poll;

use bytes::{Buf, Bytes, BytesMut};
use tether_proto::{Frame, ResetCode, StreamId};

use super::conn::Conn;
use super::event::{Applied, Event};
use super::stream::{Answer, session_closed};

/// Where a read copies bytes to (the shell's `ReadBuf`, a test's `Vec`).
pub(crate) trait ReadTarget {
    /// Room left.
    fn remaining(&self) -> usize;
    /// Appends `bytes` (at most `remaining()` long).
    fn put_slice(&mut self, bytes: &[u8]);
}

impl ReadTarget for Vec<u8> {
    fn remaining(&self) -> usize {
        usize::MAX - self.len()
    }

    fn put_slice(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

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

    pub(super) fn push(&mut self, payload: Bytes) {
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
    pub(crate) fn read_into(&mut self, dst: &mut impl ReadTarget) -> usize {
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

// === impl Conn: the receiving side ===

impl Conn {
    /// DATA from the peer.
    pub(super) fn on_data(&mut self, stream: StreamId, payload: Bytes) -> Applied {
        let len = payload.len() as u64;
        let max_data = u64::from(self.config.max_data);
        let Some(slot) = self.streams.get_mut(stream) else {
            // Usually a race with a reset we sent; answer so a confused peer learns.
            self.reply_unknown_stream(stream);
            return Applied::Done;
        };
        if slot.failure.is_some() {
            return Applied::Done;
        }
        let violation = if len > max_data {
            // Only reachable with `max_data` below the decoder's floor.
            Some(("too_large", ResetCode::Protocol, "DATA over max_data"))
        } else if slot.recv_fin {
            Some(("data_after_fin", ResetCode::Protocol, "DATA after FIN"))
        } else if len > slot.recv_allowance {
            Some((
                "flow_control",
                ResetCode::FlowControl,
                "DATA beyond the granted window",
            ))
        } else {
            None
        };
        if let Some((kind, code, message)) = violation {
            self.protocol_error(kind);
            self.reset_for_violation(stream, code, message);
            return Applied::Done;
        }
        if len == 0 {
            return Applied::Done;
        }
        slot.recv_allowance -= len;
        self.bytes_rx += len;
        self.metrics.bytes_rx.inc_by(len);
        if slot.can_deliver_directly() {
            slot.direct_writing = true;
            return Applied::Deliver { stream, payload };
        }
        slot.recv_buf.push(payload);
        self.events.push_back(Event::Readable(stream));
        Applied::Done
    }

    /// FIN from the peer.
    pub(super) fn on_fin(&mut self, stream: StreamId) {
        match self.streams.get_mut(stream) {
            Some(slot) if slot.failure.is_none() => {
                if slot.recv_fin {
                    self.protocol_error("double_fin");
                    self.reset_for_violation(stream, ResetCode::Protocol, "FIN twice");
                } else {
                    slot.recv_fin = true;
                    self.events.push_back(Event::Readable(stream));
                }
            }
            Some(_) => {}
            None => self.reply_unknown_stream(stream),
        }
    }

    /// The application reads: EOF (`None`), a failure, or `take` applied to the buffered bytes
    /// (not empty then), with the window credit granted back for what it took. `Pending`
    /// means nothing is buffered yet: the shell registers the reader's waker. `holds`: the
    /// caller keeps what it took unwritten until its next read (the pump), so no direct
    /// delivery may happen meanwhile.
    pub(crate) fn consume<R>(
        &mut self,
        id: StreamId,
        take: impl FnOnce(&mut RecvBuf) -> (R, usize),
        holds: bool,
    ) -> Poll<io::Result<Option<R>>> {
        let Some(slot) = self.streams.get_mut(id) else {
            return Poll::Ready(Err(session_closed()));
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
            return if slot.recv_fin {
                // Every byte up to the peer's FIN was delivered; losing the session after
                // that does not make this direction incomplete.
                Poll::Ready(Ok(None))
            } else if let Some(failure) = &slot.failure {
                Poll::Ready(Err(failure.to_io()))
            } else {
                Poll::Pending
            };
        }
        let (taken, copied) = take(&mut slot.recv_buf);
        // The caller holds the bytes until it asks again: a direct write by the session's
        // reader before then would overtake them.
        slot.pump_holds = holds;
        if let Some(window) = slot.consumed(id, copied, &self.config) {
            self.push_control(window);
        }
        Poll::Ready(Ok(Some(taken)))
    }

    /// Bytes received for `id` and not yet read.
    pub(crate) fn buffered(&self, id: StreamId) -> usize {
        self.streams.get(id).map_or(0, |slot| slot.recv_buf.len())
    }

    /// The shell attached a socket the reader may write `id`'s received bytes into.
    pub(crate) fn attach_sink(&mut self, id: StreamId) -> bool {
        match self.streams.get_mut(id) {
            Some(slot) => {
                slot.sink_attached = true;
                true
            }
            None => false,
        }
    }

    /// The shell detached the socket; returns the bytes delivered into it since the last call.
    pub(crate) fn detach_sink(&mut self, id: StreamId) -> u64 {
        match self.streams.get_mut(id) {
            Some(slot) => {
                slot.sink_attached = false;
                std::mem::take(&mut slot.direct_bytes)
            }
            None => 0,
        }
    }

    /// After an [`Applied::Deliver`]: `written` bytes reached the socket, `rest` did not (the
    /// socket was full or failed) and goes to the stream's buffer for its consumer, which
    /// writes it or meets the error itself.
    pub(crate) fn delivered(&mut self, id: StreamId, written: usize, rest: Bytes) {
        let Some(slot) = self.streams.get_mut(id) else {
            return;
        };
        slot.direct_writing = false;
        slot.direct_bytes += written as u64;
        let window = slot.consumed(id, written, &self.config);
        if !rest.is_empty() {
            slot.recv_buf.push(rest);
            self.events.push_back(Event::Readable(id));
        }
        if let Some(window) = window {
            self.push_control(window);
        }
    }

    /// Resets `id` for a protocol violation by the peer (once: a peer repeating the offending
    /// frame cannot grow the control queue).
    pub(super) fn reset_for_violation(&mut self, id: StreamId, code: ResetCode, message: &str) {
        self.fail_stream(
            id,
            super::stream::StreamFailure::reset_locally(code, message),
            Answer::Rst(code, message.to_owned()),
            false,
        );
    }

    /// Answers a frame for a stream this side does not know with RST `unknown_stream`.
    pub(super) fn reply_unknown_stream(&mut self, stream: StreamId) {
        self.push_reply(Frame::Rst {
            stream,
            code: ResetCode::UnknownStream,
            message: String::new(),
        });
    }
}
