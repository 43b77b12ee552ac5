//! Minimal HTTP/1.0 for tests: a GET client (admin endpoints, the Prometheus API, requests
//! through forwards) and a target server that answers every request with a fixed 200.

use std::io;
use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The body the target answers with.
pub const TARGET_BODY: &str = "tether-ok\n";

/// Largest response the client reads (the Prometheus API answers stay far below).
const MAX_RESPONSE: u64 = 16 << 20;
/// Largest request head the target reads.
const MAX_REQUEST: usize = 8 << 10;

/// A response: status code and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The body, as text.
    pub body: String,
}

/// `GET path` on `addr` over HTTP/1.0 (the server delimits the body by closing, so neither
/// chunked encoding nor keep-alive is involved).
pub async fn get(addr: SocketAddr, path: &str) -> io::Result<Response> {
    let mut stream = TcpStream::connect(addr).await?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut raw = Vec::new();
    (&mut stream)
        .take(MAX_RESPONSE)
        .read_to_end(&mut raw)
        .await?;
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> io::Result<Response> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
    let head_end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no end of response head"))?;
    let head = std::str::from_utf8(&raw[..head_end]).map_err(|_| bad("head is not UTF-8"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no status code"))?;
    let body = String::from_utf8_lossy(&raw[head_end + 4..]).into_owned();
    Ok(Response { status, body })
}

/// An HTTP server on `127.0.0.1:0` answering every request with 200 and [`TARGET_BODY`], then
/// closing. Dropping it stops the listener and its connections (they watch one token);
/// [`HttpTarget::stop`] also waits until they are gone.
pub struct HttpTarget {
    /// The bound address.
    pub addr: SocketAddr,
    stop: CancellationToken,
    tracker: TaskTracker,
}

impl HttpTarget {
    /// Binds and starts serving.
    pub async fn start() -> io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let stop = CancellationToken::new();
        let tracker = TaskTracker::new();
        tracker.spawn(accept_loop(listener, stop.clone(), tracker.clone()));
        Ok(Self {
            addr,
            stop,
            tracker,
        })
    }

    /// Stops accepting and waits for the open connections to finish.
    pub async fn stop(self) {
        self.stop.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

impl Drop for HttpTarget {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn accept_loop(listener: TcpListener, stop: CancellationToken, tracker: TaskTracker) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop.cancelled() => return,
        };
        match accepted {
            Ok((stream, _)) => {
                let stop = stop.clone();
                tracker.spawn(async move {
                    tokio::select! {
                        _ = answer(stream) => {}
                        () = stop.cancelled() => {}
                    }
                });
            }
            // Out of fds or a connection reset before accept: wait instead of spinning.
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
        }
    }
}

async fn answer(mut stream: TcpStream) -> io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 || head.len() + n > MAX_REQUEST {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let response = format!(
        "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{TARGET_BODY}",
        TARGET_BODY.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// One short HTTP request through `forward` to an [`HttpTarget`]; fails unless the answer is
/// the target's 200.
pub async fn request_through(forward: SocketAddr) -> io::Result<()> {
    let response = get(forward, "/").await?;
    if response.status != 200 || response.body != TARGET_BODY {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected answer {response:?}"),
        ));
    }
    Ok(())
}
