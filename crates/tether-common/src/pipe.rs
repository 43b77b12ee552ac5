//! The byte pump between a tunneled stream and a local TCP socket: both directions at once,
//! half-close forwarded as shutdown, and the side that failed reported so the caller can turn
//! it into a reset on the other side (never a clean EOF).

use std::io;
use std::task::Poll;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

/// Largest copy buffer per direction: one large DATA frame.
pub const PIPE_BUFFER: usize = 64 * 1024;

/// First buffer of a burst. A read that fills the buffer doubles the next one, up to
/// [`PIPE_BUFFER`], so bulk transfers reach full-size frames after a few reads while a
/// request of a few bytes never costs 64 KiB.
pub const PIPE_BUFFER_MIN: usize = 8 * 1024;

/// Which end of a pipe failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PipeSide {
    /// The tunneled stream (reset by the peer, or the session was lost).
    Tunnel,
    /// The local socket (reset or failed).
    Local,
}

/// A pipe that ended with an error on one side.
#[derive(Debug, thiserror::Error)]
#[error("{side:?} side failed: {source}")]
pub struct PipeError {
    /// The side whose read or write failed.
    pub side: PipeSide,
    /// The error.
    #[source]
    pub source: io::Error,
}

/// Bytes moved by a finished pipe.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PipeTotals {
    /// From the local socket into the tunnel.
    pub to_tunnel: u64,
    /// From the tunnel to the local socket.
    pub to_local: u64,
}

/// Pumps bytes both ways until both directions have finished (EOF then shutdown), or one side
/// fails. On failure the other direction is abandoned at once and the failed side is reported.
///
/// A direction holds a copy buffer only while bytes are moving: the buffer is given back when
/// a read would block with nothing in it, so an idle tunneled connection costs no buffers.
pub async fn pipe<T, L>(tunnel: &mut T, local: &mut L) -> Result<PipeTotals, PipeError>
where
    T: AsyncRead + AsyncWrite + Unpin,
    L: AsyncRead + AsyncWrite + Unpin,
{
    let (mut tunnel_read, mut tunnel_write) = tokio::io::split(tunnel);
    let (mut local_read, mut local_write) = tokio::io::split(local);
    let up = copy_then_shutdown(
        &mut local_read,
        &mut tunnel_write,
        PipeSide::Local,
        PipeSide::Tunnel,
    );
    let down = copy_then_shutdown(
        &mut tunnel_read,
        &mut local_write,
        PipeSide::Tunnel,
        PipeSide::Local,
    );
    let (to_tunnel, to_local) = tokio::try_join!(up, down)?;
    Ok(PipeTotals {
        to_tunnel,
        to_local,
    })
}

async fn copy_then_shutdown<R, W>(
    reader: &mut R,
    writer: &mut W,
    read_side: PipeSide,
    write_side: PipeSide,
) -> Result<u64, PipeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = LazyBuf::new();
    let mut total = 0u64;
    loop {
        let n = std::future::poll_fn(|cx| buf.poll_fill(reader, cx))
            .await
            .map_err(|source| PipeError {
                side: read_side,
                source,
            })?;
        if n == 0 {
            break;
        }
        writer
            .write_all(buf.filled())
            .await
            .map_err(|source| PipeError {
                side: write_side,
                source,
            })?;
        buf.consumed();
        total += n as u64;
    }
    writer.shutdown().await.map_err(|source| PipeError {
        side: write_side,
        source,
    })?;
    Ok(total)
}

/// A copy buffer that exists only while bytes flow, sized by how full the last read was.
#[derive(Debug)]
struct LazyBuf {
    buf: BytesMut,
    /// Capacity of the next allocation.
    next: usize,
}

impl LazyBuf {
    fn new() -> Self {
        Self {
            buf: BytesMut::new(),
            next: PIPE_BUFFER_MIN,
        }
    }

    /// Reads once into an empty buffer (allocated now if needed). Pending gives the buffer
    /// back; `Ok(0)` is end of stream.
    fn poll_fill<R: AsyncRead + Unpin>(
        &mut self,
        reader: &mut R,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<io::Result<usize>> {
        debug_assert!(self.buf.is_empty());
        if self.buf.capacity() < self.next {
            self.buf = BytesMut::with_capacity(self.next);
        }
        match tokio_util::io::poll_read_buf(std::pin::Pin::new(reader), cx, &mut self.buf) {
            Poll::Pending => {
                // Nothing buffered and nothing arriving: an idle direction keeps no memory.
                self.buf = BytesMut::new();
                Poll::Pending
            }
            Poll::Ready(Ok(n)) => {
                if n == self.buf.capacity() {
                    self.next = (self.next * 2).min(PIPE_BUFFER);
                }
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(err)) => Poll::Ready(Err(err)),
        }
    }

    fn filled(&self) -> &[u8] {
        &self.buf
    }

    /// The bytes were written; the buffer is empty again (its capacity kept for the next read).
    fn consumed(&mut self) {
        self.buf.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn forwards_both_ways_with_half_close() {
        let (mut tunnel, mut tunnel_peer) = tokio::io::duplex(1024);
        let (mut local, mut local_peer) = tokio::io::duplex(1024);
        let pump = tokio::spawn(async move { pipe(&mut tunnel, &mut local).await });
        local_peer.write_all(b"request").await.unwrap();
        local_peer.shutdown().await.unwrap();
        let mut got = Vec::new();
        tunnel_peer.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"request");
        // The other direction still works after the first one finished.
        tunnel_peer.write_all(b"reply").await.unwrap();
        tunnel_peer.shutdown().await.unwrap();
        let mut got = Vec::new();
        local_peer.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"reply");
        let totals = pump.await.unwrap().unwrap();
        assert_eq!(
            totals,
            PipeTotals {
                to_tunnel: 7,
                to_local: 5
            }
        );
    }

    struct Failing;

    impl AsyncRead for Failing {
        fn poll_read(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            _: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()))
        }
    }

    impl AsyncWrite for Failing {
        fn poll_write(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            _: &[u8],
        ) -> std::task::Poll<io::Result<usize>> {
            std::task::Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()))
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    /// A reader that yields `chunks` one per poll, pending (after waking itself) in between.
    struct Trickle {
        chunks: Vec<Vec<u8>>,
        pending_next: bool,
        capacities: std::sync::Arc<std::sync::Mutex<Vec<usize>>>,
    }

    impl AsyncRead for Trickle {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            self.capacities.lock().unwrap().push(buf.remaining());
            if self.pending_next {
                self.pending_next = false;
                cx.waker().wake_by_ref();
                return std::task::Poll::Pending;
            }
            self.pending_next = true;
            if !self.chunks.is_empty() {
                let chunk = self.chunks.remove(0);
                buf.put_slice(&chunk);
            }
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn buffers_grow_with_full_reads_and_are_released_when_idle() {
        let capacities = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut reader = Trickle {
            chunks: vec![
                vec![1; PIPE_BUFFER_MIN],
                vec![2; 2 * PIPE_BUFFER_MIN],
                vec![3; 5],
            ],
            pending_next: false,
            capacities: capacities.clone(),
        };
        let mut out = Vec::new();
        let total = copy_then_shutdown(&mut reader, &mut out, PipeSide::Local, PipeSide::Tunnel)
            .await
            .unwrap();
        assert_eq!(total as usize, 3 * PIPE_BUFFER_MIN + 5);
        assert_eq!(out.len(), total as usize);
        let seen = capacities.lock().unwrap().clone();
        // Polls alternate read, pending, read...: the reads are the even ones. A full first read
        // doubles the buffer; the second (full again) doubles it once more.
        let reads: Vec<usize> = seen.iter().copied().step_by(2).collect();
        assert_eq!(reads[0], PIPE_BUFFER_MIN);
        assert_eq!(reads[1], 2 * PIPE_BUFFER_MIN);
        assert_eq!(reads[2], 4 * PIPE_BUFFER_MIN);
    }

    #[test]
    fn an_idle_direction_holds_no_buffer() {
        let mut buf = LazyBuf::new();
        let (mut idle, _peer) = tokio::io::duplex(16);
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        assert!(buf.poll_fill(&mut idle, &mut cx).is_pending());
        assert_eq!(buf.buf.capacity(), 0);
    }

    #[tokio::test]
    async fn reports_the_failing_side() {
        let (mut local, _local_peer) = tokio::io::duplex(1024);
        let err = pipe(&mut Failing, &mut local).await.unwrap_err();
        assert_eq!(err.side, PipeSide::Tunnel);
        assert_eq!(err.source.kind(), io::ErrorKind::ConnectionReset);
    }
}
