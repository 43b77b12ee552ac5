//! The soak's processes and link: the server (across its lives), the partition relay, the
//! stable agent and the agent that gets killed; injects faults into them and samples them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::process::{Child, Command};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::daemons::Pki;
use crate::http_get;
use crate::process_stats::rss_kib;
use crate::soak_faults::{Fault, FaultCounts};
use crate::soak_relay::PartitionRelay;
use crate::soak_report::Sample;
use crate::soak_server::SoakServer;
use crate::soak_traffic::Counts;

/// Shortest and longest partition: below and above the 3 s idle timeout, so that some
/// sessions ride a partition out and others are declared dead and replaced.
const PARTITION_MS: std::ops::RangeInclusive<u64> = 1_000..=6_000;

pub(crate) struct Rig {
    pub(crate) binary: PathBuf,
    pub(crate) pki: Pki,
    pub(crate) target: SocketAddr,
    pub(crate) server: SoakServer,
    pub(crate) relay: PartitionRelay,
    /// Agent `a`, never faulted by the soak (its RSS and fds are checked).
    pub(crate) stable: Child,
    /// Agent `b`, killed and restarted.
    pub(crate) restarted: Child,
    pub(crate) counts: Arc<Counts>,
    pub(crate) faults: FaultCounts,
    /// When each server life started, from the start of traffic.
    pub(crate) lives: Vec<Duration>,
    /// When the current partition heals.
    heal_at: Option<Instant>,
    rng: fastrand::Rng,
}

impl Rig {
    /// Starts the server, the relay in front of it and both agents (dialing the relay).
    pub(crate) async fn start(
        binary: PathBuf,
        pki: Pki,
        target: SocketAddr,
        stop: CancellationToken,
        tasks: &mut JoinSet<()>,
    ) -> Result<Rig> {
        let server = SoakServer::start(binary.clone(), &pki, target).await?;
        let relay = PartitionRelay::start(server.tunnel(), stop, tasks).await?;
        let stable = start_agent(&binary, &pki, "a", relay.addr, target)?;
        let restarted = start_agent(&binary, &pki, "b", relay.addr, target)?;
        Ok(Rig {
            binary,
            pki,
            target,
            server,
            relay,
            stable,
            restarted,
            counts: Arc::new(Counts::default()),
            faults: FaultCounts::default(),
            lives: vec![Duration::ZERO],
            heal_at: None,
            rng: fastrand::Rng::new(),
        })
    }

    /// Injects `fault`; `started` is the start of traffic.
    pub(crate) async fn inject(&mut self, fault: Fault, started: Instant) -> Result<()> {
        self.faults.count(fault);
        match fault {
            Fault::AgentKill => {
                self.restarted.kill().await.context("killing agent b")?;
                self.restarted =
                    start_agent(&self.binary, &self.pki, "b", self.relay.addr, self.target)?;
            }
            Fault::ServerTerm | Fault::ServerKill => {
                let kill = fault == Fault::ServerKill;
                if kill {
                    self.counts.server_kills.fetch_add(1, Ordering::SeqCst);
                }
                self.server.restart(&self.pki, kill).await?;
                self.lives.push(started.elapsed());
            }
            Fault::Partition => {
                let length = Duration::from_millis(self.rng.u64(PARTITION_MS));
                self.relay.set_partitioned(true);
                self.heal_at = Some(Instant::now() + length);
            }
            Fault::Reload => signal(self.server.process()?.pid()?, "HUP").await?,
        }
        Ok(())
    }

    /// Heals the partition when its time has come (or at once with `now`).
    pub(crate) fn heal(&mut self, now: bool) {
        if self.heal_at.is_some_and(|at| now || Instant::now() >= at) {
            self.heal_at = None;
            self.relay.set_partitioned(false);
        }
    }

    /// Polls `/metrics` until the client has `n` sessions (one per agent process).
    pub(crate) async fn wait_for_sessions(&self, n: usize, wait: Duration) -> Result<()> {
        let deadline = Instant::now() + wait;
        let series = "tether_sessions{client=\"soak\"}";
        loop {
            let admin = self.server.process()?.admin;
            let text = http_get::get(admin, "/metrics").await.unwrap_or_default();
            let sessions = http_get::sample(&text, series).unwrap_or(0.0);
            if sessions as usize == n {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{sessions} of {n} agent sessions after {wait:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The server's RSS, fds, tasks and streams and the stable agent's RSS and fds.
    pub(crate) async fn sample(&self, started: Instant) -> Result<Sample> {
        let server = self.server.process()?;
        let text = http_get::get(server.admin, "/metrics").await?;
        let value = |series: &str| {
            http_get::sample(&text, series).with_context(|| format!("no {series} in /metrics"))
        };
        let agent_pid = self.stable.id().context("the stable agent exited")?;
        Ok(Sample {
            at: started.elapsed(),
            life: self.server.life,
            server_rss_kib: rss_kib(server.pid()?)? as f64,
            server_fds: value("process_open_fds")?,
            server_tasks: value("tether_runtime_alive_tasks")?,
            streams_active: value("tether_streams_active")?,
            agent_rss_kib: rss_kib(agent_pid)? as f64,
            agent_fds: std::fs::read_dir(format!("/proc/{agent_pid}/fd"))?.count() as f64,
        })
    }

    /// Stops both agents and the server.
    pub(crate) async fn stop(mut self) -> Result<()> {
        let _ = self.restarted.kill().await;
        let _ = self.stable.kill().await;
        self.server.stop().await
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
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(pki.dir().join(format!("agent-{name}.log")))?;
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
