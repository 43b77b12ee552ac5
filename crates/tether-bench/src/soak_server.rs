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
    /// Starts the first life, forwarding client `soak` to `target`.
    pub(crate) async fn start(
        binary: PathBuf,
        pki: &Pki,
        target: SocketAddr,
    ) -> Result<SoakServer> {
        let any = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        let first = Ports {
            tunnel: any,
            admin: any,
            forward: any,
        };
        let process = ServerProcess::launch(&binary, pki, "server-1", &yaml(first, target)).await?;
        let ports = Ports {
            tunnel: process.tunnel,
            admin: process.admin,
            forward: *process
                .forwards
                .first()
                .context("the server bound no forward")?,
        };
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
