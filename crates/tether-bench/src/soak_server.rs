//! The soak's server across its lives: the first start on ephemeral ports, then every restart
//! (after SIGTERM or SIGKILL) on the same tunnel, admin and forward addresses, so that agents
//! and consumers find it again.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::daemons::{Pki, ServerProcess};

/// How long a SIGTERMed server may take to drain and exit.
const EXIT_WAIT: Duration = Duration::from_secs(30);

/// The addresses every life listens on.
#[derive(Debug, Clone, Copy)]
struct Ports {
    tunnel: SocketAddr,
    admin: SocketAddr,
    forward: SocketAddr,
}

/// The server now running, and how to start the next one.
pub(crate) struct SoakServer {
    binary: PathBuf,
    target: SocketAddr,
    ports: Ports,
    /// The running process (`None` only inside [`restart`](Self::restart)).
    process: Option<ServerProcess>,
    /// Lives started so far (1 for the first).
    pub(crate) life: u32,
}

impl SoakServer {
    /// Starts the first life, forwarding client `soak` to `target`, on ports below the
    /// ephemeral range (see [`fixed_port`]).
    pub(crate) async fn start(
        binary: PathBuf,
        pki: &Pki,
        target: SocketAddr,
    ) -> Result<SoakServer> {
        let mut rng = fastrand::Rng::new();
        let ports = Ports {
            tunnel: fixed_port(&mut rng)?,
            admin: fixed_port(&mut rng)?,
            forward: fixed_port(&mut rng)?,
        };
        let process = ServerProcess::launch(&binary, pki, "server-1", &yaml(ports, target)).await?;
        Ok(SoakServer {
            binary,
            target,
            ports,
            process: Some(process),
            life: 1,
        })
    }

    /// The tunnel listener (the same in every life).
    pub(crate) fn tunnel(&self) -> SocketAddr {
        self.ports.tunnel
    }

    /// The forward the consumers dial (the same in every life).
    pub(crate) fn forward(&self) -> SocketAddr {
        self.ports.forward
    }

    /// Ends this life (SIGKILL when `kill`, else SIGTERM, which must end in a clean exit within
    /// 30 s) and starts the next on the same addresses.
    pub(crate) async fn restart(&mut self, pki: &Pki, kill: bool) -> Result<()> {
        self.life += 1;
        let name = format!("server-{}", self.life);
        let next_yaml = yaml(self.ports, self.target);
        let old = self.process.take().context("no server running")?;
        if kill {
            old.kill().await?;
        } else {
            match old.stop_within(EXIT_WAIT).await? {
                Some(status) if status.success() => {}
                Some(status) => bail!(
                    "server life {} exited with {status} on SIGTERM",
                    self.life - 1
                ),
                None => bail!(
                    "server life {} did not exit within {EXIT_WAIT:?} of SIGTERM",
                    self.life - 1
                ),
            }
        }
        self.process = Some(ServerProcess::launch(&self.binary, pki, &name, &next_yaml).await?);
        Ok(())
    }

    /// The running process.
    pub(crate) fn process(&self) -> Result<&ServerProcess> {
        self.process.as_ref().context("no server running")
    }

    /// SIGTERM and wait for the exit (the end of the run).
    pub(crate) async fn stop(mut self) -> Result<()> {
        match self.process.take() {
            Some(process) => process.stop().await,
            None => Ok(()),
        }
    }
}

/// A free port on 127.0.0.1 below the kernel's ephemeral range. While the server restarts,
/// consumers keep dialing its forward port and the relay its tunnel port; were that port in
/// the ephemeral range, a dial could be given it as its own source port and connect the socket
/// to itself (TCP simultaneous open), which echoes every byte and holds the port the next life
/// must bind.
fn fixed_port(rng: &mut fastrand::Rng) -> Result<SocketAddr> {
    let range =
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let low = range
        .split_whitespace()
        .next()
        .and_then(|p| p.parse::<u16>().ok())
        .unwrap_or(32_768);
    let floor = 10_000.min(low / 2);
    for _ in 0..100 {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, rng.u16(floor..low)));
        if std::net::TcpListener::bind(addr).is_ok() {
            return Ok(addr);
        }
    }
    bail!("no free port below {low} on 127.0.0.1 after 100 tries")
}

/// server.yaml with compressed timeouts: tunnel, admin and one forward (client `soak`).
fn yaml(ports: Ports, target: SocketAddr) -> String {
    format!(
        "version: 1\n\
         listen: \"{}\"\n\
         admin_listen: \"{}\"\n\
         tls: {{ cert: server.pem, key: server-key.pem, client_ca: ca.pem }}\n\
         dial_timeout: 2s\n\
         drain_timeout: 1s\n\
         session: {{ ping_interval: 1s, idle_timeout: 3s }}\n\
         forwards:\n  - {{ name: f0, listen: \"{}\", client: soak, target: \"{target}\" }}\n",
        ports.tunnel, ports.admin, ports.forward
    )
}
