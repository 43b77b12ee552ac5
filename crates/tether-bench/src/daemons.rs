//! `tether server` and `tether agent` as child processes: the binary (built on demand), a
//! throwaway PKI, generated configs, and the addresses they bound, read from their JSON logs.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::Common;
use crate::delay_relay::{DelayRelay, LinkSpec};
use crate::http_get;

/// Streams per session in the benchmark configs: the idle test holds 5,000 connections through
/// one agent, beyond the default cap of 1,024.
const BENCH_MAX_STREAMS: usize = 16_384;

/// How long a daemon may take to start or an agent to connect.
const START_WAIT: Duration = Duration::from_secs(60);

/// The workspace this tool was built from.
pub(crate) fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The tether binary to measure: `--tether`, or the workspace's, built now (release; debug for
/// `--smoke`, which CI has built already).
pub(crate) fn tether_binary(common: &Common) -> Result<PathBuf> {
    if let Some(path) = &common.tether {
        if !path.is_file() {
            bail!("--tether {}: no such file", path.display());
        }
        return Ok(path.clone());
    }
    let root = workspace_root();
    let mut cargo = std::process::Command::new(std::env::var("CARGO").unwrap_or("cargo".into()));
    cargo
        .args([
            "build", "--quiet", "--locked", "-p", "tether", "--bin", "tether",
        ])
        .current_dir(&root);
    let profile = if common.smoke {
        "debug"
    } else {
        cargo.arg("--release");
        "release"
    };
    eprintln!("building the tether binary ({profile})");
    let status = cargo.status().context("running cargo build")?;
    if !status.success() {
        bail!("cargo build -p tether failed ({status})");
    }
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    Ok(target.join(profile).join("tether"))
}

/// A CA, a server certificate for 127.0.0.1, and agent certificates, in a temporary folder.
pub(crate) struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    /// Creates the CA and server certificate, and one certificate for each of `agents`.
    pub(crate) fn new(agents: &[&str]) -> Result<Pki> {
        let dir = tempfile::Builder::new()
            .prefix("tether-bench-")
            .tempdir()
            .context("creating a temporary folder")?;
        tether_common::pki::init_dir(
            dir.path(),
            &["localhost".to_owned()],
            &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
        )?;
        for agent in agents {
            tether_common::pki::issue_agent_files(dir.path(), agent)?;
        }
        Ok(Pki { dir })
    }

    /// The folder holding the files (and the generated configs and logs).
    pub(crate) fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// A running `tether server`.
pub(crate) struct ServerProcess {
    child: Child,
    /// The tunnel listener.
    pub(crate) tunnel: SocketAddr,
    /// The admin listener (`/metrics`).
    pub(crate) admin: SocketAddr,
    /// The forward listeners, in config order.
    pub(crate) forwards: Vec<SocketAddr>,
}

impl ServerProcess {
    /// Writes `server.yaml` (tunnel on `listen`, forwards for agent `client` to `targets`,
    /// `extra` YAML appended) into the PKI folder and starts the server with it.
    pub(crate) async fn start(
        binary: &Path,
        pki: &Pki,
        listen: SocketAddr,
        client: &str,
        targets: &[SocketAddr],
        extra: &str,
    ) -> Result<ServerProcess> {
        Self::start_named(binary, pki, "server", listen, client, targets, extra).await
    }

    /// [`start`](Self::start) with its config and log files named `<name>.yaml` and
    /// `<name>.log` (several servers sharing one PKI folder).
    pub(crate) async fn start_named(
        binary: &Path,
        pki: &Pki,
        name: &str,
        listen: SocketAddr,
        client: &str,
        targets: &[SocketAddr],
        extra: &str,
    ) -> Result<ServerProcess> {
        let mut yaml = format!(
            "version: 1\n\
             listen: \"{listen}\"\n\
             admin_listen: \"127.0.0.1:0\"\n\
             tls: {{ cert: server.pem, key: server-key.pem, client_ca: ca.pem }}\n\
             session: {{ max_streams: {BENCH_MAX_STREAMS} }}\n\
             {extra}\n"
        );
        if !targets.is_empty() {
            yaml.push_str("forwards:\n");
            for (i, target) in targets.iter().enumerate() {
                yaml.push_str(&format!(
                    "  - {{ name: f{i}, listen: \"127.0.0.1:0\", client: {client}, target: \"{target}\" }}\n"
                ));
            }
        }
        Self::launch(binary, pki, name, &yaml).await
    }

    /// Writes `yaml` as `<name>.yaml` into the PKI folder, starts the server with it (log in
    /// `<name>.log`) and waits until it runs.
    pub(crate) async fn launch(
        binary: &Path,
        pki: &Pki,
        name: &str,
        yaml: &str,
    ) -> Result<ServerProcess> {
        let config = pki.dir().join(format!("{name}.yaml"));
        std::fs::write(&config, yaml).with_context(|| format!("writing {name}.yaml"))?;
        let log = pki.dir().join(format!("{name}.log"));
        let child = spawn(binary, "server", &config, &log)?;
        let deadline = Instant::now() + START_WAIT;
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let forwards: Vec<SocketAddr> = text
                .lines()
                .filter_map(|line| log_field(line, "forward listening", "listen"))
                .collect();
            let running = text.lines().find_map(|line| {
                Some((
                    log_field(line, "server running", "listen")?,
                    log_field(line, "server running", "admin")?,
                ))
            });
            if let Some((tunnel, admin)) = running {
                return Ok(ServerProcess {
                    child,
                    tunnel,
                    admin,
                    forwards,
                });
            }
            if Instant::now() > deadline {
                bail!("the server did not start in {START_WAIT:?}; its log:\n{text}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The process id.
    pub(crate) fn pid(&self) -> Result<u32> {
        self.child.id().context("the server has exited")
    }

    /// `tether_agents_connected` on its `/metrics`.
    pub(crate) async fn agents_connected(&self) -> Result<u64> {
        let text = http_get::get(self.admin, "/metrics").await?;
        let value = http_get::sample(&text, "tether_agents_connected")
            .context("no tether_agents_connected in /metrics")?;
        Ok(value as u64)
    }

    /// Polls `/metrics` until `tether_agents_connected` is `n`, for at most `wait`.
    pub(crate) async fn wait_for_agents(&self, n: u64, wait: Duration) -> Result<()> {
        let deadline = Instant::now() + wait;
        loop {
            let connected = self.agents_connected().await.unwrap_or(0);
            if connected == n {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{connected} of {n} agents connected after {wait:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM (graceful: GOAWAY, drain), then wait for the process to exit.
    pub(crate) async fn stop(mut self) -> Result<()> {
        terminate(&mut self.child).await
    }

    /// SIGTERM, then its exit status, or `None` when it had not exited within `wait` (it is
    /// killed then).
    pub(crate) async fn stop_within(mut self, wait: Duration) -> Result<Option<ExitStatus>> {
        if let Some(pid) = self.child.id() {
            Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .await?;
        }
        match tokio::time::timeout(wait, self.child.wait()).await {
            Ok(status) => Ok(Some(status?)),
            Err(_) => {
                self.child.kill().await?;
                Ok(None)
            }
        }
    }

    /// SIGKILL, and reap the process.
    pub(crate) async fn kill(mut self) -> Result<()> {
        self.child.kill().await.context("killing the server")
    }
}

/// A running `tether agent` child process.
pub(crate) struct AgentProcess {
    child: Child,
}

impl AgentProcess {
    /// Writes `agent.yaml` for agent `id` (dialing `server`, allowed to reach `targets`) and
    /// starts the agent.
    pub(crate) fn start(
        binary: &Path,
        pki: &Pki,
        id: &str,
        server: SocketAddr,
        targets: &[SocketAddr],
    ) -> Result<AgentProcess> {
        let ports: Vec<String> = targets.iter().map(|t| t.port().to_string()).collect();
        let yaml = format!(
            "version: 1\n\
             server_url: \"wss://{server}/v1/connect\"\n\
             tls: {{ cert: agent-{id}.pem, key: agent-{id}-key.pem, server_ca: ca.pem }}\n\
             admin_listen: \"\"\n\
             session: {{ max_streams: {BENCH_MAX_STREAMS} }}\n\
             policy:\n  allow:\n    - {{ cidrs: [\"127.0.0.1/32\"], ports: [{}] }}\n",
            ports.join(", ")
        );
        let config = pki.dir().join("agent.yaml");
        std::fs::write(&config, yaml).context("writing agent.yaml")?;
        let log = pki.dir().join("agent.log");
        Ok(AgentProcess {
            child: spawn(binary, "agent", &config, &log)?,
        })
    }

    /// The process id.
    pub(crate) fn pid(&self) -> Result<u32> {
        self.child.id().context("the agent has exited")
    }

    /// SIGTERM, then wait for the process to exit.
    pub(crate) async fn stop(mut self) -> Result<()> {
        terminate(&mut self.child).await
    }
}

/// A server and an agent connected to it, forwarding to `targets` (entries in the same order).
pub(crate) struct TetherPair {
    pub(crate) server: ServerProcess,
    pub(crate) agent: AgentProcess,
    /// The delay relay on the agent's connection to the server, if any.
    _link: Option<DelayRelay>,
}

impl TetherPair {
    /// Starts both, with `server_extra` YAML in the server's config and the agent dialling
    /// through a delay relay when `via` is given, and waits until the agent's session is
    /// registered.
    pub(crate) async fn start(
        binary: &Path,
        pki: &Pki,
        targets: &[SocketAddr],
        server_extra: &str,
        via: Option<LinkSpec>,
    ) -> Result<Self> {
        let listen = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        let server =
            ServerProcess::start(binary, pki, listen, "bench", targets, server_extra).await?;
        let link = match via {
            Some(spec) => Some(DelayRelay::start(&[server.tunnel], spec).await?),
            None => None,
        };
        let dial = link.as_ref().map_or(server.tunnel, |l| l.addrs[0]);
        let agent = AgentProcess::start(binary, pki, "bench", dial, targets)?;
        server.wait_for_agents(1, START_WAIT).await?;
        Ok(TetherPair {
            server,
            agent,
            _link: link,
        })
    }

    /// Both process ids.
    pub(crate) fn pids(&self) -> Result<Vec<u32>> {
        Ok(vec![self.server.pid()?, self.agent.pid()?])
    }

    /// Stops both.
    pub(crate) async fn stop(self) -> Result<()> {
        self.agent.stop().await?;
        self.server.stop().await
    }
}

fn spawn(binary: &Path, command: &str, config: &Path, log: &Path) -> Result<Child> {
    let log_file =
        std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    Command::new(binary)
        .args(["--log-format", "json", "--log", "info", command, "--config"])
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {} {command}", binary.display()))
}

/// SIGTERM through `kill(1)` (no unsafe code here), then SIGKILL if it has not exited in 30 s.
pub(crate) async fn terminate(child: &mut Child) -> Result<()> {
    let Some(pid) = child.id() else {
        return Ok(());
    };
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .await;
    match tokio::time::timeout(Duration::from_secs(30), child.wait()).await {
        Ok(waited) => {
            waited?;
        }
        Err(_) => {
            child.kill().await?;
        }
    }
    Ok(())
}

/// If `line` is the JSON log event `message`, the socket address in its field `field`.
fn log_field(line: &str, message: &str, field: &str) -> Option<SocketAddr> {
    let value: serde_json::Value = serde_json::from_str(line).ok()?;
    let fields = value.get("fields")?;
    if fields.get("message")?.as_str()? != message {
        return None;
    }
    fields.get(field)?.as_str()?.parse().ok()
}

/// A port that was free a moment ago, for programs that take a port number rather than a
/// listener (the harness's targets, rathole). Another process could take it in between; on a
/// benchmark machine that is accepted.
pub(crate) fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(listener.local_addr()?.port())
}
