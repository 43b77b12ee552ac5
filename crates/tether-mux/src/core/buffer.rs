//! A stream's buffer of received bytes not read yet, and where a read copies them to.

use std::collections::VecDeque;

use bytes::{Buf, Bytes, BytesMut};

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
