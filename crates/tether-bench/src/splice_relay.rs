//! The floor: a plain TCP relay (`tether-bench splice-relay`, one process per side) that
//! moves bytes socket -> pipe -> socket with splice(2): no TLS, no framing, no user-space copy.
//! Two of them in a row are the cheapest two-process tunnel a byte can cross.

use std::io;
use std::net::SocketAddr;

use anyhow::{Context, Result};
use rustix::pipe::{PipeFlags, SpliceFlags, fcntl_setpipe_size, pipe_with, splice};
use tokio::io::Interest;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// The pipe between the two sockets of one direction; a splice moves at most this much.
const PIPE_BYTES: usize = 256 * 1024;

/// One listener and where its connections go.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Route {
    pub(crate) listen: SocketAddr,
    pub(crate) upstream: SocketAddr,
}

/// Parses `LISTEN=UPSTREAM`.
pub(crate) fn parse_route(text: &str) -> Result<Route> {
    let (listen, upstream) = text
        .split_once('=')
        .with_context(|| format!("route {text:?}: expected LISTEN=UPSTREAM"))?;
    Ok(Route {
        listen: listen
            .parse()
            .with_context(|| format!("route {text:?}: listen address {listen:?}"))?,
        upstream: upstream
            .parse()
            .with_context(|| format!("route {text:?}: upstream address {upstream:?}"))?,
    })
}

/// Binds every route, prints `listening <addr>` for each (in order), and relays until killed.
pub(crate) async fn serve(routes: &[Route]) -> Result<()> {
    let mut loops = JoinSet::new();
    for route in routes {
        let listener = TcpListener::bind(route.listen)
            .await
            .with_context(|| format!("binding {}", route.listen))?;
        println!("listening {}", listener.local_addr()?);
        loops.spawn(accept_loop(listener, route.upstream));
    }
    while let Some(done) = loops.join_next().await {
        done.context("an accept loop")?;
    }
    Ok(())
}

/// Accepts on `listener` and relays each connection to `upstream`, until dropped.
pub(crate) async fn accept_loop(listener: TcpListener, upstream: SocketAddr) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((client, _)) => {
                    conns.spawn(async move {
                        if let Err(err) = relay(client, upstream).await {
                            tracing::debug!(error = %err, "splice relay: connection ended");
                        }
                    });
                }
                Err(err) => {
                    tracing::warn!(error = %err, "splice relay: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// Connects to `upstream` and splices both directions until both have ended (half-close kept).
async fn relay(client: TcpStream, upstream: SocketAddr) -> io::Result<()> {
    let server = TcpStream::connect(upstream).await?;
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    tokio::try_join!(pump(&client, &server), pump(&server, &client))?;
    Ok(())
}

/// Moves bytes from `src` to `dst` through a pipe until `src` ends, then shuts `dst`'s write
/// side. The pipe is empty before every read, so EAGAIN from a splice can only be the socket's.
async fn pump(src: &TcpStream, dst: &TcpStream) -> io::Result<u64> {
    let (pipe_out, pipe_in) = pipe_with(PipeFlags::NONBLOCK | PipeFlags::CLOEXEC)?;
    // A larger pipe means fewer splices; the default (64 KiB) if the system refuses.
    let capacity = fcntl_setpipe_size(&pipe_in, PIPE_BYTES).unwrap_or(64 * 1024);
    let flags = SpliceFlags::MOVE | SpliceFlags::NONBLOCK;
    let mut total = 0u64;
    loop {
        let read = src
            .async_io(Interest::READABLE, || {
                splice(src, None, &pipe_in, None, capacity, flags).map_err(io::Error::from)
            })
            .await?;
        if read == 0 {
            socket2::SockRef::from(dst).shutdown(std::net::Shutdown::Write)?;
            return Ok(total);
        }
        let mut left = read;
        while left > 0 {
            left -= dst
                .async_io(Interest::WRITABLE, || {
                    splice(&pipe_out, None, dst, None, left, flags).map_err(io::Error::from)
                })
                .await?;
        }
        total += read as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A target that echoes everything and closes after the client's half-close.
    async fn echo_target() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = tcp.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        });
        addr
    }

    async fn relay_to(upstream: SocketAddr) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(accept_loop(listener, upstream));
        addr
    }

    #[tokio::test]
    async fn two_relays_in_a_row_deliver_every_byte_and_the_half_close() {
        let target = echo_target().await;
        let entry = relay_to(relay_to(target).await).await;
        let data: Vec<u8> = (0..6_000_000u32).map(|i| (i ^ (i >> 11)) as u8).collect();
        let tcp = TcpStream::connect(entry).await.unwrap();
        let (mut r, mut w) = tcp.into_split();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            w.write_all(&sent).await.unwrap();
            w.shutdown().await.unwrap();
        });
        let mut back = Vec::new();
        // EOF arrives only if the half-close crossed both relays and the target's came back.
        tokio::time::timeout(std::time::Duration::from_secs(60), r.read_to_end(&mut back))
            .await
            .expect("the echo did not end")
            .unwrap();
        writer.await.unwrap();
        assert_eq!(back.len(), data.len());
        assert!(back == data, "the bytes differ");
    }

    #[test]
    fn parses_routes() {
        let route = parse_route("127.0.0.1:0=127.0.0.1:5201").unwrap();
        assert_eq!(route.upstream.port(), 5201);
        assert!(parse_route("127.0.0.1:0").is_err());
        assert!(parse_route("x=127.0.0.1:1").is_err());
    }
}
