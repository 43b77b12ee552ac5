//! The systems a run compares (direct, the splice floor, tether, peers) and starting one fresh:
//! its entries to the targets, its process ids, and (WAN mode) its link through a delay relay.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::process::{Child, Command};

use crate::bench_targets::{Targets, spawn_reporting, wait_accepting, wait_for_echo};
use crate::daemons::{Pki, TetherPair, terminate};
use crate::delay_relay::{DelayRelay, LinkSpec};
use crate::peers::{Rathole, Wstunnel};

/// How long a system may take to forward its first echo.
const START_WAIT: Duration = Duration::from_secs(60);

/// A system under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum System {
    /// No tunnel: the client talks to the targets (through the delay relay in WAN mode).
    Direct,
    /// Two `tether-bench splice-relay` processes in a row: no TLS, no framing.
    Floor,
    Tether,
    /// tether with the server's audit log writing to a file.
    TetherAudit,
    Rathole,
    Wstunnel,
}

impl System {
    /// The name in records and tables.
    pub(crate) fn label(self) -> &'static str {
        match self {
            System::Direct => "direct",
            System::Floor => "floor",
            System::Tether => "tether",
            System::TetherAudit => "tether, audit log on",
            System::Rathole => "rathole",
            System::Wstunnel => "wstunnel",
        }
    }

    /// Whether it has processes of its own (CPU and memory are measured).
    pub(crate) fn is_tunnel(self) -> bool {
        self != System::Direct
    }
}

/// What starting any system needs.
pub(crate) struct Launch<'a> {
    pub(crate) tether: &'a Path,
    pub(crate) pki: &'a Pki,
    pub(crate) targets: &'a Targets,
    pub(crate) rathole: Option<PathBuf>,
    pub(crate) wstunnel: Option<PathBuf>,
    /// The server's config lines for [`System::TetherAudit`].
    pub(crate) audit_yaml: String,
    /// WAN mode: the path every system's link (or, for direct, the client's) goes through.
    pub(crate) via: Option<LinkSpec>,
}

/// A started system.
pub(crate) struct Running {
    /// Entry to the echo target.
    pub(crate) echo: SocketAddr,
    /// Entry to the iperf3 target.
    pub(crate) iperf: SocketAddr,
    parts: Parts,
}

enum Parts {
    Direct { _relay: Option<DelayRelay> },
    Floor(Floor),
    Tether(TetherPair),
    Rathole(Rathole),
    Wstunnel(Wstunnel),
}

impl Launch<'_> {
    /// Starts `system` and waits until it forwards an echo.
    pub(crate) async fn start(&self, system: System) -> Result<Running> {
        let targets = [self.targets.echo, self.targets.iperf];
        let running = match system {
            System::Direct => {
                let relay = self.relay(&targets).await?;
                let [echo, iperf] = entries(relay.as_ref(), &targets);
                Running::new(echo, iperf, Parts::Direct { _relay: relay })
            }
            System::Floor => {
                let floor = Floor::start(self.targets, self.via).await?;
                Running::new(floor.entries[0], floor.entries[1], Parts::Floor(floor))
            }
            System::Tether => self.start_tether("").await?,
            System::TetherAudit => self.start_tether(&self.audit_yaml).await?,
            System::Rathole => {
                let binary = self.rathole.as_deref().context("no rathole binary")?;
                let r = Rathole::start(binary, self.pki.dir(), self.targets, self.via).await?;
                Running::new(r.echo, r.iperf, Parts::Rathole(r))
            }
            System::Wstunnel => {
                let binary = self.wstunnel.as_deref().context("no wstunnel binary")?;
                let w = Wstunnel::start(binary, self.pki, self.targets, self.via).await?;
                Running::new(w.echo, w.iperf, Parts::Wstunnel(w))
            }
        };
        wait_for_echo(running.echo, system.label(), START_WAIT).await?;
        // Some peers bind their entries one by one (rathole's iperf3 entry came up after its
        // echo entry): the iperf3 entry must accept too before the first throughput test.
        wait_accepting(running.iperf, START_WAIT)
            .await
            .with_context(|| format!("{}'s iperf3 entry", system.label()))?;
        Ok(running)
    }

    async fn relay(&self, upstreams: &[SocketAddr]) -> Result<Option<DelayRelay>> {
        Ok(match self.via {
            Some(spec) => Some(DelayRelay::start(upstreams, spec).await?),
            None => None,
        })
    }

    /// The release binary with mutual TLS, as the `tunnels` benchmark always started it; in
    /// WAN mode the agent dials the server through the delay relay.
    async fn start_tether(&self, server_extra: &str) -> Result<Running> {
        let targets = [self.targets.echo, self.targets.iperf];
        let pair =
            TetherPair::start(self.tether, self.pki, &targets, server_extra, self.via).await?;
        let (echo, iperf) = (pair.server.forwards[0], pair.server.forwards[1]);
        Ok(Running::new(echo, iperf, Parts::Tether(pair)))
    }
}

/// The relay's listen addresses when there is one, else the upstreams themselves.
fn entries(relay: Option<&DelayRelay>, upstreams: &[SocketAddr; 2]) -> [SocketAddr; 2] {
    match relay {
        Some(r) => [r.addrs[0], r.addrs[1]],
        None => *upstreams,
    }
}

impl Running {
    fn new(echo: SocketAddr, iperf: SocketAddr, parts: Parts) -> Running {
        Running { echo, iperf, parts }
    }

    /// The tunnel's process ids (none for direct).
    pub(crate) fn pids(&self) -> Result<Vec<u32>> {
        match &self.parts {
            Parts::Direct { .. } => Ok(Vec::new()),
            Parts::Floor(floor) => floor.pids(),
            Parts::Tether(pair) => pair.pids(),
            Parts::Rathole(r) => r.pids(),
            Parts::Wstunnel(w) => w.pids(),
        }
    }

    /// Stops its processes (and its delay relay, if any).
    pub(crate) async fn stop(self) -> Result<()> {
        match self.parts {
            Parts::Direct { .. } => Ok(()),
            Parts::Floor(floor) => floor.stop().await,
            Parts::Tether(pair) => pair.stop().await,
            Parts::Rathole(r) => r.stop().await,
            Parts::Wstunnel(w) => w.stop().await,
        }
    }
}

/// The floor: `near` (where clients connect, like a tunnel's server) relays each connection
/// to `far` (beside the targets, like an agent), which relays it to the target.
struct Floor {
    near: Child,
    far: Child,
    _link: Option<DelayRelay>,
    entries: Vec<SocketAddr>,
}

impl Floor {
    async fn start(targets: &Targets, via: Option<LinkSpec>) -> Result<Floor> {
        let (far, far_addrs) = spawn_splice_relay(&[targets.echo, targets.iperf]).await?;
        let link = match via {
            Some(spec) => Some(DelayRelay::start(&far_addrs, spec).await?),
            None => None,
        };
        let upstreams = link.as_ref().map_or(far_addrs.clone(), |l| l.addrs.clone());
        let (near, entries) = spawn_splice_relay(&upstreams).await?;
        Ok(Floor {
            near,
            far,
            _link: link,
            entries,
        })
    }

    fn pids(&self) -> Result<Vec<u32>> {
        Ok(vec![
            self.near.id().context("the near splice relay exited")?,
            self.far.id().context("the far splice relay exited")?,
        ])
    }

    async fn stop(mut self) -> Result<()> {
        terminate(&mut self.near).await?;
        terminate(&mut self.far).await
    }
}

/// A `tether-bench splice-relay` child with a loopback listener for each of `upstreams`.
async fn spawn_splice_relay(upstreams: &[SocketAddr]) -> Result<(Child, Vec<SocketAddr>)> {
    let exe = std::env::current_exe().context("locating tether-bench itself")?;
    let mut cmd = Command::new(exe);
    cmd.arg("splice-relay");
    for upstream in upstreams {
        cmd.args(["--route", &format!("127.0.0.1:0={upstream}")]);
    }
    spawn_reporting(cmd, upstreams.len()).await
}
