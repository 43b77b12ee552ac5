//! `tether-bench soak`: a real server and two agent processes of one client under mixed traffic
//! (sequence-checked transfers, resets, empty connections) with faults (one agent killed and
//! restarted, server reloads by SIGHUP) for a set time with compressed timeouts. Samples the
//! server's RSS, fds, tasks and streams and the stable agent's RSS and fds; fails if any grew
//! beyond its bound after the warm-up, if streams opened != closed at the end, or if one byte
//! came back wrong.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use tokio::process::{Child, Command};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::Common;
use crate::daemons::{Pki, ServerProcess, tether_binary};
use crate::http_get;
use crate::process_stats::{machine, rss_kib};
use crate::soak_traffic::{Counts, echo_target, worker};

/// Growth allowed after the warm-up: fds and tasks by a count, RSS by a share plus a floor.
const FD_SLACK: f64 = 16.0;
const TASK_SLACK: f64 = 32.0;
const RSS_SHARE: f64 = 0.25;
const RSS_FLOOR_KIB: f64 = 16.0 * 1024.0;
/// How long the streams may take to close once traffic stops.
const SETTLE: Duration = Duration::from_secs(30);

#[derive(Debug, Args)]
pub(crate) struct SoakArgs {
    #[command(flatten)]
    common: Common,
    /// How long traffic and faults run (`60s`, `10m`, `1h`).
    #[arg(long, default_value = "10m", value_parser = tether_common::duration::parse_duration)]
    duration: Duration,
    /// The share of the run before the baseline sample, in percent.
    #[arg(long, default_value_t = 20)]
    warmup_percent: u32,
    /// Concurrent traffic workers.
    #[arg(long, default_value_t = 8)]
    workers: usize,
    /// How often the second agent is killed (SIGKILL) and restarted; every third time the
    /// server reloads its config (SIGHUP) instead.
    #[arg(long, default_value = "15s", value_parser = tether_common::duration::parse_duration)]
    fault_every: Duration,
    /// How often the processes are sampled.
    #[arg(long, default_value = "5s", value_parser = tether_common::duration::parse_duration)]
    sample_every: Duration,
}

/// One sample of the processes.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Duration,
    server_rss_kib: f64,
    server_fds: f64,
    server_tasks: f64,
    streams_active: f64,
    agent_rss_kib: f64,
    agent_fds: f64,
}

pub(crate) async fn run(args: SoakArgs) -> Result<()> {
    let binary = tether_binary(&args.common)?;
    let pki = Pki::new(&["soak"])?;
    let stop = CancellationToken::new();
    let mut tasks = JoinSet::new();
    let target = echo_target(stop.clone(), &mut tasks).await?;
    let listen = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    let server = ServerProcess::start(
        &binary,
        &pki,
        listen,
        "soak",
        &[target],
        "dial_timeout: 2s\ndrain_timeout: 1s\n",
    )
    .await?;
    let stable = start_agent(&binary, &pki, "a", server.tunnel, target)?;
    let mut restarted = start_agent(&binary, &pki, "b", server.tunnel, target)?;
    wait_for_sessions(&server, 2).await?;

    let counts = Arc::new(Counts::default());
    for _ in 0..args.workers {
        tasks.spawn(worker(server.forwards[0], counts.clone(), stop.clone()));
    }
    let started = Instant::now();
    let mut samples = Vec::new();
    let mut faults = 0u32;
    let mut next_fault = started + args.fault_every;
    while started.elapsed() < args.duration {
        samples.push(sample(&server, &stable, started).await?);
        let next_sample = Instant::now() + args.sample_every;
        while Instant::now() < next_sample && started.elapsed() < args.duration {
            if Instant::now() >= next_fault {
                faults += 1;
                next_fault += args.fault_every;
                if faults % 3 == 0 {
                    signal(server.pid()?, "HUP").await?;
                } else {
                    restarted.kill().await.context("killing agent b")?;
                    restarted = start_agent(&binary, &pki, "b", server.tunnel, target)?;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    stop.cancel();
    while tasks.join_next().await.is_some() {}
    let settled = settle(&server).await;
    let last = sample(&server, &stable, started).await?;
    samples.push(last);
    let report = Report {
        args: &args,
        samples: &samples,
        counts: &counts,
        faults,
        settled,
    };
    println!("{}", report.markdown());
    let verdict = report.problems();
    drop(restarted);
    drop(stable);
    server.stop().await?;
    if verdict.is_empty() {
        Ok(())
    } else {
        bail!("soak failed:\n- {}", verdict.join("\n- "))
    }
}

/// Starts `tether agent` `name` of client `soak` with compressed timeouts.
fn start_agent(
    binary: &Path,
    pki: &Pki,
    name: &str,
    server: SocketAddr,
    target: SocketAddr,
) -> Result<Child> {
    let yaml = format!(
        "version: 1\n\
         server_url: \"wss://{server}/v1/connect\"\n\
         tls: {{ cert: agent-soak.pem, key: agent-soak-key.pem, server_ca: ca.pem }}\n\
         admin_listen: \"\"\n\
         connect_timeout: 2s\n\
         dial_timeout: 2s\n\
         reconnect: {{ min_delay: 100ms, max_delay: 1s }}\n\
         session: {{ ping_interval: 1s, idle_timeout: 3s }}\n\
         policy:\n  allow:\n    - {{ cidrs: [\"127.0.0.1/32\"], ports: [{}] }}\n",
        target.port()
    );
    let config = pki.dir().join(format!("agent-{name}.yaml"));
    std::fs::write(&config, yaml).context("writing the agent config")?;
    let log = std::fs::File::create(pki.dir().join(format!("agent-{name}.log")))?;
    Command::new(binary)
        .args(["--log-format", "json", "--log", "warn", "agent", "--config"])
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .context("starting an agent")
}

/// Polls `/metrics` until the client has `n` sessions (one per agent process).
async fn wait_for_sessions(server: &ServerProcess, n: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let series = "tether_sessions{client=\"soak\"}";
    loop {
        let text = http_get::get(server.admin, "/metrics").await?;
        let sessions = http_get::sample(&text, series).unwrap_or(0.0);
        if sessions as usize == n {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{sessions} of {n} agent sessions after 60 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sends SIGHUP (or another signal) through `kill(1)`.
async fn signal(pid: u32, name: &str) -> Result<()> {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .await?;
    if !status.success() {
        bail!("kill -{name} {pid} failed ({status})");
    }
    Ok(())
}

async fn sample(server: &ServerProcess, agent: &Child, started: Instant) -> Result<Sample> {
    let text = http_get::get(server.admin, "/metrics").await?;
    let value = |series: &str| {
        http_get::sample(&text, series).with_context(|| format!("no {series} in /metrics"))
    };
    let agent_pid = agent.id().context("the stable agent exited")?;
    Ok(Sample {
        at: started.elapsed(),
        server_rss_kib: rss_kib(server.pid()?)? as f64,
        server_fds: value("process_open_fds")?,
        server_tasks: value("tether_runtime_alive_tasks")?,
        streams_active: value("tether_streams_active")?,
        agent_rss_kib: rss_kib(agent_pid)? as f64,
        agent_fds: std::fs::read_dir(format!("/proc/{agent_pid}/fd"))?.count() as f64,
    })
}

/// Waits until the server's streams balance; `(opened, closed)` at the end.
async fn settle(server: &ServerProcess) -> (f64, f64) {
    let deadline = Instant::now() + SETTLE;
    loop {
        let text = http_get::get(server.admin, "/metrics")
            .await
            .unwrap_or_default();
        let opened = http_get::sample(&text, "tether_streams_opened_total").unwrap_or(-1.0);
        let closed = closed_total(&text);
        if (opened == closed && opened >= 0.0) || Instant::now() > deadline {
            return (opened, closed);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn closed_total(text: &str) -> f64 {
    text.lines()
        .filter(|line| line.starts_with("tether_streams_closed_total{"))
        .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

struct Report<'a> {
    args: &'a SoakArgs,
    samples: &'a [Sample],
    counts: &'a Counts,
    faults: u32,
    settled: (f64, f64),
}

impl Report<'_> {
    /// The first sample at or after the warm-up.
    fn baseline(&self) -> Sample {
        let warmup = self
            .args
            .duration
            .mul_f64(f64::from(self.args.warmup_percent) / 100.0);
        self.samples
            .iter()
            .find(|s| s.at >= warmup)
            .or(self.samples.last())
            .copied()
            .expect("at least the final sample")
    }

    /// Everything that is out of bounds.
    fn problems(&self) -> Vec<String> {
        let base = self.baseline();
        let last = *self.samples.last().expect("the final sample");
        let mut out = Vec::new();
        let rss_bound = |b: f64| b + (b * RSS_SHARE).max(RSS_FLOOR_KIB);
        let mut check = |what: &str, now: f64, bound: f64| {
            if now > bound {
                out.push(format!("{what}: {now} at the end, bound {bound:.0}"));
            }
        };
        check(
            "server RSS KiB",
            last.server_rss_kib,
            rss_bound(base.server_rss_kib),
        );
        check(
            "agent RSS KiB",
            last.agent_rss_kib,
            rss_bound(base.agent_rss_kib),
        );
        check("server fds", last.server_fds, base.server_fds + FD_SLACK);
        check("agent fds", last.agent_fds, base.agent_fds + FD_SLACK);
        check(
            "server tasks",
            last.server_tasks,
            base.server_tasks + TASK_SLACK,
        );
        check("server streams active", last.streams_active, 0.0);
        let (opened, closed) = self.settled;
        if opened != closed {
            out.push(format!("streams opened {opened} != closed {closed}"));
        }
        let short = self.counts.short.load(Ordering::Relaxed);
        if short > 0 {
            out.push(format!(
                "{short} echoes ended with a clean EOF before their last byte"
            ));
        }
        let corrupt = self.counts.corrupt.load(Ordering::Relaxed);
        if corrupt > 0 {
            out.push(format!(
                "{corrupt} transfers came back different from what was sent"
            ));
        }
        if self.counts.transfers_ok.load(Ordering::Relaxed) == 0 {
            out.push("no transfer succeeded".into());
        }
        out
    }

    fn markdown(&self) -> String {
        let c = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let mut md = String::new();
        let _ = writeln!(md, "machine: {}", machine());
        let _ = writeln!(
            md,
            "duration {:?}, {} workers, {} faults (agent kill -9 and restart; every third a server SIGHUP)",
            self.args.duration, self.args.workers, self.faults
        );
        let _ = writeln!(
            md,
            "transfers ok {} ({:.1} MiB byte-exact), failed {}, wrong byte {}, short clean EOF {}, resets {}, empty {}; streams opened {} closed {}\n",
            c(&self.counts.transfers_ok),
            c(&self.counts.bytes) as f64 / f64::from(1 << 20),
            c(&self.counts.transfers_failed),
            c(&self.counts.corrupt),
            c(&self.counts.short),
            c(&self.counts.resets),
            c(&self.counts.empty),
            self.settled.0,
            self.settled.1,
        );
        md.push_str("| at | server RSS MiB | server fds | server tasks | streams active | agent RSS MiB | agent fds |\n");
        md.push_str("|---|---|---|---|---|---|---|\n");
        let base = self.baseline();
        // About 20 rows, always with the baseline and the final sample.
        let step = (self.samples.len() / 20).max(1);
        let last = self.samples.len() - 1;
        for (i, s) in self.samples.iter().enumerate() {
            if i % step != 0 && i != last && s.at != base.at {
                continue;
            }
            let mark = if s.at == base.at { " (baseline)" } else { "" };
            let _ = writeln!(
                md,
                "| {:.0} s{mark} | {:.1} | {} | {} | {} | {:.1} | {} |",
                s.at.as_secs_f64(),
                s.server_rss_kib / 1024.0,
                s.server_fds,
                s.server_tasks,
                s.streams_active,
                s.agent_rss_kib / 1024.0,
                s.agent_fds
            );
        }
        md
    }
}
