//! The WAN emulator (this kernel has no netem): a TCP relay in the benchmark's process on a
//! tunnel's link that holds every byte for the one-way delay and paces each direction to the
//! link rate, shared by all connections through it. A new connection pays one round trip
//! before its first byte, as a TCP handshake over the path would.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Bytes read at once from a socket.
const CHUNK: usize = 64 * 1024;
/// Chunks queued per direction of one connection (bytes are bounded by the budget too).
const QUEUE_CHUNKS: usize = 8192;

/// The emulated path.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct LinkSpec {
    /// Each byte's delay, one way (half the round trip).
    pub(crate) one_way: Duration,
    /// Bytes per second, each direction.
    pub(crate) rate: f64,
}

impl LinkSpec {
    /// From a round trip in milliseconds and a rate in Mbit/s.
    pub(crate) fn new(rtt_ms: u64, mbit_per_s: f64) -> Result<LinkSpec> {
        if rtt_ms == 0 || !(mbit_per_s > 0.0 && mbit_per_s.is_finite()) {
            bail!(
                "the WAN path needs a round trip above 0 ms and a rate above 0 Mbit/s (got {rtt_ms} ms, {mbit_per_s} Mbit/s)"
            );
        }
        Ok(LinkSpec {
            one_way: Duration::from_micros(rtt_ms * 500),
            rate: mbit_per_s * 1e6 / 8.0,
        })
    }

    /// Bytes one direction of a connection may hold: what the path holds in flight plus a
    /// queue of half the one-way delay (a router buffer), at least 256 KiB.
    fn budget(&self) -> usize {
        let bytes = self.rate * self.one_way.as_secs_f64() * 1.5;
        (bytes as usize).max(256 * 1024)
    }

    fn serialization(&self, bytes: usize) -> Duration {
        Duration::from_secs_f64(bytes as f64 / self.rate)
    }
}

/// One direction of the link: when it is free to send the next byte.
struct Direction {
    busy_until: Mutex<Instant>,
}

impl Direction {
    fn new() -> Direction {
        Direction {
            busy_until: Mutex::new(Instant::now()),
        }
    }

    /// When `bytes` read now arrive at the far end: after the ones before them have left,
    /// their own serialization at the link rate, and the one-way delay.
    fn schedule(&self, spec: &LinkSpec, now: Instant, bytes: usize) -> Instant {
        let mut busy = self.busy_until.lock().unwrap_or_else(|e| e.into_inner());
        let departs = (*busy).max(now) + spec.serialization(bytes);
        *busy = departs;
        departs + spec.one_way
    }
}

/// Both directions of one emulated link.
struct Link {
    spec: LinkSpec,
    /// Towards the upstream (the dialled side).
    up: Direction,
    /// Towards the dialling side.
    down: Direction,
}

/// A running delay relay: one listener per upstream, all sharing one link. Dropping it stops
/// every listener and connection.
pub(crate) struct DelayRelay {
    /// Listen addresses, in the order of the upstreams given.
    pub(crate) addrs: Vec<SocketAddr>,
    _loops: JoinSet<()>,
}

impl DelayRelay {
    /// Listens on a loopback port for each of `upstreams`.
    pub(crate) async fn start(upstreams: &[SocketAddr], spec: LinkSpec) -> Result<DelayRelay> {
        let link = Arc::new(Link {
            spec,
            up: Direction::new(),
            down: Direction::new(),
        });
        let mut loops = JoinSet::new();
        let mut addrs = Vec::with_capacity(upstreams.len());
        for &upstream in upstreams {
            let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
                .await
                .context("binding the delay relay")?;
            addrs.push(listener.local_addr()?);
            loops.spawn(accept_loop(listener, upstream, link.clone()));
        }
        Ok(DelayRelay {
            addrs,
            _loops: loops,
        })
    }
}

async fn accept_loop(listener: TcpListener, upstream: SocketAddr, link: Arc<Link>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((client, _)) => {
                    let link = link.clone();
                    conns.spawn(async move {
                        if let Err(err) = relay(client, upstream, link).await {
                            tracing::debug!(error = %err, "delay relay: connection ended");
                        }
                    });
                }
                Err(err) => {
                    tracing::warn!(error = %err, "delay relay: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

async fn relay(client: TcpStream, upstream: SocketAddr, link: Arc<Link>) -> std::io::Result<()> {
    let accepted = Instant::now();
    let one_way = link.spec.one_way;
    // The SYN crosses the path before the far side sees the connection.
    tokio::time::sleep_until(accepted + one_way).await;
    let server = TcpStream::connect(upstream).await?;
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    let (client_r, client_w) = client.into_split();
    let (server_r, server_w) = server.into_split();
    // The dialler may send once the SYN-ACK is back (two one-way delays), and its bytes then
    // take a third: none arrives before that, however early it was written here.
    let first_up = accepted + one_way * 3;
    tokio::try_join!(
        direction(client_r, server_w, &link, &link.up, first_up),
        direction(server_r, client_w, &link, &link.down, accepted),
    )?;
    Ok(())
}

/// Reads from `src` as the budget allows, and writes each chunk to `dst` at its arrival time;
/// EOF is passed on after the last byte.
async fn direction(
    mut src: OwnedReadHalf,
    mut dst: OwnedWriteHalf,
    link: &Link,
    way: &Direction,
    not_before: Instant,
) -> std::io::Result<()> {
    let budget = Arc::new(Semaphore::new(link.spec.budget()));
    let (tx, mut rx) = mpsc::channel(QUEUE_CHUNKS);
    let reader = async {
        loop {
            let mut buf = vec![0u8; CHUNK];
            let n = src.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            let permit = budget
                .clone()
                .acquire_many_owned(n as u32)
                .await
                .map_err(std::io::Error::other)?;
            buf.truncate(n);
            let arrives = way.schedule(&link.spec, Instant::now(), n).max(not_before);
            if tx.send((arrives, buf, permit)).await.is_err() {
                break;
            }
        }
        drop(tx);
        Ok::<_, std::io::Error>(())
    };
    let writer = async {
        while let Some((arrives, buf, permit)) = rx.recv().await {
            tokio::time::sleep_until(arrives).await;
            dst.write_all(&buf).await?;
            drop(permit);
        }
        dst.shutdown().await
    };
    tokio::try_join!(reader, writer)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn echo_target() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = tcp.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        });
        addr
    }

    /// A sink that counts what it receives and answers with the count when the sender is done.
    async fn counting_sink() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut sink = Vec::new();
                    let n = tcp.read_to_end(&mut sink).await.unwrap();
                    tcp.write_all(&(n as u64).to_be_bytes()).await.unwrap();
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn delivers_every_byte_no_sooner_than_the_delay() {
        let spec = LinkSpec::new(60, 1000.0).unwrap();
        let relay = DelayRelay::start(&[echo_target().await], spec)
            .await
            .unwrap();
        let started = Instant::now();
        let mut tcp = TcpStream::connect(relay.addrs[0]).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        // Connect and first byte: the handshake's round trip, then the byte's.
        tcp.write_all(b"x").await.unwrap();
        let mut byte = [0u8; 1];
        tcp.read_exact(&mut byte).await.unwrap();
        let first = started.elapsed();
        assert!(
            first >= Duration::from_millis(120),
            "first byte back after {first:?}"
        );
        // A round trip on the open connection: two one-way delays.
        let t0 = Instant::now();
        tcp.write_all(b"y").await.unwrap();
        tcp.read_exact(&mut byte).await.unwrap();
        let rtt = t0.elapsed();
        assert!(rtt >= Duration::from_millis(60), "round trip took {rtt:?}");
        assert_eq!(&byte, b"y");
        // Bulk, byte-exact, and the half-close comes through after the last byte.
        let data: Vec<u8> = (0..3_000_000u32)
            .map(|i| ((i * 7) ^ (i >> 9)) as u8)
            .collect();
        let (mut r, mut w) = tcp.into_split();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            w.write_all(&sent).await.unwrap();
            w.shutdown().await.unwrap();
        });
        let mut back = Vec::new();
        tokio::time::timeout(Duration::from_secs(60), r.read_to_end(&mut back))
            .await
            .expect("the echo did not end")
            .unwrap();
        writer.await.unwrap();
        assert!(back == data, "{} bytes back of {}", back.len(), data.len());
    }

    #[tokio::test]
    async fn paces_to_the_link_rate() {
        // 8 Mbit/s = 1 MB/s: 500 kB take at least half a second to cross, plus the delay.
        let spec = LinkSpec::new(10, 8.0).unwrap();
        let relay = DelayRelay::start(&[counting_sink().await], spec)
            .await
            .unwrap();
        let mut tcp = TcpStream::connect(relay.addrs[0]).await.unwrap();
        let started = Instant::now();
        tcp.write_all(&vec![7u8; 500_000]).await.unwrap();
        tcp.shutdown().await.unwrap();
        let mut count = [0u8; 8];
        tcp.read_exact(&mut count).await.unwrap();
        let took = started.elapsed();
        assert_eq!(u64::from_be_bytes(count), 500_000);
        assert!(
            took >= Duration::from_millis(500),
            "500 kB at 1 MB/s took {took:?}"
        );
    }

    #[test]
    fn rejects_a_path_without_delay_or_rate() {
        assert!(LinkSpec::new(0, 1000.0).is_err());
        assert!(LinkSpec::new(50, 0.0).is_err());
        let spec = LinkSpec::new(50, 1000.0).unwrap();
        assert_eq!(spec.one_way, Duration::from_millis(25));
        assert_eq!(spec.rate, 125e6);
    }
}
