//! The soak's partitionable link: a TCP relay between the agents and the server that can
//! black-hole every connection (stop forwarding in both directions and hold the sockets, so
//! no FIN or RST reaches either side) and heal (forwarding resumes where it stopped).

use std::net::SocketAddr;

use anyhow::Result;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Bytes moved per read.
const CHUNK: usize = 32 << 10;

/// The relay's address and its partition switch.
pub(crate) struct PartitionRelay {
    /// Where the agents dial.
    pub(crate) addr: SocketAddr,
    partitioned: watch::Sender<bool>,
}

impl PartitionRelay {
    /// Listens on 127.0.0.1 and relays every connection to `upstream` until `stop`; the
    /// accept loop (which owns the connections) runs in `tasks`.
    pub(crate) async fn start(
        upstream: SocketAddr,
        stop: CancellationToken,
        tasks: &mut JoinSet<()>,
    ) -> Result<PartitionRelay> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (partitioned, healed) = watch::channel(false);
        tasks.spawn(accept_loop(listener, upstream, healed, stop));
        Ok(PartitionRelay { addr, partitioned })
    }

    /// Black-holes (`true`) or heals (`false`) every connection, present and future.
    pub(crate) fn set_partitioned(&self, on: bool) {
        self.partitioned.send_replace(on);
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    healed: watch::Receiver<bool>,
    stop: CancellationToken,
) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => {
                let Ok((down, _)) = accepted else { continue };
                conns.spawn(relay(down, upstream, healed.clone()));
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// One connection: dialed upstream once the link is healed, then both directions pumped
/// until both end (a FIN passed on as a FIN) or one fails (both sockets dropped).
async fn relay(down: TcpStream, upstream: SocketAddr, mut healed: watch::Receiver<bool>) {
    if until_healed(&mut healed).await.is_err() {
        return;
    }
    let Ok(up) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = down.set_nodelay(true);
    let _ = up.set_nodelay(true);
    let (down_rd, down_wr) = down.into_split();
    let (up_rd, up_wr) = up.into_split();
    let _ = tokio::try_join!(
        pump(down_rd, up_wr, healed.clone()),
        pump(up_rd, down_wr, healed)
    );
}

/// Copies `rd` to `wr`, holding still (neither reading nor writing) while partitioned.
async fn pump(
    mut rd: OwnedReadHalf,
    mut wr: OwnedWriteHalf,
    mut healed: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    loop {
        until_healed(&mut healed).await?;
        let n = rd.read(&mut buf).await?;
        if n == 0 {
            return wr.shutdown().await;
        }
        until_healed(&mut healed).await?;
        wr.write_all(&buf[..n]).await?;
    }
}

async fn until_healed(healed: &mut watch::Receiver<bool>) -> std::io::Result<()> {
    healed
        .wait_for(|partitioned| !*partitioned)
        .await
        .map(|_| ())
        .map_err(|_| std::io::Error::other("the relay stopped"))
}
