//! `ReadAhead`: a socket wrapper that reads in large chunks for a TLS layer that asks for small
//! ones, and holds its buffer only while bytes are waiting.
//!
//! rustls reads at most 4 KiB per `read` call, so a 16 KiB TLS record costs four or five
//! `recv` system calls when rustls sits directly on a socket. Under it, `ReadAhead` asks the
//! socket for up to [`READ_AHEAD`] bytes at once and serves rustls's small reads from memory.
//! The buffer is given back as soon as it is drained and the socket has nothing more, so an
//! idle connection (10,000 idle agent sessions on a server) holds none.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Most bytes read from the socket in one call.
pub const READ_AHEAD: usize = 64 * 1024;

/// First buffer. A read that fills it doubles the next one, up to [`READ_AHEAD`]. A session
/// that only exchanges small messages (a 64-byte echo) keeps using a buffer the allocator
/// serves from its thread cache; one that moves bulk data reads 64 KiB at a time.
pub const READ_AHEAD_MIN: usize = 16 * 1024;

/// A byte stream whose reads go through a lazily allocated read-ahead buffer; writes pass
/// straight through.
#[derive(Debug)]
pub struct ReadAhead<IO> {
    io: IO,
    buf: BytesMut,
    /// Capacity of the next allocation.
    next: usize,
}

impl<IO> ReadAhead<IO> {
    /// Wraps `io`.
    pub fn new(io: IO) -> Self {
        Self {
            io,
            buf: BytesMut::new(),
            next: READ_AHEAD_MIN,
        }
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &IO {
        &self.io
    }

    /// Bytes read from the socket and not yet handed on.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for ReadAhead<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.buf.is_empty() {
            // A caller asking for a large read gains nothing from the extra copy.
            if out.remaining() >= READ_AHEAD {
                return Pin::new(&mut this.io).poll_read(cx, out);
            }
            if this.buf.capacity() < this.next {
                this.buf = BytesMut::with_capacity(this.next);
            }
            let room = this.buf.capacity();
            match tokio_util::io::poll_read_buf(Pin::new(&mut this.io), cx, &mut this.buf) {
                Poll::Pending => {
                    // Nothing buffered and nothing arriving: an idle connection keeps no memory.
                    this.buf = BytesMut::new();
                    return Poll::Pending;
                }
                Poll::Ready(Err(err)) => {
                    this.buf = BytesMut::new();
                    return Poll::Ready(Err(err));
                }
                // End of stream: `out` stays unfilled, which the caller reads as EOF.
                Poll::Ready(Ok(0)) => {
                    this.buf = BytesMut::new();
                    return Poll::Ready(Ok(()));
                }
                Poll::Ready(Ok(n)) => {
                    if n == room {
                        this.next = (this.next * 2).min(READ_AHEAD);
                    }
                }
            }
        }
        let n = this.buf.len().min(out.remaining());
        out.put_slice(&this.buf[..n]);
        this.buf.advance(n);
        if this.buf.is_empty() {
            // Reuse the allocation for the next fill: `advance` moved its start to the end.
            this.buf.clear();
        }
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for ReadAhead<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn small_reads_are_served_from_one_large_socket_read() {
        let (mut far, near) = tokio::io::duplex(READ_AHEAD * 2);
        let data: Vec<u8> = (0..40_000u32).map(|i| (i % 251) as u8).collect();
        far.write_all(&data).await.unwrap();
        let mut reader = ReadAhead::new(near);
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        let n = reader.read(&mut chunk).await.unwrap();
        got.extend_from_slice(&chunk[..n]);
        // One read of the pipe filled a whole first buffer.
        assert_eq!(reader.buffered(), READ_AHEAD_MIN - n);
        while got.len() < data.len() {
            let n = reader.read(&mut chunk).await.unwrap();
            assert!(n > 0);
            got.extend_from_slice(&chunk[..n]);
        }
        assert_eq!(got, data);
        assert_eq!(reader.buffered(), 0);
    }

    #[tokio::test]
    async fn an_idle_stream_holds_no_buffer_and_eof_passes_through() {
        let (mut far, near) = tokio::io::duplex(1024);
        let mut reader = ReadAhead::new(near);
        far.write_all(b"hello").await.unwrap();
        let mut chunk = [0u8; 16];
        assert_eq!(reader.read(&mut chunk).await.unwrap(), 5);
        // Nothing more is waiting: the poll returns Pending and gives the buffer back.
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut out = ReadBuf::new(&mut chunk);
        assert!(
            Pin::new(&mut reader)
                .poll_read(&mut cx, &mut out)
                .is_pending()
        );
        assert_eq!(reader.buf.capacity(), 0);
        drop(far);
        assert_eq!(reader.read(&mut chunk).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn the_buffer_grows_with_full_reads() {
        let (mut far, near) = tokio::io::duplex(4 * READ_AHEAD);
        let mut reader = ReadAhead::new(near);
        let mut small = [0u8; 16];
        // Each round sends exactly what the next buffer holds, so every fill is a full read:
        // 16 KiB, then 32 KiB, then 64 KiB at most.
        for expected in [READ_AHEAD_MIN, 2 * READ_AHEAD_MIN, READ_AHEAD, READ_AHEAD] {
            far.write_all(&vec![7u8; expected]).await.unwrap();
            let n = reader.read(&mut small).await.unwrap();
            assert_eq!(n + reader.buffered(), expected);
            let mut rest = vec![0u8; reader.buffered()];
            reader.read_exact(&mut rest).await.unwrap();
            assert_eq!(reader.buffered(), 0);
        }
    }

    #[tokio::test]
    async fn writes_pass_through() {
        let (mut far, near) = tokio::io::duplex(1024);
        let mut stream = ReadAhead::new(near);
        stream.write_all(b"ping").await.unwrap();
        stream.flush().await.unwrap();
        let mut got = [0u8; 4];
        far.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
    }
}
