//! A TCP relay that holds every byte for a fixed one-way delay before passing it on: latency
//! for the fault tests, because this kernel has no `netem` (`tc qdisc ... netem delay` is not
//! available). Each direction is a bounded queue of timestamped chunks; the end of one side is
//! passed on after the same delay.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Chunks in flight per direction: with 16 KiB reads, at most 4 MiB held per direction.
const QUEUE: usize = 256;
const CHUNK: usize = 16 * 1024;

/// A running relay; its tasks (and every relayed connection) end when it is dropped.
pub struct DelayRelay {
    addr: SocketAddr,
    _tasks: JoinSet<()>,
}

impl DelayRelay {
    /// Listens on `listen` and relays each connection to `upstream`, each byte `one_way` late
    /// in both directions (a round trip of twice `one_way` on top of the links').
    pub async fn start(
        listen: SocketAddr,
        upstream: SocketAddr,
        one_way: Duration,
    ) -> io::Result<Self> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let mut tasks = JoinSet::new();
        tasks.spawn(accept_loop(listener, upstream, one_way));
        Ok(Self {
            addr,
            _tasks: tasks,
        })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

async fn accept_loop(listener: TcpListener, upstream: SocketAddr, one_way: Duration) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((down, _)) = accepted else { continue };
                conns.spawn(relay(down, upstream, one_way));
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

async fn relay(down: TcpStream, upstream: SocketAddr, one_way: Duration) {
    let Ok(up) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = down.set_nodelay(true);
    let _ = up.set_nodelay(true);
    let (down_rd, down_wr) = down.into_split();
    let (up_rd, up_wr) = up.into_split();
    tokio::join!(
        direction(down_rd, up_wr, one_way),
        direction(up_rd, down_wr, one_way)
    );
}

/// Reads `from`, and writes each chunk to `to` once it is `delay` old; then passes the EOF on.
async fn direction(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, delay: Duration) {
    let (tx, mut rx) = mpsc::channel::<(Instant, Option<Vec<u8>>)>(QUEUE);
    let reader = async move {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let chunk = match from.read(&mut buf).await {
                Ok(0) | Err(_) => None,
                Ok(n) => Some(buf[..n].to_vec()),
            };
            let end = chunk.is_none();
            if tx.send((Instant::now() + delay, chunk)).await.is_err() || end {
                return;
            }
        }
    };
    let writer = async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            match chunk {
                Some(bytes) => {
                    if to.write_all(&bytes).await.is_err() {
                        return;
                    }
                }
                None => {
                    let _ = to.shutdown().await;
                    return;
                }
            }
        }
    };
    // The reader ends after passing the EOF on; the writer then delivers what is queued. The
    // writer ending first (the far side failed) ends the reader too.
    tokio::pin!(writer);
    tokio::select! {
        () = reader => writer.await,
        () = &mut writer => {}
    }
}
