//! A TCP echo server for tests: echoes each connection until EOF, then half-closes, so that
//! tunnels can be checked for byte fidelity and half-close propagation.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

/// Owns a running echo server; dropping it stops the server and closes its connections.
#[derive(Debug)]
pub struct EchoHandle {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl EchoHandle {
    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// How many connections were accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Stops the server and waits until the listener and every connection are closed.
    pub async fn stop(mut self) {
        self.task.abort();
        // Cancelled is the expected outcome; a panic inside the server would also end here.
        let _ = (&mut self.task).await;
    }
}

impl Drop for EchoHandle {
    fn drop(&mut self) {
        // Dropping the accept task drops its `JoinSet`, which aborts the connection tasks.
        self.task.abort();
    }
}

/// Starts an echo server on `127.0.0.1:0`.
///
/// Each connection gets back every byte it sends, as it arrives; after the client's EOF the
/// server shuts down its write side. Panics if it cannot bind (tests only).
pub async fn echo_server() -> (SocketAddr, EchoHandle) {
    let listener = TcpListener::bind(("127.0.0.1", 0))
        .await
        .expect("bind the echo server on 127.0.0.1:0");
    let addr = listener.local_addr().expect("echo server local address");
    let accepted = Arc::new(AtomicUsize::new(0));
    let task = tokio::spawn(accept_loop(listener, accepted.clone()));
    (
        addr,
        EchoHandle {
            addr,
            accepted,
            task,
        },
    )
}

async fn accept_loop(listener: TcpListener, accepted: Arc<AtomicUsize>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            res = listener.accept() => match res {
                Ok((stream, _peer)) => {
                    accepted.fetch_add(1, Ordering::SeqCst);
                    connections.spawn(echo(stream));
                }
                // Transient (e.g. a connection reset before accept): keep serving.
                Err(_) => tokio::task::yield_now().await,
            },
            // Reap finished connections so the set does not grow without bound.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn echo(mut stream: TcpStream) -> std::io::Result<()> {
    let (mut reader, mut writer) = stream.split();
    tokio::io::copy(&mut reader, &mut writer).await?;
    writer.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn echoes_until_eof_then_half_closes() {
        let (addr, handle) = echo_server().await;
        assert_eq!(handle.addr(), addr);
        let mut conn = TcpStream::connect(addr).await.unwrap();
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let (mut r, mut w) = conn.split();
        let write = async {
            w.write_all(&data).await.unwrap();
            w.shutdown().await.unwrap();
        };
        let mut echoed = Vec::new();
        let read = r.read_to_end(&mut echoed);
        let ((), n) = tokio::join!(write, read);
        assert_eq!(n.unwrap(), data.len());
        assert_eq!(echoed, data);
        assert_eq!(handle.accepted(), 1);
    }

    #[tokio::test]
    async fn echoes_interactively_before_eof() {
        let (addr, handle) = echo_server().await;
        let mut conn = TcpStream::connect(addr).await.unwrap();
        for msg in [&b"ping"[..], b"pong"] {
            conn.write_all(msg).await.unwrap();
            let mut buf = [0u8; 4];
            conn.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, msg);
        }
        let mut second = TcpStream::connect(addr).await.unwrap();
        second.write_all(b"x").await.unwrap();
        let mut buf = [0u8; 1];
        second.read_exact(&mut buf).await.unwrap();
        assert_eq!(handle.accepted(), 2);
    }

    #[tokio::test]
    async fn stop_closes_open_connections() {
        let (addr, handle) = echo_server().await;
        let mut conn = TcpStream::connect(addr).await.unwrap();
        conn.write_all(b"hi").await.unwrap();
        let mut buf = [0u8; 2];
        conn.read_exact(&mut buf).await.unwrap();
        handle.stop().await;
        // The server side of the connection is gone: EOF or reset, never more data.
        let mut rest = Vec::new();
        match conn.read_to_end(&mut rest).await {
            Ok(n) => assert_eq!(n, 0),
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset),
        }
    }

    #[tokio::test]
    async fn drop_closes_open_connections() {
        let (addr, handle) = echo_server().await;
        let mut conn = TcpStream::connect(addr).await.unwrap();
        conn.write_all(b"hi").await.unwrap();
        let mut buf = [0u8; 2];
        conn.read_exact(&mut buf).await.unwrap();
        drop(handle);
        // Completes only once the aborted connection task has dropped its socket.
        let mut rest = Vec::new();
        match conn.read_to_end(&mut rest).await {
            Ok(n) => assert_eq!(n, 0),
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset),
        }
    }
}
