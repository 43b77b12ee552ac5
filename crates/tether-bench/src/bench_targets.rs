//! The targets every system forwards to, started by the benchmark and kept up for a whole run:
//! the echo server (a child `tether-bench echo-server`) and `iperf3 -s`.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::daemons::{free_port, terminate};

/// How long a target may take to come up.
const START_WAIT: Duration = Duration::from_secs(30);

/// The echo and iperf3 servers.
pub(crate) struct Targets {
    echo_child: Child,
    /// Replaced if it exits (see [`Targets::ensure_iperf`]).
    iperf_child: Mutex<Child>,
    /// The echo server.
    pub(crate) echo: SocketAddr,
    /// `iperf3 -s`.
    pub(crate) iperf: SocketAddr,
}

impl Targets {
    /// Starts both and waits until the echo server answers and iperf3 accepts.
    pub(crate) async fn start() -> Result<Targets> {
        let exe = std::env::current_exe().context("locating tether-bench itself")?;
        let mut cmd = Command::new(exe);
        cmd.args(["echo-server", "--listen", "127.0.0.1:0"]);
        let (echo_child, addrs) = spawn_reporting(cmd, 1).await?;
        let echo = addrs[0];
        let (iperf_child, iperf) = start_iperf().await?;
        echo_once(echo).await.context("the echo target")?;
        Ok(Targets {
            echo_child,
            iperf_child: Mutex::new(iperf_child),
            echo,
            iperf,
        })
    }

    /// Brings `iperf3 -s` back (same port) if it has exited, as it may after a broken test.
    pub(crate) async fn ensure_iperf(&self) -> Result<()> {
        {
            let mut child = self.iperf_child.lock().unwrap_or_else(|e| e.into_inner());
            if child.try_wait()?.is_none() {
                return Ok(());
            }
            eprintln!("iperf3 -s exited; starting it again");
            *child = spawn_iperf(self.iperf.port())?;
        }
        wait_accepting(self.iperf, START_WAIT).await
    }

    /// Stops both.
    pub(crate) async fn stop(mut self) {
        let mut iperf = self
            .iperf_child
            .into_inner()
            .unwrap_or_else(|e| e.into_inner());
        let _ = terminate(&mut iperf).await;
        let _ = terminate(&mut self.echo_child).await;
    }
}

async fn start_iperf() -> Result<(Child, SocketAddr)> {
    let port = free_port()?;
    let child = spawn_iperf(port)?;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    wait_accepting(addr, START_WAIT).await?;
    Ok((child, addr))
}

fn spawn_iperf(port: u16) -> Result<Child> {
    Command::new("iperf3")
        .args(["-s", "-B", "127.0.0.1", "-p", &port.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting iperf3 -s (apt-get install iperf3)")
}

/// Polls until `addr` accepts a TCP connection (closed at once), for at most `wait`.
pub(crate) async fn wait_accepting(addr: SocketAddr, wait: Duration) -> Result<()> {
    let deadline = Instant::now() + wait;
    while TcpStream::connect(addr).await.is_err() {
        if Instant::now() > deadline {
            bail!("nothing accepted on {addr} within {wait:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Spawns `cmd` (a tether-bench child mode) and reads the `listening <addr>` lines its stdout
/// starts with: `count` of them.
pub(crate) async fn spawn_reporting(
    mut cmd: Command,
    count: usize,
) -> Result<(Child, Vec<SocketAddr>)> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("starting a tether-bench child process")?;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let mut addrs = Vec::with_capacity(count);
    while addrs.len() < count {
        let line = tokio::time::timeout(START_WAIT, lines.next_line())
            .await
            .context("a child process did not report its address in time")??
            .context("a child process exited before reporting its address")?;
        let addr = line
            .strip_prefix("listening ")
            .and_then(|a| a.parse().ok())
            .with_context(|| format!("a child process printed {line:?}, not `listening ADDR`"))?;
        addrs.push(addr);
    }
    Ok((child, addrs))
}

/// One byte through `entry` and back: is a path to the echo server up?
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

/// Polls [`echo_once`] through `entry` until it passes, for at most `wait`.
pub(crate) async fn wait_for_echo(entry: SocketAddr, what: &str, wait: Duration) -> Result<()> {
    let deadline = Instant::now() + wait;
    loop {
        match echo_once(entry).await {
            Ok(()) => return Ok(()),
            Err(err) if Instant::now() > deadline => {
                bail!("{what} did not forward an echo within {wait:?}: {err:#}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}
