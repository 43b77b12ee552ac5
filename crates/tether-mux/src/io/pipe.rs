//! The byte pump between a tunneled stream and a local TCP socket: both directions at once,
//! half-close forwarded as shutdown, and the side that failed reported so the caller can turn
//! it into a reset on the other side (never a clean EOF). Bytes move between the socket and
//! the stream's frames without a copy in between (`TunnelIo`).

use std::future::poll_fn;
use std::io;
use std::pin::{Pin, pin};
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::stream::MuxStream;

/// Largest buffer per direction: one large DATA frame.
pub const PIPE_BUFFER: usize = 64 * 1024;

/// First buffer of a burst. A read that fills the buffer doubles the next one, up to
/// [`PIPE_BUFFER`], so bulk transfers reach full-size frames after a few reads while a
/// request of a few bytes never costs 64 KiB.
pub const PIPE_BUFFER_MIN: usize = 8 * 1024;

/// The tunnel side of a pipe: a stream that hands over and takes whole chunks, so that the
/// bytes a socket read produced become a frame's payload (and a received payload is written to
/// the socket) without being copied.
pub trait TunnelIo: AsyncWrite + Unpin {
    /// The next received bytes, at most `max`; `None` at the end of the stream.
    fn poll_read_chunk(
        &mut self,
        cx: &mut Context<'_>,
        max: usize,
    ) -> Poll<io::Result<Option<Bytes>>>;

    /// Takes a prefix of `data` for sending; returns its length.
    fn poll_write_chunk(
        &mut self,
        cx: &mut Context<'_>,
        data: &mut Bytes,
    ) -> Poll<io::Result<usize>>;
}

impl TunnelIo for MuxStream {
    fn poll_read_chunk(
        &mut self,
        cx: &mut Context<'_>,
        max: usize,
    ) -> Poll<io::Result<Option<Bytes>>> {
        MuxStream::poll_read_chunk(self, cx, max)
    }

    fn poll_write_chunk(
        &mut self,
        cx: &mut Context<'_>,
        data: &mut Bytes,
    ) -> Poll<io::Result<usize>> {
        MuxStream::poll_write_chunk(self, cx, data)
    }
}

/// The read side of a pipe's local end: reads into the spare capacity of a growable buffer (so
/// a read needs no zero-filled space). Every `AsyncRead` is one.
pub trait LocalRead: Unpin {
    /// Reads once into the spare capacity of `buf`; 0 is the end of the stream.
    fn poll_read_into(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
    ) -> Poll<io::Result<usize>>;
}

impl<T: AsyncRead + Unpin> LocalRead for T {
    fn poll_read_into(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
    ) -> Poll<io::Result<usize>> {
        tokio_util::io::poll_read_buf(Pin::new(self), cx, buf)
    }
}

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
    /// Of `to_local`, the bytes the session's reader wrote into the socket itself
    /// ([`super::direct`]).
    pub to_local_direct: u64,
}

/// How a pipe ended, with the bytes it moved either way until then (also when it failed or was
/// stopped, for accounting such as the server's audit log).
#[derive(Debug)]
pub struct PipeEnd {
    /// Bytes moved until the end.
    pub totals: PipeTotals,
    /// `Ok` when both directions finished; the failure (or the stop's error) otherwise.
    pub result: Result<(), PipeError>,
}

/// Pumps bytes both ways until both directions have finished (EOF then shutdown), or one side
/// fails. On failure the other direction is abandoned at once and the failed side is reported.
///
/// A direction holds a buffer only while bytes are moving: the socket side's read buffer is
/// given back when a read would block with nothing in it, so an idle tunneled connection costs
/// no buffers.
pub async fn pipe<T, L>(tunnel: &mut T, local: &mut L) -> Result<PipeTotals, PipeError>
where
    T: TunnelIo,
    L: LocalRead + AsyncWrite,
{
    let end = pipe_until(tunnel, local, std::future::pending()).await;
    end.result.map(|()| end.totals)
}

/// [`pipe`] that also ends when `stop` completes (with the error it yields), and reports the
/// bytes moved on every outcome.
pub async fn pipe_until<T, L, S>(tunnel: &mut T, local: &mut L, stop: S) -> PipeEnd
where
    T: TunnelIo,
    L: LocalRead + AsyncWrite,
    S: Future<Output = PipeError>,
{
    let mut up = Up::default();
    let mut down = Down::default();
    let mut stop = pin!(stop);
    let result = poll_fn(|cx| {
        // Both directions are polled every time; a failure on either ends the pipe.
        let up_done = up.poll(cx, local, tunnel)?.is_ready();
        let down_done = down.poll(cx, tunnel, local)?.is_ready();
        if up_done && down_done {
            Poll::Ready(Ok(()))
        } else {
            stop.as_mut().poll(cx).map(Err)
        }
    })
    .await;
    PipeEnd {
        totals: PipeTotals {
            to_tunnel: up.total,
            to_local: down.total,
            to_local_direct: 0,
        },
        result,
    }
}

fn failed(side: PipeSide) -> impl FnOnce(io::Error) -> PipeError {
    move |source| PipeError { side, source }
}

/// Local socket -> tunnel.
#[derive(Debug, Default)]
struct Up {
    buf: LazyBuf,
    /// Read from the socket, not yet taken by the tunnel.
    chunk: Bytes,
    eof: bool,
    done: bool,
    total: u64,
}

impl Up {
    fn poll<L, T>(
        &mut self,
        cx: &mut Context<'_>,
        local: &mut L,
        tunnel: &mut T,
    ) -> Poll<Result<(), PipeError>>
    where
        L: LocalRead,
        T: TunnelIo,
    {
        loop {
            if self.done {
                return Poll::Ready(Ok(()));
            }
            if !self.chunk.is_empty() {
                let n = ready!(tunnel.poll_write_chunk(cx, &mut self.chunk))
                    .map_err(failed(PipeSide::Tunnel))?;
                if n == 0 {
                    return Poll::Ready(Err(PipeError {
                        side: PipeSide::Tunnel,
                        source: io::ErrorKind::WriteZero.into(),
                    }));
                }
                self.total += n as u64;
                continue;
            }
            if self.eof {
                ready!(Pin::new(&mut *tunnel).poll_shutdown(cx))
                    .map_err(failed(PipeSide::Tunnel))?;
                self.done = true;
                continue;
            }
            match ready!(self.buf.poll_fill(local, cx)).map_err(failed(PipeSide::Local))? {
                None => self.eof = true,
                Some(chunk) => self.chunk = chunk,
            }
        }
    }
}

/// Tunnel -> local socket.
#[derive(Debug, Default)]
struct Down {
    /// Received from the tunnel, not yet written to the socket.
    chunk: Bytes,
    eof: bool,
    done: bool,
    total: u64,
}

impl Down {
    fn poll<T, L>(
        &mut self,
        cx: &mut Context<'_>,
        tunnel: &mut T,
        local: &mut L,
    ) -> Poll<Result<(), PipeError>>
    where
        T: TunnelIo,
        L: AsyncWrite + Unpin,
    {
        loop {
            if self.done {
                return Poll::Ready(Ok(()));
            }
            if !self.chunk.is_empty() {
                let n = ready!(Pin::new(&mut *local).poll_write(cx, &self.chunk))
                    .map_err(failed(PipeSide::Local))?;
                if n == 0 {
                    return Poll::Ready(Err(PipeError {
                        side: PipeSide::Local,
                        source: io::ErrorKind::WriteZero.into(),
                    }));
                }
                self.chunk.advance(n);
                self.total += n as u64;
                if self.chunk.is_empty() {
                    // Let go of the transport's buffer at once.
                    self.chunk = Bytes::new();
                }
                continue;
            }
            if self.eof {
                ready!(Pin::new(&mut *local).poll_shutdown(cx)).map_err(failed(PipeSide::Local))?;
                self.done = true;
                continue;
            }
            match ready!(tunnel.poll_read_chunk(cx, PIPE_BUFFER))
                .map_err(failed(PipeSide::Tunnel))?
            {
                None => self.eof = true,
                Some(chunk) => self.chunk = chunk,
            }
        }
    }
}

/// A read buffer that exists only while bytes flow, sized by how full the last read was. What
/// a read produced is split off as a chunk (the rest of the allocation stays for the next
/// reads).
#[derive(Debug)]
struct LazyBuf {
    buf: BytesMut,
    /// Capacity of the next allocation.
    next: usize,
}

impl Default for LazyBuf {
    fn default() -> Self {
        Self {
            buf: BytesMut::new(),
            next: PIPE_BUFFER_MIN,
        }
    }
}

impl LazyBuf {
    /// Reads once (allocating if the space left is too small); `None` is end of stream.
    /// Pending gives the buffer back.
    fn poll_fill<R: LocalRead>(
        &mut self,
        reader: &mut R,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<Option<Bytes>>> {
        debug_assert!(self.buf.is_empty());
        // Less than a quarter of the next size left: a fresh buffer. The old one lives on
        // only in the frames that still hold its bytes.
        if self.buf.capacity() < self.next / 4 {
            self.buf = BytesMut::with_capacity(self.next);
        }
        let room = self.buf.capacity();
        match reader.poll_read_into(cx, &mut self.buf) {
            Poll::Pending => {
                // Nothing buffered and nothing arriving: an idle direction keeps no memory.
                self.buf = BytesMut::new();
                Poll::Pending
            }
            Poll::Ready(Ok(0)) => {
                self.buf = BytesMut::new();
                Poll::Ready(Ok(None))
            }
            Poll::Ready(Ok(n)) => {
                if n == room {
                    self.next = (self.next * 2).min(PIPE_BUFFER);
                }
                Poll::Ready(Ok(Some(self.buf.split().freeze())))
            }
            Poll::Ready(Err(err)) => {
                self.buf = BytesMut::new();
                Poll::Ready(Err(err))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Any byte stream as a tunnel side, copying (the pipe's logic without a session).
    struct Copying<S>(S);

    impl<S: AsyncRead + AsyncWrite + Unpin> TunnelIo for Copying<S> {
        fn poll_read_chunk(
            &mut self,
            cx: &mut Context<'_>,
            max: usize,
        ) -> Poll<io::Result<Option<Bytes>>> {
            let mut buf = BytesMut::with_capacity(max);
            let n = ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut self.0),
                cx,
                &mut buf
            ))?;
            Poll::Ready(Ok((n > 0).then(|| buf.freeze())))
        }

        fn poll_write_chunk(
            &mut self,
            cx: &mut Context<'_>,
            data: &mut Bytes,
        ) -> Poll<io::Result<usize>> {
            let n = ready!(Pin::new(&mut self.0).poll_write(cx, data))?;
            data.advance(n);
            Poll::Ready(Ok(n))
        }
    }

    impl<S: AsyncWrite + Unpin> AsyncWrite for Copying<S> {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.0).poll_write(cx, buf)
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_shutdown(cx)
        }
    }

    #[tokio::test]
    async fn forwards_both_ways_with_half_close() {
        let (mut tunnel, mut tunnel_peer) = tokio::io::duplex(1024);
        let (mut local, mut local_peer) = tokio::io::duplex(1024);
        let pump = tokio::spawn(async move { pipe(&mut Copying(&mut tunnel), &mut local).await });
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
                to_local: 5,
                to_local_direct: 0,
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
        let mut buf = LazyBuf::default();
        let mut chunks = Vec::new();
        while let Some(chunk) = poll_fn(|cx| buf.poll_fill(&mut reader, cx)).await.unwrap() {
            chunks.push(chunk);
        }
        let lens: Vec<usize> = chunks.iter().map(Bytes::len).collect();
        assert_eq!(lens, [PIPE_BUFFER_MIN, 2 * PIPE_BUFFER_MIN, 5]);
        assert_eq!(chunks[2][..], [3; 5]);
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
        let mut buf = LazyBuf::default();
        let (mut idle, _peer) = tokio::io::duplex(16);
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        assert!(buf.poll_fill(&mut idle, &mut cx).is_pending());
        assert_eq!(buf.buf.capacity(), 0);
    }

    #[tokio::test]
    async fn reports_the_failing_side() {
        let (mut local, _local_peer) = tokio::io::duplex(1024);
        let err = pipe(&mut Copying(Failing), &mut local).await.unwrap_err();
        assert_eq!(err.side, PipeSide::Tunnel);
        assert_eq!(err.source.kind(), io::ErrorKind::ConnectionReset);
    }
}
