//! Driving `../shared/bench/tunnelbench.py`: its targets (echo and iperf3 servers) and its
//! `run` command, whose JSON lines are collected into one file per benchmark run.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::daemons::{free_port, workspace_root};

/// The harness script: `--harness`, or `../shared/bench/tunnelbench.py` beside the checkout.
pub(crate) fn locate(explicit: Option<&Path>) -> Result<PathBuf> {
    let path = match explicit {
        Some(path) => path.to_owned(),
        None => workspace_root().join("../shared/bench/tunnelbench.py"),
    };
    if !path.is_file() {
        bail!(
            "the benchmark harness {} is missing (pass --harness PATH)",
            path.display()
        );
    }
    Ok(path)
}

/// The harness's echo and iperf3 servers, kept up across all systems of a run.
pub(crate) struct Targets {
    child: Child,
    /// The echo server.
    pub(crate) echo: SocketAddr,
    /// `iperf3 -s`.
    pub(crate) iperf: SocketAddr,
}

impl Targets {
    /// Starts them and waits until the echo server answers and iperf3 accepts.
    pub(crate) async fn start(script: &Path) -> Result<Targets> {
        let echo = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
        let iperf = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
        let child = Command::new("python3")
            .arg(script)
            .args(["targets", "--max-seconds", "7200"])
            .args(["--target-echo-port", &echo.port().to_string()])
            .args(["--target-iperf-port", &iperf.port().to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its echo server and iperf3 are children of its own: stop them as a group.
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .context("starting the harness targets (python3)")?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if echo_once(echo).await.is_ok() && TcpStream::connect(iperf).await.is_ok() {
                return Ok(Targets { child, echo, iperf });
            }
            if Instant::now() > deadline {
                bail!("the harness targets did not come up (is iperf3 installed?)");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops them: SIGTERM to the process group, then waits for the leader.
    pub(crate) async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = Command::new("kill")
                .args(["-s", "TERM", "--", &format!("-{pid}")])
                .status()
                .await;
        }
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// One byte through `entry` and back: is a tunnel to the echo server up?
pub(crate) async fn echo_once(entry: SocketAddr) -> Result<()> {
    tokio::time::timeout(Duration::from_secs(2), async {
        let mut tcp = TcpStream::connect(entry).await?;
        tcp.write_all(b"x").await?;
        let mut byte = [0u8; 1];
        tcp.read_exact(&mut byte).await?;
        anyhow::ensure!(&byte == b"x", "echo returned {byte:?}");
        Ok(())
    })
    .await
    .context("echo timed out")?
}

/// What one `tunnelbench.py run` measures, and through which entries.
pub(crate) struct RunSpec<'a> {
    /// The label of the system (`direct`, `tether`, `rathole`).
    pub(crate) label: &'a str,
    /// Entries forwarding to the echo and iperf3 targets; `None` for direct.
    pub(crate) entries: Option<(SocketAddr, SocketAddr)>,
    /// Tunnel process ids whose RSS and CPU are measured.
    pub(crate) pids: Vec<u32>,
    /// `--tests`.
    pub(crate) tests: &'a str,
    /// Further harness flags (durations, counts, idle levels).
    pub(crate) extra: Vec<String>,
}

/// Runs the harness once; its records are appended to `jsonl`.
pub(crate) async fn run(
    script: &Path,
    targets: &Targets,
    spec: RunSpec<'_>,
    jsonl: &Path,
) -> Result<()> {
    let mut cmd = Command::new("python3");
    cmd.arg(script)
        .args([
            "run",
            "--label",
            spec.label,
            "--no-start-targets",
            "--table-stderr",
        ])
        .args(["--tests", spec.tests])
        .args(["--target-echo-port", &targets.echo.port().to_string()])
        .args(["--target-iperf-port", &targets.iperf.port().to_string()])
        .arg("--jsonl")
        .arg(jsonl)
        .args(&spec.extra)
        .stdout(Stdio::null())
        .stdin(Stdio::null());
    match spec.entries {
        None => {
            cmd.arg("--direct");
        }
        Some((echo, iperf)) => {
            cmd.args([
                "--entry",
                &echo.to_string(),
                "--iperf-entry",
                &iperf.to_string(),
            ]);
        }
    }
    if !spec.pids.is_empty() {
        let pids: Vec<String> = spec.pids.iter().map(u32::to_string).collect();
        cmd.args(["--pids", &pids.join(",")]);
    }
    let status = cmd.status().await.context("running tunnelbench.py")?;
    if !status.success() {
        bail!(
            "tunnelbench.py run --label {} failed ({status})",
            spec.label
        );
    }
    Ok(())
}

/// One JSON line of the harness (the fields this tool reads).
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Record {
    pub(crate) label: String,
    pub(crate) test: String,
    #[serde(default)]
    pub(crate) ok: bool,
    #[serde(default)]
    pub(crate) error: Option<String>,
    #[serde(default, rename = "MBps")]
    pub(crate) mbps: Option<f64>,
    #[serde(default)]
    pub(crate) p50_us: Option<f64>,
    #[serde(default)]
    pub(crate) p99_us: Option<f64>,
    #[serde(default)]
    pub(crate) conn_per_s: Option<f64>,
    #[serde(default)]
    pub(crate) bytes_per_conn: Option<f64>,
    #[serde(default)]
    pub(crate) returned_pct: Option<f64>,
    #[serde(default)]
    pub(crate) opened_ok: Option<u64>,
    #[serde(default)]
    pub(crate) tunnel_cpu_pct: Option<f64>,
    #[serde(default)]
    pub(crate) loadavg1: Option<f64>,
}

/// Reads every record of `jsonl`.
pub(crate) fn records(jsonl: &Path) -> Result<Vec<Record>> {
    let text =
        std::fs::read_to_string(jsonl).with_context(|| format!("reading {}", jsonl.display()))?;
    text.lines()
        .filter(|line| line.starts_with('{'))
        .map(|line| serde_json::from_str(line).with_context(|| format!("harness record {line}")))
        .collect()
}
