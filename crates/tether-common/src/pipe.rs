//! The byte pump between a tunneled stream and a local TCP socket: both directions at once,
//! half-close forwarded as shutdown, and the side that failed reported so the caller can turn
//! it into a reset on the other side (never a clean EOF).

use std::io;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};

/// Copy buffer per direction: one large DATA frame.
pub const PIPE_BUFFER: usize = 64 * 1024;

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
pub async fn pipe<T, L>(tunnel: &mut T, local: &mut L) -> Result<PipeTotals, PipeError>
where
    T: AsyncRead + AsyncWrite + Unpin,
    L: AsyncRead + AsyncWrite + Unpin,
{
    let (tunnel_read, mut tunnel_write) = tokio::io::split(tunnel);
    let (local_read, mut local_write) = tokio::io::split(local);
    let mut tunnel_read = BufReader::with_capacity(PIPE_BUFFER, tunnel_read);
    let mut local_read = BufReader::with_capacity(PIPE_BUFFER, local_read);
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
    reader: &mut BufReader<R>,
    writer: &mut W,
    read_side: PipeSide,
    write_side: PipeSide,
) -> Result<u64, PipeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut total = 0u64;
    loop {
        let chunk = reader.fill_buf().await.map_err(|source| PipeError {
            side: read_side,
            source,
        })?;
        if chunk.is_empty() {
            break;
        }
        let n = chunk.len();
        writer.write_all(chunk).await.map_err(|source| PipeError {
            side: write_side,
            source,
        })?;
        reader.consume(n);
        total += n as u64;
    }
    writer.shutdown().await.map_err(|source| PipeError {
        side: write_side,
        source,
    })?;
    Ok(total)
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

    #[tokio::test]
    async fn reports_the_failing_side() {
        let (mut local, _local_peer) = tokio::io::duplex(1024);
        let err = pipe(&mut Failing, &mut local).await.unwrap_err();
        assert_eq!(err.side, PipeSide::Tunnel);
        assert_eq!(err.source.kind(), io::ErrorKind::ConnectionReset);
    }
}
