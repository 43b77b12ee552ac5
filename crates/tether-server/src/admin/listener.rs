//! Serving the admin router on its listener with bounds: a connection cap, a deadline for each
//! request head and an idle timeout, so idle or slow clients cannot exhaust descriptors.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use tracing::{debug, warn};

use crate::accept::accept;
use tether_common::log_throttle::LogThrottle;

/// The bounds of the admin listener.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AdminLimits {
    /// Connections served at once; further ones are closed at accept.
    pub(crate) max_connections: usize,
    /// A request head must arrive whole within this.
    pub(crate) header_read_timeout: Duration,
    /// A connection with no bytes in either direction for this long is closed.
    pub(crate) idle_timeout: Duration,
}

/// What the server uses: enough for a few scrapers and operators, far below any fd limit.
pub(crate) const ADMIN_LIMITS: AdminLimits = AdminLimits {
    max_connections: 128,
    header_read_timeout: Duration::from_secs(5),
    idle_timeout: Duration::from_secs(10),
};

/// Serves `router` on `listener` until `stop` is cancelled; the connections end with it.
pub(crate) async fn serve(
    listener: TcpListener,
    router: axum::Router,
    limits: AdminLimits,
    stop: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let log = LogThrottle::new(Duration::from_secs(60));
    let mut connections = JoinSet::new();
    while let Some((tcp, peer)) = accept(&listener, &stop, &log).await {
        while connections.try_join_next().is_some() {}
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            match log.check("admin_limit") {
                Some(suppressed) => warn!(
                    peer.addr = %peer,
                    suppressed,
                    max = limits.max_connections,
                    "too many admin connections; closing new ones"
                ),
                None => debug!(peer.addr = %peer, "admin connection refused: limit"),
            }
            continue;
        };
        connections.spawn(serve_connection(tcp, router.clone(), limits, permit));
    }
}

async fn serve_connection(
    tcp: TcpStream,
    router: axum::Router,
    limits: AdminLimits,
    _permit: OwnedSemaphorePermit,
) {
    let last = Arc::new(Mutex::new(Instant::now()));
    let io = Active {
        inner: tcp,
        last: last.clone(),
    };
    let service = hyper::service::service_fn(move |req| router.clone().oneshot(req));
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    loop {
        let idle_until = *last.lock().unwrap_or_else(|e| e.into_inner()) + limits.idle_timeout;
        tokio::select! {
            _ = &mut conn => return,
            _ = tokio::time::sleep_until(idle_until) => {
                let seen = *last.lock().unwrap_or_else(|e| e.into_inner());
                if seen + limits.idle_timeout <= Instant::now() {
                    break;
                }
            }
        }
    }
    // Idle: a request in flight may still finish, briefly; a connection between requests ends.
    conn.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(limits.header_read_timeout, conn).await;
}

/// A socket that notes when bytes last moved in either direction.
struct Active {
    inner: TcpStream,
    last: Arc<Mutex<Instant>>,
}

impl Active {
    fn touch(&self) {
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }
}

impl AsyncRead for Active {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(poll, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.touch();
        }
        poll
    }
}

impl AsyncWrite for Active {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(poll, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        poll
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn start(limits: AdminLimits) -> (std::net::SocketAddr, CancellationToken) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let router = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
        let stop = CancellationToken::new();
        tokio::spawn(serve(listener, router, limits, stop.clone()));
        (addr, stop)
    }

    /// Reads until the server closes; the time that took.
    async fn closed_after(tcp: &mut TcpStream) -> Duration {
        let started = Instant::now();
        let mut buf = [0u8; 1024];
        loop {
            match tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return started.elapsed(),
                Ok(Ok(_)) => {}
                Err(_) => panic!("the server kept the connection open"),
            }
        }
    }

    #[tokio::test]
    async fn a_keep_alive_connection_idle_past_the_timeout_is_closed() {
        let (addr, stop) = start(AdminLimits {
            max_connections: 4,
            header_read_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_millis(300),
        })
        .await;
        let mut tcp = TcpStream::connect(addr).await.expect("connect");
        tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("request");
        let took = closed_after(&mut tcp).await;
        assert!(took < Duration::from_secs(3), "closed after {took:?}");
        stop.cancel();
    }

    #[tokio::test]
    async fn an_unfinished_request_head_is_closed_after_the_header_timeout() {
        let (addr, stop) = start(AdminLimits {
            max_connections: 4,
            header_read_timeout: Duration::from_millis(300),
            idle_timeout: Duration::from_secs(30),
        })
        .await;
        let mut tcp = TcpStream::connect(addr).await.expect("connect");
        tcp.write_all(b"GET / HTTP/1.1\r\n").await.expect("part");
        let took = closed_after(&mut tcp).await;
        assert!(took < Duration::from_secs(3), "closed after {took:?}");
        stop.cancel();
    }
}
