//! Peer tunnels measured in the same run when their binaries are found (PATH or a flag):
//! rathole (plain TCP, token auth; `cargo install rathole`) and wstunnel (wss with mutual TLS,
//! reverse tunnels; built by hand from its source). Their link can go through a delay relay.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::process::{Child, Command};

use crate::bench_targets::{Targets, wait_for_echo};
use crate::daemons::{Pki, free_port, terminate};
use crate::delay_relay::{DelayRelay, LinkSpec};

/// How long a peer may take to forward its first echo.
const START_WAIT: Duration = Duration::from_secs(30);

/// `explicit` if given (it must exist), else `name` on PATH, if there.
pub(crate) fn locate(name: &str, explicit: Option<&Path>) -> Result<Option<PathBuf>> {
    match explicit {
        Some(path) if path.is_file() => Ok(Some(path.to_owned())),
        Some(path) => bail!("--{name} {}: no such file", path.display()),
        None => Ok(find_on_path(name)),
    }
}

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
    _link: Option<DelayRelay>,
    /// Entry to the echo target.
    pub(crate) echo: SocketAddr,
    /// Entry to the iperf3 target.
    pub(crate) iperf: SocketAddr,
}

impl Rathole {
    /// Writes both configs into `dir`, starts both processes (the client dialling through a
    /// delay relay when `via` is given), and waits until an echo passes.
    pub(crate) async fn start(
        binary: &Path,
        dir: &Path,
        targets: &Targets,
        via: Option<LinkSpec>,
    ) -> Result<Rathole> {
        let control = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
        let link = match via {
            Some(spec) => Some(DelayRelay::start(&[control], spec).await?),
            None => None,
        };
        let dial = link.as_ref().map_or(control, |l| l.addrs[0]);
        let echo = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
        let iperf = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
        let server_toml = format!(
            "[server]\nbind_addr = \"{control}\"\ndefault_token = \"tether-bench\"\n\
             [server.services.echo]\nbind_addr = \"{echo}\"\n\
             [server.services.iperf]\nbind_addr = \"{iperf}\"\n"
        );
        let client_toml = format!(
            "[client]\nremote_addr = \"{dial}\"\ndefault_token = \"tether-bench\"\n\
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
        wait_for_echo(echo, "rathole", START_WAIT).await?;
        Ok(Rathole {
            server,
            client,
            _link: link,
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

/// A wstunnel server (wss, mutual TLS with the benchmark's PKI) and a client holding two
/// reverse tunnels (`-R`): the server listens on the entries, the client dials the targets.
pub(crate) struct Wstunnel {
    server: Child,
    client: Child,
    _link: Option<DelayRelay>,
    /// Entry to the echo target.
    pub(crate) echo: SocketAddr,
    /// Entry to the iperf3 target.
    pub(crate) iperf: SocketAddr,
}

impl Wstunnel {
    /// Starts both (the client dialling through a delay relay when `via` is given) and waits
    /// until an echo passes.
    pub(crate) async fn start(
        binary: &Path,
        pki: &Pki,
        targets: &Targets,
        via: Option<LinkSpec>,
    ) -> Result<Wstunnel> {
        let listen = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
        let echo = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
        let iperf = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
        let link = match via {
            Some(spec) => Some(DelayRelay::start(&[listen], spec).await?),
            None => None,
        };
        let dial = link.as_ref().map_or(listen, |l| l.addrs[0]);
        let dir = pki.dir();
        let mut server = Command::new(binary);
        server
            .args(["server", "--log-lvl", "ERROR"])
            .arg("--tls-certificate")
            .arg(dir.join("server.pem"))
            .arg("--tls-private-key")
            .arg(dir.join("server-key.pem"))
            .arg("--tls-client-ca-certs")
            .arg(dir.join("ca.pem"))
            .arg(format!("wss://{listen}"));
        let server = quiet(&mut server)
            .spawn()
            .context("starting wstunnel server")?;
        let mut client = Command::new(binary);
        client
            .args(["client", "--log-lvl", "ERROR"])
            .arg("--tls-certificate")
            .arg(dir.join("agent-bench.pem"))
            .arg("--tls-private-key")
            .arg(dir.join("agent-bench-key.pem"))
            .arg("-R")
            .arg(format!("tcp://{echo}:{}", targets.echo))
            .arg("-R")
            .arg(format!("tcp://{iperf}:{}", targets.iperf))
            .arg(format!("wss://{dial}"));
        let client = quiet(&mut client)
            .spawn()
            .context("starting wstunnel client")?;
        wait_for_echo(echo, "wstunnel", START_WAIT).await?;
        Ok(Wstunnel {
            server,
            client,
            _link: link,
            echo,
            iperf,
        })
    }

    /// Both process ids.
    pub(crate) fn pids(&self) -> Result<Vec<u32>> {
        Ok(vec![
            self.server.id().context("wstunnel server exited")?,
            self.client.id().context("wstunnel client exited")?,
        ])
    }

    /// Stops both.
    pub(crate) async fn stop(mut self) -> Result<()> {
        terminate(&mut self.client).await?;
        terminate(&mut self.server).await
    }
}

fn quiet(cmd: &mut Command) -> &mut Command {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
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
