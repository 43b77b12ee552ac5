//! Direct delivery: a local TCP socket the session's reader writes received DATA into itself,
//! so that a payload reaches the socket without waking the stream's pump first.
//!
//! The pump still owns the socket's reads, its shutdown and every write that cannot be made at
//! once: the reader writes only when nothing of the stream is buffered or held by the pump,
//! with one non-blocking `try_write`, and leaves whatever did not fit in the stream's buffer for
//! the pump. So the order of bytes is kept, no byte is written twice, and the reader never
//! waits on a consumer. A write error the reader meets is kept for the pump (see [`Sink`]), so
//! a reset socket fails the pipe on the local side as it did before, never as a clean EOF.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, ready};

use bytes::BytesMut;
use tokio::io::{AsyncWrite, Interest};
use tokio::net::TcpStream;

use super::DeliverSink;
use super::pipe::{LocalRead, PipeEnd, PipeError, PipeTotals, pipe_until};
use crate::stream::{MuxStream, SinkHandle};

/// The socket shared by a stream's pump and the session's reader.
#[derive(Debug)]
pub(crate) struct Sink {
    tcp: TcpStream,
    /// The error the reader's write met. A socket reports a reset once; a read after that
    /// sees a clean end of stream. So the pump's reads and the reader's writes take this lock
    /// around their system call, and a read reports an error kept here first.
    error: Mutex<Option<io::Error>>,
}

impl Sink {
    pub(crate) fn new(tcp: TcpStream) -> Self {
        Self {
            tcp,
            error: Mutex::new(None),
        }
    }

    fn error(&self) -> MutexGuard<'_, Option<io::Error>> {
        self.error.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl DeliverSink for Sink {
    fn try_deliver(&self, data: &[u8]) -> usize {
        let mut error = self.error();
        if error.is_some() {
            return 0;
        }
        match try_write(&self.tcp, data) {
            Ok(n) => n,
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => 0,
            Err(err) => {
                *error = Some(err);
                0
            }
        }
    }
}

/// A local TCP socket shared between a stream's pump and the session's reader.
#[derive(Debug)]
pub struct DirectTcp {
    sink: Arc<Sink>,
}

impl DirectTcp {
    /// Wraps a connected socket.
    pub fn new(tcp: TcpStream) -> Self {
        Self {
            sink: Arc::new(Sink::new(tcp)),
        }
    }

    /// The socket (for its addresses and options, e.g. a zero linger before a reset).
    pub fn get_ref(&self) -> &TcpStream {
        &self.sink.tcp
    }
}

impl LocalRead for DirectTcp {
    fn poll_read_into(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
    ) -> Poll<io::Result<usize>> {
        let tcp = &self.sink.tcp;
        loop {
            if let Some(err) = self.sink.error().take() {
                return Poll::Ready(Err(err));
            }
            ready!(tcp.poll_read_ready(cx))?;
            let mut error = self.sink.error();
            if let Some(err) = error.take() {
                return Poll::Ready(Err(err));
            }
            let room = buf.capacity() - buf.len();
            let mut read = None;
            // As tokio's own reads do: a read that did not fill the buffer emptied the socket,
            // so its readiness is cleared at once instead of by a second read failing with
            // WouldBlock. `try_io` clears only the readiness seen before the read, so an
            // arrival during the read is not lost.
            let result = tcp.try_io(Interest::READABLE, || {
                let n = tcp.try_read_buf(buf)?;
                read = Some(n);
                if n > 0 && n < room {
                    Err(io::ErrorKind::WouldBlock.into())
                } else {
                    Ok(n)
                }
            });
            drop(error);
            match (result, read) {
                (Ok(n), _) | (Err(_), Some(n)) => return Poll::Ready(Ok(n)),
                (Err(err), None) if err.kind() == io::ErrorKind::WouldBlock => continue,
                (Err(err), None) => return Poll::Ready(Err(err)),
            }
        }
    }
}

/// One non-blocking write of a prefix of `data`; a short write clears the socket's write
/// readiness (as tokio's own writes do), so the next writer waits for room instead of
/// failing once with WouldBlock first. `Ok(0)` for a non-empty `data` never happens: a full
/// socket is WouldBlock.
fn try_write(tcp: &TcpStream, data: &[u8]) -> io::Result<usize> {
    let mut written = None;
    let result = tcp.try_io(Interest::WRITABLE, || {
        let n = tcp.try_write(data)?;
        written = Some(n);
        if n < data.len() {
            Err(io::ErrorKind::WouldBlock.into())
        } else {
            Ok(n)
        }
    });
    match (result, written) {
        (Ok(n), _) | (Err(_), Some(n)) => Ok(n),
        (Err(err), None) => Err(err),
    }
}

impl AsyncWrite for DirectTcp {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let tcp = &self.sink.tcp;
        loop {
            if let Some(err) = self.sink.error().take() {
                return Poll::Ready(Err(err));
            }
            ready!(tcp.poll_write_ready(cx))?;
            match try_write(tcp, buf) {
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => continue,
                result => return Poll::Ready(result),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // As `TcpStream::poll_shutdown` does (it needs `&mut`; the socket is shared here).
        Poll::Ready(socket2::SockRef::from(&self.sink.tcp).shutdown(std::net::Shutdown::Write))
    }
}

/// [`pipe`](super::pipe::pipe) with direct delivery: while it runs, the session's reader may write `stream`'s
/// received bytes straight into `local`. `to_local` counts both kinds of delivery.
pub async fn pipe_direct(
    stream: &mut MuxStream,
    local: &mut DirectTcp,
) -> Result<PipeTotals, PipeError> {
    let end = pipe_direct_until(stream, local, std::future::pending()).await;
    end.result.map(|()| end.totals)
}

/// [`pipe_direct`] that also ends when `stop` completes, with the bytes moved on every
/// outcome ([`pipe_until`]).
pub async fn pipe_direct_until<S>(stream: &mut MuxStream, local: &mut DirectTcp, stop: S) -> PipeEnd
where
    S: Future<Output = PipeError>,
{
    let attached = Attached {
        stream: stream.attach_sink(local.sink.clone()),
    };
    let mut end = pipe_until(stream, local, stop).await;
    let direct = attached.stream.detach_sink();
    end.totals.to_local += direct;
    end.totals.to_local_direct = direct;
    end
}

/// Detaches the socket from the stream when the pipe ends or is dropped, so that the reader
/// never writes into a socket whose pump has gone.
struct Attached {
    stream: SinkHandle,
}

impl Drop for Attached {
    fn drop(&mut self) {
        self.stream.detach_sink();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;
    use tokio::net::TcpListener;

    #[tokio::test]
    async fn a_reset_met_by_a_direct_write_fails_the_pumps_next_read() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (tcp, accepted) = tokio::join!(
            TcpStream::connect(listener.local_addr().unwrap()),
            listener.accept()
        );
        let mut local = DirectTcp::new(tcp.unwrap());
        let (peer, _) = accepted.unwrap();
        peer.set_zero_linger().unwrap();
        drop(peer);
        // The reset has arrived once the socket turns readable.
        local.get_ref().readable().await.unwrap();
        // The reader's write meets the reset (the socket reports it this once)...
        assert_eq!(local.sink.try_deliver(b"ping"), 0);
        // ...and the pump's next read reports it, instead of the clean end of stream the socket
        // itself would give now.
        let mut buf = BytesMut::with_capacity(64);
        let err = poll_fn(|cx| local.poll_read_into(cx, &mut buf))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
    }
}
