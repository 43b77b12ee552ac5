//! Throughput: an `iperf3 -c` run through an entry (1 or N streams, forward or reverse), its
//! JSON report, and the CPU the tunnel's processes spent meanwhile (MB per CPU-second).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use tokio::process::Command;
use tokio::time::Instant;

use crate::process_stats;
use crate::record::Record;

/// One iperf3 run.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TputSpec {
    /// Parallel streams (`-P`).
    pub(crate) streams: u32,
    /// Target to client (`-R`).
    pub(crate) reverse: bool,
    /// Measured seconds (`-t`).
    pub(crate) seconds: u32,
    /// Warm-up seconds not counted (`-O`).
    pub(crate) omit: u32,
}

impl TputSpec {
    /// The test's name in records: `tput1`, `tput8R`, ...
    pub(crate) fn test_name(&self) -> String {
        format!(
            "tput{}{}",
            self.streams,
            if self.reverse { "R" } else { "" }
        )
    }
}

/// The part of iperf3's `-J` report this tool reads.
#[derive(Debug, Deserialize)]
struct Report {
    #[serde(default)]
    error: Option<String>,
    end: Option<End>,
}

#[derive(Debug, Deserialize)]
struct End {
    sum_received: Option<Sum>,
}

#[derive(Debug, Deserialize)]
struct Sum {
    bytes: u64,
    seconds: f64,
}

/// Bytes received and the seconds they took, from the text of an `iperf3 -J` report.
pub(crate) fn parse_iperf_json(text: &str) -> Result<(u64, f64)> {
    let report: Report = serde_json::from_str(text).context("iperf3 printed no JSON report")?;
    if let Some(error) = report.error {
        bail!("iperf3: {error}");
    }
    let sum = report
        .end
        .and_then(|end| end.sum_received)
        .context("iperf3's report has no `end.sum_received`")?;
    if sum.seconds <= 0.0 {
        bail!("iperf3's report covers {} s", sum.seconds);
    }
    Ok((sum.bytes, sum.seconds))
}

/// How long to keep retrying while `iperf3 -s` is still finishing the previous test.
const BUSY_WAIT: Duration = Duration::from_secs(10);

/// Runs iperf3 through `entry` and measures the CPU of `pids` (the tunnel) over its wall time.
/// A run that fails is run once more (iperf3 -R through any relay sometimes loses its control
/// connection at the end of a test, when the client closes data sockets with bytes still in
/// flight); the first error is kept in the record's `retried_after`.
pub(crate) async fn run(label: &str, entry: SocketAddr, spec: TputSpec, pids: &[u32]) -> Record {
    let deadline = Instant::now() + BUSY_WAIT;
    let mut first_error: Option<String> = None;
    loop {
        let mut record = Record::new(label, &spec.test_name());
        match measure(entry, spec, pids, &mut record).await {
            Ok(()) => {
                record.retried_after = first_error;
                return record;
            }
            // The server takes a moment to close the previous test after its client is done.
            Err(err) if is_busy(&err) && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(err) if first_error.is_none() => {
                first_error = Some(format!("{err:#}"));
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(err) => return Record::failed(label, &spec.test_name(), &err),
        }
    }
}

fn is_busy(err: &anyhow::Error) -> bool {
    format!("{err:#}").contains("server is busy")
}

async fn measure(
    entry: SocketAddr,
    spec: TputSpec,
    pids: &[u32],
    record: &mut Record,
) -> Result<()> {
    let mut cmd = Command::new("iperf3");
    cmd.args([
        "-c",
        &entry.ip().to_string(),
        "-p",
        &entry.port().to_string(),
    ])
    .args([
        "-t",
        &spec.seconds.to_string(),
        "-O",
        &spec.omit.to_string(),
    ])
    .args([
        "-P",
        &spec.streams.to_string(),
        "-J",
        "--connect-timeout",
        "5000",
    ])
    .kill_on_drop(true);
    if spec.reverse {
        cmd.arg("-R");
    }
    let cpu_before = process_stats::cpu_seconds(pids)?;
    let started = Instant::now();
    let limit = Duration::from_secs(u64::from(spec.seconds + spec.omit) + 30);
    let output = tokio::time::timeout(limit, cmd.output())
        .await
        .context("iperf3 -c did not finish in time")?
        .context("running iperf3 -c (apt-get install iperf3)")?;
    let wall = started.elapsed().as_secs_f64();
    let cpu = process_stats::cpu_seconds(pids)? - cpu_before;
    let text = String::from_utf8_lossy(&output.stdout);
    let (bytes, seconds) = parse_iperf_json(&text).with_context(|| {
        format!(
            "iperf3 exited with {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )
    })?;
    let mbps = bytes as f64 / seconds / 1e6;
    record.ok = true;
    record.mbps = Some(mbps);
    if !pids.is_empty() {
        // The rate over the measured seconds, spread over the whole run's CPU (the warm-up
        // and iperf3's setup included): slightly pessimistic for the tunnel.
        let cpu_share = cpu / wall;
        record.tunnel_cpu_s = Some(cpu);
        record.tunnel_cpu_pct = Some(100.0 * cpu_share);
        record.mb_per_cpu_s = (cpu_share > 0.0).then(|| mbps / cpu_share);
        record.rss_kib = process_stats::rss_total_kib(pids).ok();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shape of `iperf3 -J` (3.12), cut down to what matters and one field around it.
    const REPORT: &str = r#"{
        "start": {"connected": [], "version": "iperf 3.12"},
        "intervals": [],
        "end": {
            "streams": [],
            "sum_sent": {"start": 0, "end": 2.0, "seconds": 2.0, "bytes": 2100000000,
                         "bits_per_second": 8.4e9, "retransmits": 0, "sender": true},
            "sum_received": {"start": 0, "end": 2.0, "seconds": 2.0, "bytes": 2000000000,
                             "bits_per_second": 8.0e9, "sender": true},
            "cpu_utilization_percent": {"host_total": 40.1, "remote_total": 38.2}
        }
    }"#;

    #[test]
    fn reads_bytes_and_seconds_received() {
        assert_eq!(parse_iperf_json(REPORT).unwrap(), (2_000_000_000, 2.0));
    }

    #[test]
    fn reports_iperfs_own_error() {
        let err = parse_iperf_json(
            r#"{"start": {}, "intervals": [], "end": {},
            "error": "unable to connect to server: Connection refused"}"#,
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("Connection refused"), "{err:#}");
    }

    #[test]
    fn rejects_no_json_and_an_empty_interval() {
        assert!(parse_iperf_json("iperf3: error - bad").is_err());
        let empty = REPORT.replace(
            "\"seconds\": 2.0, \"bytes\": 2000000000",
            "\"seconds\": 0.0, \"bytes\": 0",
        );
        assert!(parse_iperf_json(&empty).is_err());
    }

    #[test]
    fn names_tests_by_streams_and_direction() {
        let spec = TputSpec {
            streams: 8,
            reverse: true,
            seconds: 1,
            omit: 0,
        };
        assert_eq!(spec.test_name(), "tput8R");
    }
}
