//! One measurement of one system (a JSON line of `target/tether-bench/*.jsonl`), and the file
//! the records of a run are appended to.

use std::io::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// What one test of one system measured. Unset figures are left out of the JSON.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Record {
    /// The system (`direct`, `floor`, `tether`, a peer's name).
    pub(crate) label: String,
    /// The test (`tput1`, `tput8`, `tput1R`, `tput8R`, `rtt`, `connect`, `idle<N>`, `wan1`,
    /// `wan_connect`).
    pub(crate) test: String,
    /// Whether the test ran to its end without an error.
    #[serde(default)]
    pub(crate) ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) error: Option<String>,
    /// The error of a first attempt that was run again (throughput tests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) retried_after: Option<String>,
    /// Payload received per second, 10^6 bytes.
    #[serde(default, rename = "MBps", skip_serializing_if = "Option::is_none")]
    pub(crate) mbps: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) p50_us: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) p99_us: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) conn_per_s: Option<f64>,
    /// Idle tests: RSS growth per open connection, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) bytes_per_conn: Option<f64>,
    /// Idle tests: share of the growth given back after closing, percent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) returned_pct: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) opened_ok: Option<u64>,
    /// CPU of the tunnel's processes during the test, seconds (user + system).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) tunnel_cpu_s: Option<f64>,
    /// The same as a share of one core over the test's wall time, percent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) tunnel_cpu_pct: Option<f64>,
    /// Throughput tests: 10^6 bytes moved per second of tunnel CPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) mb_per_cpu_s: Option<f64>,
    /// Resident memory of the tunnel's processes at the end of the test, KiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) rss_kib: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) loadavg1: Option<f64>,
}

impl Record {
    /// An empty record of `label`/`test`, with the load average of now.
    pub(crate) fn new(label: &str, test: &str) -> Record {
        Record {
            label: label.to_owned(),
            test: test.to_owned(),
            loadavg1: loadavg1(),
            ..Record::default()
        }
    }

    /// The record of a test that failed with `err`.
    pub(crate) fn failed(label: &str, test: &str, err: &anyhow::Error) -> Record {
        Record {
            error: Some(format!("{err:#}")),
            ..Record::new(label, test)
        }
    }
}

/// Appends `record` to `path` as one JSON line and echoes a short line to stderr.
pub(crate) fn append(path: &Path, record: &Record) -> Result<()> {
    let line = serde_json::to_string(record)?;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    writeln!(file, "{line}").with_context(|| format!("writing {}", path.display()))?;
    eprintln!("  {line}");
    Ok(())
}

/// Reads every record of `path`.
pub(crate) fn read_all(path: &Path) -> Result<Vec<Record>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .filter(|line| line.starts_with('{'))
        .map(|line| serde_json::from_str(line).with_context(|| format!("record {line}")))
        .collect()
}

/// The one-minute load average (how busy the machine was), if readable.
fn loadavg1() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_through_a_file_without_unset_fields() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.jsonl");
        let mut record = Record::new("floor", "tput1");
        record.ok = true;
        record.mbps = Some(12.5);
        append(&path, &record).unwrap();
        append(
            &path,
            &Record::failed("tether", "rtt", &anyhow::anyhow!("boom")),
        )
        .unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains("p50_us"), "{text}");
        let back = read_all(&path).unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!(back[0].mbps, Some(12.5));
        assert!(back[0].ok && !back[1].ok);
        assert_eq!(back[1].error.as_deref(), Some("boom"));
    }
}
