//! Binding TCP listeners with an accept backlog sized for bursts of connections.
//!
//! `TcpListener::bind` (std, mio, tokio) listens with a backlog of 128. When more connections
//! arrive at once than the accept loop has taken, Linux answers further SYNs with SYN cookies
//! and then drops their final ACKs: the client believes it is connected, the server has no
//! socket, and a client that waits for the server to speak first (MySQL, SMTP, SSH) hangs.
//! The leak tests hit this with 300 simultaneous consumers on a loaded machine.

use std::io;
use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpSocket};

/// Accept backlog of every listener (the kernel caps it at `net.core.somaxconn`).
pub const LISTEN_BACKLOG: u32 = 4096;

/// Binds `addr` with `SO_REUSEADDR` (as `TcpListener::bind` does) and a backlog of
/// [`LISTEN_BACKLOG`]. Must run inside a tokio runtime.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::Duration;

    use tokio::net::TcpStream;
    use tokio::task::JoinSet;

    use super::*;

    /// More simultaneous connects than the default backlog of 128, none accepted yet: every one
    /// is still waiting in the queue when the accept loop gets to it.
    #[tokio::test]
    async fn a_burst_beyond_128_connections_waits_in_the_backlog() {
        const BURST: usize = 400;
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut clients = JoinSet::new();
        for _ in 0..BURST {
            clients.spawn(tokio::time::timeout(
                Duration::from_secs(10),
                TcpStream::connect(addr),
            ));
        }
        let mut connected = Vec::new();
        while let Some(done) = clients.join_next().await {
            connected.push(done.unwrap().unwrap().unwrap());
        }
        let mut accepted = 0;
        while tokio::time::timeout(Duration::from_millis(500), listener.accept())
            .await
            .is_ok_and(|r| r.is_ok())
        {
            accepted += 1;
        }
        assert_eq!(accepted, BURST);
        drop(connected);
    }
}
