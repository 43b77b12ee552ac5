//! Idle memory: N connections through an entry, each echoing one byte and then held open;
//! the tunnel's RSS before, while they are open, and a while after they are closed.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use crate::process_stats;
use crate::record::Record;

/// Connections being opened at once.
const IN_FLIGHT: usize = 64;
/// One connection's open-and-echo, and one verifying echo.
const PER_CONN: Duration = Duration::from_secs(10);

/// Idle test parameters.
#[derive(Debug, Clone, Copy)]
pub(crate) struct IdleSpec {
    pub(crate) count: usize,
    /// Wait after opening before RSS is read.
    pub(crate) settle: Duration,
    /// Wait after closing before RSS is read again.
    pub(crate) close_settle: Duration,
}

async fn echo_byte(tcp: &mut TcpStream, byte: u8) -> Result<()> {
    tokio::time::timeout(PER_CONN, async {
        tcp.write_all(&[byte]).await?;
        let mut back = [0u8; 1];
        tcp.read_exact(&mut back).await?;
        ensure!(back[0] == byte, "echo returned {back:?}");
        Ok(())
    })
    .await
    .context("echo timed out")?
}

async fn open_one(entry: SocketAddr) -> Result<TcpStream> {
    let mut tcp = tokio::time::timeout(PER_CONN, TcpStream::connect(entry))
        .await
        .context("connect timed out")??;
    echo_byte(&mut tcp, b'x').await?;
    Ok(tcp)
}

/// Opens `count` connections, at most [`IN_FLIGHT`] at a time; fails at the first that fails.
async fn open_many(entry: SocketAddr, count: usize) -> Result<Vec<TcpStream>> {
    let mut open = Vec::with_capacity(count);
    let mut pending = JoinSet::new();
    let mut started = 0;
    while open.len() < count {
        while started < count && pending.len() < IN_FLIGHT {
            pending.spawn(open_one(entry));
            started += 1;
        }
        let joined = pending.join_next().await.context("no connection pending")?;
        open.push(joined.context("an opening task")??);
    }
    Ok(open)
}

/// A second echo on every held connection, [`IN_FLIGHT`] at a time: did all survive?
async fn verify_all(conns: &mut [TcpStream]) -> Result<()> {
    for batch in conns.chunks_mut(IN_FLIGHT) {
        for tcp in batch.iter_mut() {
            tcp.write_all(b"y").await?;
        }
        for tcp in batch.iter_mut() {
            let mut back = [0u8; 1];
            tokio::time::timeout(PER_CONN, tcp.read_exact(&mut back))
                .await
                .context("a held connection's echo timed out")??;
            ensure!(&back == b"y", "a held connection echoed {back:?}");
        }
    }
    Ok(())
}

/// The idle test of `spec.count` connections through `entry`; RSS of `pids`.
pub(crate) async fn run(label: &str, entry: SocketAddr, pids: &[u32], spec: IdleSpec) -> Record {
    let test = format!("idle{}", spec.count);
    match measure(entry, pids, spec).await {
        Ok((before, open, closed)) => {
            let grown = open.saturating_sub(before) as f64 * 1024.0;
            let given_back = open.saturating_sub(closed) as f64 * 1024.0;
            Record {
                ok: true,
                opened_ok: Some(spec.count as u64),
                bytes_per_conn: Some(grown / spec.count as f64),
                returned_pct: (grown > 0.0).then(|| 100.0 * given_back / grown),
                rss_kib: Some(closed),
                ..Record::new(label, &test)
            }
        }
        Err(err) => Record::failed(label, &test, &err),
    }
}

/// RSS (KiB) before, with all open, and after closing.
async fn measure(entry: SocketAddr, pids: &[u32], spec: IdleSpec) -> Result<(u64, u64, u64)> {
    let before = process_stats::rss_total_kib(pids)?;
    let mut conns = open_many(entry, spec.count).await?;
    tokio::time::sleep(spec.settle).await;
    let open = process_stats::rss_total_kib(pids)?;
    verify_all(&mut conns).await?;
    drop(conns);
    tokio::time::sleep(spec.close_settle).await;
    let closed = process_stats::rss_total_kib(pids)?;
    Ok((before, open, closed))
}
