//! Latency through an entry to the echo target: small round trips on one connection (RTT
//! p50/p99) and sequential new connections (connect, one byte echoed, close: per second and
//! p50). Blocking sockets on a thread of their own, so no runtime hand-off is timed.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use tokio::time::Instant;

use anyhow::{Context, Result, ensure};

use crate::process_stats;
use crate::record::Record;

/// Per-operation timeout on the blocking sockets.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// RTT test parameters.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RttSpec {
    pub(crate) warmup: u32,
    pub(crate) count: u32,
    /// Message size, bytes.
    pub(crate) size: usize,
    /// The test stops early (and fails) past this.
    pub(crate) limit: Duration,
}

/// Nearest-rank percentile `p` (0-100) of sorted `values`.
pub(crate) fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

fn connect(entry: SocketAddr) -> Result<TcpStream> {
    let tcp = TcpStream::connect_timeout(&entry, IO_TIMEOUT)
        .with_context(|| format!("connecting to {entry}"))?;
    tcp.set_nodelay(true)?;
    tcp.set_read_timeout(Some(IO_TIMEOUT))?;
    tcp.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(tcp)
}

fn round_trip(tcp: &mut TcpStream, msg: &[u8], buf: &mut [u8]) -> Result<()> {
    tcp.write_all(msg)?;
    tcp.read_exact(buf).context("reading the echo")?;
    ensure!(buf == msg, "the echo differs from what was sent");
    Ok(())
}

/// Round trips of `spec.size` bytes on one connection; microseconds of each, sorted.
fn rtt_samples(entry: SocketAddr, spec: RttSpec) -> Result<Vec<f64>> {
    let mut tcp = connect(entry)?;
    let msg: Vec<u8> = (0..spec.size).map(|i| (i * 31 + 7) as u8).collect();
    let mut buf = vec![0u8; spec.size];
    for _ in 0..spec.warmup {
        round_trip(&mut tcp, &msg, &mut buf)?;
    }
    let deadline = Instant::now() + spec.limit;
    let mut samples = Vec::with_capacity(spec.count as usize);
    for _ in 0..spec.count {
        let t0 = Instant::now();
        round_trip(&mut tcp, &msg, &mut buf)?;
        samples.push(t0.elapsed().as_secs_f64() * 1e6);
        ensure!(
            Instant::now() < deadline,
            "only {} round trips within {:?}",
            samples.len(),
            spec.limit
        );
    }
    samples.sort_by(f64::total_cmp);
    Ok(samples)
}

/// The RTT test through `entry`.
pub(crate) async fn rtt(label: &str, entry: SocketAddr, spec: RttSpec) -> Record {
    let measured = tokio::task::spawn_blocking(move || rtt_samples(entry, spec)).await;
    match measured.context("the RTT thread").and_then(|r| r) {
        Ok(samples) => Record {
            ok: true,
            p50_us: percentile(&samples, 50.0),
            p99_us: percentile(&samples, 99.0),
            ..Record::new(label, "rtt")
        },
        Err(err) => Record::failed(label, "rtt", &err),
    }
}

/// Connect, one byte and its echo, close; `count` times. Microseconds of each, sorted, and the
/// wall time of all.
fn connect_samples(entry: SocketAddr, count: u32, limit: Duration) -> Result<(Vec<f64>, f64)> {
    let started = Instant::now();
    let mut samples = Vec::with_capacity(count as usize);
    let mut byte = [0u8; 1];
    for _ in 0..count {
        let t0 = Instant::now();
        let mut tcp = connect(entry)?;
        round_trip(&mut tcp, b"x", &mut byte)?;
        drop(tcp);
        samples.push(t0.elapsed().as_secs_f64() * 1e6);
        ensure!(
            started.elapsed() < limit,
            "only {} connections within {limit:?}",
            samples.len()
        );
    }
    let wall = started.elapsed().as_secs_f64();
    samples.sort_by(f64::total_cmp);
    Ok((samples, wall))
}

/// The connect test through `entry`, with the tunnel's CPU per connection.
pub(crate) async fn connect_rate(
    label: &str,
    entry: SocketAddr,
    count: u32,
    pids: &[u32],
    limit: Duration,
) -> Record {
    let cpu_before = process_stats::cpu_seconds(pids).unwrap_or(0.0);
    let measured = tokio::task::spawn_blocking(move || connect_samples(entry, count, limit)).await;
    match measured.context("the connect thread").and_then(|r| r) {
        Ok((samples, wall)) => {
            let cpu = process_stats::cpu_seconds(pids).unwrap_or(0.0) - cpu_before;
            Record {
                ok: true,
                conn_per_s: Some(samples.len() as f64 / wall),
                p50_us: percentile(&samples, 50.0),
                p99_us: percentile(&samples, 99.0),
                tunnel_cpu_s: (!pids.is_empty()).then_some(cpu),
                ..Record::new(label, "connect")
            }
        }
        Err(err) => Record::failed(label, "connect", &err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&values, 50.0), Some(50.0));
        assert_eq!(percentile(&values, 99.0), Some(99.0));
        assert_eq!(percentile(&values, 100.0), Some(100.0));
        assert_eq!(percentile(&[7.0], 99.0), Some(7.0));
        assert_eq!(percentile(&[], 50.0), None);
    }
}
