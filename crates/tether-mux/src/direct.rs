//! Direct delivery: a local TCP socket the session's reader writes received DATA into itself,
//! so that a payload reaches the socket without waking the stream's pump first.
//!
//! The pump still owns the socket's reads, its shutdown and every write that cannot be made at
//! once: the reader writes only when nothing of the stream is buffered or held by the pump,
//! with one non-blocking `try_write`, and leaves whatever did not fit in the stream's buffer for
//! the pump (which also meets any write error there). So the order of bytes is kept, no byte
//! is written twice, and the reader never waits on a consumer.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::BytesMut;
use tokio::io::{AsyncWrite, Interest};
use tokio::net::TcpStream;

use crate::MuxStream;
use crate::pipe::{LocalRead, PipeError, PipeTotals, pipe};

/// A local TCP socket shared between a stream's pump and the session's reader.
#[derive(Debug)]
pub struct DirectTcp {
    tcp: Arc<TcpStream>,
}

impl DirectTcp {
    /// Wraps a connected socket.
    pub fn new(tcp: TcpStream) -> Self {
        Self { tcp: Arc::new(tcp) }
    }

    /// The socket (for its addresses and options, e.g. a zero linger before a reset).
    pub fn get_ref(&self) -> &TcpStream {
        &self.tcp
    }
}

impl LocalRead for DirectTcp {
    fn poll_read_into(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.tcp.poll_read_ready(cx))?;
            let room = buf.capacity() - buf.len();
            let mut read = None;
            // As tokio's own reads do: a read that did not fill the buffer emptied the socket,
            // so its readiness is cleared at once instead of by a second read failing with
            // WouldBlock. `try_io` clears only the readiness seen before the read, so an
            // arrival during the read is not lost.
            let result = self.tcp.try_io(Interest::READABLE, || {
                let n = self.tcp.try_read_buf(buf)?;
                read = Some(n);
                if n > 0 && n < room {
                    Err(io::ErrorKind::WouldBlock.into())
                } else {
                    Ok(n)
                }
            });
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
pub(crate) fn try_write(tcp: &TcpStream, data: &[u8]) -> io::Result<usize> {
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
        loop {
            ready!(self.tcp.poll_write_ready(cx))?;
            match try_write(&self.tcp, buf) {
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => continue,
                result => return Poll::Ready(result),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        let result = socket2::SockRef::from(&*self.tcp).shutdown(std::net::Shutdown::Write);
        Poll::Ready(match result {
            // The peer already closed both ways: nothing left to tell it.
            Err(err) if err.kind() == io::ErrorKind::NotConnected => Ok(()),
            other => other,
        })
    }
}

/// [`pipe`] with direct delivery: while it runs, the session's reader may write `stream`'s
/// received bytes straight into `local`. `to_local` counts both kinds of delivery.
pub async fn pipe_direct(
    stream: &mut MuxStream,
    local: &mut DirectTcp,
) -> Result<PipeTotals, PipeError> {
    let attached = Attached {
        stream: stream.attach_sink(local.tcp.clone()),
    };
    let result = pipe(stream, local).await;
    let direct = attached.stream.detach_sink();
    result.map(|mut totals| {
        totals.to_local += direct;
        totals.to_local_direct = direct;
        totals
    })
}

/// Detaches the socket from the stream when the pipe ends or is dropped, so that the reader
/// never writes into a socket whose pump has gone.
struct Attached {
    stream: crate::stream::SinkHandle,
}

impl Drop for Attached {
    fn drop(&mut self) {
        self.stream.detach_sink();
    }
}
