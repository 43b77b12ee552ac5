//! The echo target (`tether-bench echo-server`, a child process of the benchmark): every byte
//! read is written back, with TCP_NODELAY; an idle connection holds no buffer.

use std::net::SocketAddr;

use anyhow::{Context, Result};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// Bytes read per wake-up. The buffer lives only while a read is being echoed.
const CHUNK: usize = 16 * 1024;

/// Binds `listen`, prints `listening <addr>` on stdout, and echoes until the process is killed.
pub(crate) async fn serve(listen: SocketAddr) -> Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding the echo server to {listen}"))?;
    println!("listening {}", listener.local_addr()?);
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    conns.spawn(echo(stream));
                }
                Err(err) => {
                    // Out of descriptors: wait for connections to close rather than spin.
                    tracing::warn!(error = %err, "echo server: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

async fn echo(mut stream: TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    loop {
        stream.readable().await?;
        let mut buf = vec![0u8; CHUNK];
        let n = match stream.try_read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(err) => return Err(err),
        };
        stream.write_all(&buf[..n]).await?;
    }
}
