//! Sockets for tests: loopback listeners on ephemeral ports, and a plain HTTP GET.

use std::net::SocketAddr;

use tokio::net::TcpListener;

use crate::wait::WAIT;

/// A listener on `127.0.0.1:0` with the daemons' accept backlog (`tether_common::listen`), so
/// that bursts of test connections behave as against the binary.
pub fn bind_loopback() -> std::io::Result<TcpListener> {
    tether_common::listen::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
}

/// A port free on 127.0.0.1 to 127.0.0.`n` at once (checked by binding each), for replicas
/// that share one port on their own loopback addresses.
pub fn common_port_on(n: u8) -> u16 {
    for _ in 0..50 {
        let first = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = first.local_addr().expect("a local address").port();
        if (2..=n).all(|i| {
            std::net::TcpListener::bind((std::net::Ipv4Addr::new(127, 0, 0, i), port)).is_ok()
        }) {
            return port;
        }
    }
    panic!("no port free on all {n} loopback addresses");
}

/// A plain HTTP/1.0 `GET path` to `addr` (an admin listener); the status code and body.
/// Panics when no answer comes within [`WAIT`].
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut tcp = tokio::net::TcpStream::connect(addr).await?;
        tcp.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await?;
        let mut raw = Vec::new();
        tcp.read_to_end(&mut raw).await?;
        Ok::<_, std::io::Error>(raw)
    };
    let raw = tokio::time::timeout(WAIT, exchange)
        .await
        .expect("admin answers in time")
        .expect("admin request");
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP answer");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status code");
    (status, body.to_owned())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn http_get_reads_status_and_body() {
        let listener = bind_loopback().unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 256];
            let n = socket.read(&mut request).await.unwrap();
            let request = String::from_utf8_lossy(&request[..n]).into_owned();
            socket
                .write_all(b"HTTP/1.0 503 Service Unavailable\r\nX: y\r\n\r\nnot ready")
                .await
                .unwrap();
            request
        });
        assert_eq!(
            http_get(addr, "/readyz").await,
            (503, "not ready".to_owned())
        );
        assert!(
            server
                .await
                .unwrap()
                .starts_with("GET /readyz HTTP/1.0\r\n")
        );
    }
}
