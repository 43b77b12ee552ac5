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
/// A worker's pause after an operation failed.
const FAILED_PAUSE: Duration = Duration::from_millis(50);

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
    /// Server SIGKILLs so far, bumped by the fault loop before each kill.
    pub(crate) server_kills: AtomicU64,
    /// Clean EOFs before the last byte of echoes that overlapped a server SIGKILL: the kernel
    /// closes a killed process's sockets with a FIN when no data is unread, so these are failed
    /// transfers (also counted in `transfers_failed`), not defects.
    pub(crate) cut_by_server_kill: AtomicU64,
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
        let succeeded = if roll < 75 {
            let len = if rng.u8(0..10) == 0 {
                rng.u64(0..=MAX_TRANSFER)
            } else {
                rng.u64(0..=64 << 10)
            };
            let seed = rng.u64(..);
            let kills = counts.server_kills.load(Ordering::SeqCst);
            let checked = tokio::time::timeout(TRANSFER_LIMIT, transfer(forward, seed, len)).await;
            let killed = counts.server_kills.load(Ordering::SeqCst) != kills;
            count(&counts, checked, len, killed)
        } else if roll < 90 {
            let len = rng.u64(1..=64 << 10);
            let reset =
                tokio::time::timeout(TRANSFER_LIMIT, reset_mid_transfer(forward, len)).await;
            let done = matches!(reset, Ok(Ok(())));
            if done {
                counts.resets.fetch_add(1, Ordering::Relaxed);
            }
            done
        } else {
            let done = TcpStream::connect(forward).await.is_ok();
            if done {
                counts.empty.fetch_add(1, Ordering::Relaxed);
            }
            done
        };
        if !succeeded {
            // The server is restarting or the link is cut: do not spin on refused connects.
            tokio::time::sleep(FAILED_PAUSE).await;
        }
    }
}

/// Counts one transfer's outcome; `killed`: a server SIGKILL happened while it ran. Whether
/// it came back byte-exact.
fn count(
    counts: &Counts,
    checked: Result<std::io::Result<Checked>, tokio::time::error::Elapsed>,
    len: u64,
    killed: bool,
) -> bool {
    match checked {
        Ok(Ok(Checked::Exact)) => {
            counts.transfers_ok.fetch_add(1, Ordering::Relaxed);
            counts.bytes.fetch_add(len, Ordering::Relaxed);
            return true;
        }
        Ok(Ok(Checked::Wrong { offset, got })) => {
            counts.corrupt.fetch_add(1, Ordering::Relaxed);
            eprintln!("soak: wrong byte {got:#04x} at offset {offset} of a {len}-byte echo");
        }
        Ok(Ok(Checked::Short { received })) if killed => {
            counts.transfers_failed.fetch_add(1, Ordering::Relaxed);
            counts.cut_by_server_kill.fetch_add(1, Ordering::Relaxed);
            eprintln!("soak: clean EOF after {received} of {len} bytes across a server SIGKILL");
        }
        Ok(Ok(Checked::Short { received })) => {
            counts.short.fetch_add(1, Ordering::Relaxed);
            eprintln!("soak: clean EOF after {received} of {len} echoed bytes");
        }
        Ok(Err(_)) | Err(_) => {
            counts.transfers_failed.fetch_add(1, Ordering::Relaxed);
        }
    }
    false
}

enum Checked {
    Exact,
    /// The first byte that differs (or the first byte past the end), and its value.
    Wrong {
        offset: u64,
        got: u8,
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
                    .find(|(i, b)| {
                        let at = received + *i as u64;
                        at >= len || **b != pattern(seed, at)
                    })
                    .map(|(i, b)| (received + i as u64, *b));
            }
            received += n as u64;
        }
        Ok::<_, std::io::Error>(match wrong {
            Some((offset, got)) => Checked::Wrong { offset, got },
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
