//! Peer tunnels measured in the same run when their binaries are on PATH: rathole (plain TCP,
//! token auth; `cargo install rathole`).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::daemons::{free_port, terminate};
use crate::harness::{Targets, echo_once};

/// `name` on PATH, if there.
pub(crate) fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join(name))
        .find(|path| path.is_file())
}

/// A rathole server and client forwarding an echo entry and an iperf3 entry.
pub(crate) struct Rathole {
    server: Child,
    client: Child,
    /// Entry to the echo target.
    pub(crate) echo: SocketAddr,
    /// Entry to the iperf3 target.
    pub(crate) iperf: SocketAddr,
}

impl Rathole {
    /// Writes both configs into `dir`, starts both processes, and waits until an echo passes.
    pub(crate) async fn start(binary: &Path, dir: &Path, targets: &Targets) -> Result<Rathole> {
        let control = free_port()?;
        let echo = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
        let iperf = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
        let server_toml = format!(
            "[server]\nbind_addr = \"127.0.0.1:{control}\"\ndefault_token = \"tether-bench\"\n\
             [server.services.echo]\nbind_addr = \"{echo}\"\n\
             [server.services.iperf]\nbind_addr = \"{iperf}\"\n"
        );
        let client_toml = format!(
            "[client]\nremote_addr = \"127.0.0.1:{control}\"\ndefault_token = \"tether-bench\"\n\
             [client.services.echo]\nlocal_addr = \"{}\"\n\
             [client.services.iperf]\nlocal_addr = \"{}\"\n",
            targets.echo, targets.iperf
        );
        let server_path = dir.join("rathole-server.toml");
        let client_path = dir.join("rathole-client.toml");
        std::fs::write(&server_path, server_toml)?;
        std::fs::write(&client_path, client_toml)?;
        let server = spawn(binary, "--server", &server_path)?;
        let client = spawn(binary, "--client", &client_path)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while echo_once(echo).await.is_err() {
            if Instant::now() > deadline {
                bail!("rathole did not forward an echo within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Rathole {
            server,
            client,
            echo,
            iperf,
        })
    }

    /// Both process ids.
    pub(crate) fn pids(&self) -> Result<Vec<u32>> {
        Ok(vec![
            self.server.id().context("rathole server exited")?,
            self.client.id().context("rathole client exited")?,
        ])
    }

    /// Stops both.
    pub(crate) async fn stop(mut self) -> Result<()> {
        terminate(&mut self.client).await?;
        terminate(&mut self.server).await
    }
}

fn spawn(binary: &Path, mode: &str, config: &Path) -> Result<Child> {
    Command::new(binary)
        .arg(mode)
        .arg(config)
        .env("RUST_LOG", "error")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {} {mode}", binary.display()))
}
