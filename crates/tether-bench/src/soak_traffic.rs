//! The soak's traffic: an echo target, and workers that open streams through a forward and
//! transfer sequence-checked bytes, reset connections mid-transfer or close them at once.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Result;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Largest transfer one worker makes (most are far smaller).
const MAX_TRANSFER: u64 = 4 << 20;
/// A transfer that takes longer than this failed (the soak's timeouts are compressed).
const TRANSFER_LIMIT: Duration = Duration::from_secs(30);

/// What the workers did, counted as they go.
#[derive(Debug, Default)]
pub(crate) struct Counts {
    /// Transfers whose echo came back complete and byte-exact.
    pub(crate) transfers_ok: AtomicU64,
    /// Transfers that failed with an error or a timeout (expected around agent restarts).
    pub(crate) transfers_failed: AtomicU64,
    /// Echoes with a wrong byte: never acceptable.
    pub(crate) corrupt: AtomicU64,
    /// Echoes that ended with a clean EOF before every byte came back: a cut stream reported
    /// as finished, never acceptable either.
    pub(crate) short: AtomicU64,
    /// Connections reset on purpose mid-transfer.
    pub(crate) resets: AtomicU64,
    /// Connections opened and closed without data.
    pub(crate) empty: AtomicU64,
    /// Bytes echoed byte-exact.
    pub(crate) bytes: AtomicU64,
}

/// An echo server on 127.0.0.1: echoes until EOF, then passes the EOF on. Stops with `stop`.
pub(crate) async fn echo_target(
    stop: CancellationToken,
    tasks: &mut JoinSet<()>,
) -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tasks.spawn(async move {
        let mut conns = JoinSet::new();
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                accepted = listener.accept() => {
                    let Ok((mut tcp, _)) = accepted else { continue };
                    conns.spawn(async move {
                        let (mut rd, mut wr) = tcp.split();
                        if tokio::io::copy(&mut rd, &mut wr).await.is_ok() {
                            let _ = wr.shutdown().await;
                        }
                    });
                }
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
    });
    Ok(addr)
}

/// The byte at `offset` of the transfer seeded `seed`.
fn pattern(seed: u64, offset: u64) -> u8 {
    let x = (offset ^ seed).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (x >> 56) as u8
}

/// One worker: random operations through `forward` until `stop`.
pub(crate) async fn worker(forward: SocketAddr, counts: Arc<Counts>, stop: CancellationToken) {
    let mut rng = fastrand::Rng::new();
    while !stop.is_cancelled() {
        let roll = rng.u8(0..100);
        if roll < 75 {
            let len = if rng.u8(0..10) == 0 {
                rng.u64(0..=MAX_TRANSFER)
            } else {
                rng.u64(0..=64 << 10)
            };
            let seed = rng.u64(..);
            match tokio::time::timeout(TRANSFER_LIMIT, transfer(forward, seed, len)).await {
                Ok(Ok(Checked::Exact)) => {
                    counts.transfers_ok.fetch_add(1, Ordering::Relaxed);
                    counts.bytes.fetch_add(len, Ordering::Relaxed);
                }
                Ok(Ok(Checked::Wrong { offset })) => {
                    counts.corrupt.fetch_add(1, Ordering::Relaxed);
                    eprintln!("soak: wrong byte at offset {offset} of a {len}-byte echo");
                }
                Ok(Ok(Checked::Short { received })) => {
                    counts.short.fetch_add(1, Ordering::Relaxed);
                    eprintln!("soak: clean EOF after {received} of {len} echoed bytes");
                }
                Ok(Err(_)) | Err(_) => {
                    counts.transfers_failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        } else if roll < 90 {
            let len = rng.u64(1..=64 << 10);
            if let Ok(Ok(())) =
                tokio::time::timeout(TRANSFER_LIMIT, reset_mid_transfer(forward, len)).await
            {
                counts.resets.fetch_add(1, Ordering::Relaxed);
            }
        } else if TcpStream::connect(forward).await.is_ok() {
            counts.empty.fetch_add(1, Ordering::Relaxed);
        }
    }
}

enum Checked {
    Exact,
    /// The first byte that differs.
    Wrong {
        offset: u64,
    },
    /// A clean EOF after this many (correct) bytes.
    Short {
        received: u64,
    },
}

/// Sends `len` pattern bytes, half-closes, and compares the echo byte for byte until EOF.
async fn transfer(forward: SocketAddr, seed: u64, len: u64) -> std::io::Result<Checked> {
    let tcp = TcpStream::connect(forward).await?;
    let (mut rd, mut wr) = tcp.into_split();
    let writer = async move {
        let mut offset = 0u64;
        let mut chunk = Vec::with_capacity(32 << 10);
        while offset < len {
            chunk.clear();
            let n = (len - offset).min(32 << 10);
            chunk.extend((offset..offset + n).map(|o| pattern(seed, o)));
            wr.write_all(&chunk).await?;
            offset += n;
        }
        wr.shutdown().await
    };
    let reader = async move {
        let mut received = 0u64;
        let mut wrong = None;
        let mut buf = vec![0u8; 32 << 10];
        loop {
            let n = rd.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            if wrong.is_none() {
                wrong = buf[..n]
                    .iter()
                    .enumerate()
                    .find(|(i, b)| **b != pattern(seed, received + *i as u64))
                    .map(|(i, _)| received + i as u64);
            }
            received += n as u64;
        }
        Ok::<_, std::io::Error>(match wrong {
            Some(offset) => Checked::Wrong { offset },
            None if received != len => Checked::Short { received },
            None => Checked::Exact,
        })
    };
    let (written, checked) = tokio::join!(writer, reader);
    // A write error means the stream was cut: a failure, whatever the reader saw after it.
    written?;
    checked
}

/// Writes `len` bytes, then resets the connection (SO_LINGER 0) without reading the echo.
async fn reset_mid_transfer(forward: SocketAddr, len: u64) -> std::io::Result<()> {
    let mut tcp = TcpStream::connect(forward).await?;
    let chunk = vec![0x5Au8; len as usize];
    tcp.write_all(&chunk).await?;
    tcp.set_zero_linger()?;
    drop(tcp);
    Ok(())
}
