//! Running the real `tether` binary as a child process: build it once, start it with a config,
//! read its JSON log lines to learn the addresses it bound, and kill it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStderr, Command};

/// Path of the `tether` binary of this build profile, built on first use.
pub fn tether_binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        let status = std::process::Command::new(env!("CARGO"))
            .args(["build", "--quiet", "-p", "tether", "--bin", "tether"])
            .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
            .status()
            .expect("run cargo build for the tether binary");
        assert!(status.success(), "cargo build -p tether failed");
        // The test executable lives in target/<profile>/deps; the binary one level up.
        let exe = std::env::current_exe().expect("test executable path");
        let dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target/<profile> directory");
        dir.join("tether")
    })
}

/// A `tether server` child process. Killed when dropped.
pub struct ServerProcess {
    child: Child,
    /// The tunnel address it bound.
    pub tunnel_addr: SocketAddr,
    /// The admin address it bound (`/metrics`).
    pub admin_addr: SocketAddr,
    /// The forward addresses it bound, in log order.
    pub forward_addrs: Vec<SocketAddr>,
    _stderr: tokio::task::JoinHandle<()>,
}

impl ServerProcess {
    /// Starts `tether server --config <config>` and waits until it logs "server running".
    pub async fn start(config: &Path, forwards: usize) -> Self {
        let mut child = Command::new(tether_binary())
            .args([
                "--log-format",
                "json",
                "--log",
                "info",
                "server",
                "--config",
            ])
            .arg(config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn tether server");
        let stderr = child.stderr.take().expect("piped stderr");
        let mut lines = BufReader::new(stderr).lines();
        let mut forward_addrs = Vec::new();
        let (tunnel_addr, admin_addr) = tokio::time::timeout(crate::WAIT, async {
            loop {
                let line = lines
                    .next_line()
                    .await
                    .expect("read server log")
                    .expect("server exited before it was running");
                if let Some(addr) = log_field(&line, "forward listening", "listen") {
                    forward_addrs.push(addr);
                }
                if let Some(addr) = log_field(&line, "server running", "listen") {
                    let admin = log_field(&line, "server running", "admin")
                        .expect("\"server running\" names the admin address");
                    return (addr, admin);
                }
            }
        })
        .await
        .expect("server runs in time");
        assert_eq!(forward_addrs.len(), forwards, "forwards logged");
        let drain = tokio::spawn(drain_lines(lines));
        Self {
            child,
            tunnel_addr,
            admin_addr,
            forward_addrs,
            _stderr: drain,
        }
    }

    /// The process id (to send it signals).
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// SIGKILL, and wait for the process to be gone.
    pub async fn kill(mut self) {
        self.child.kill().await.expect("kill the server");
    }

    /// SIGTERM (a graceful drain), then waits up to `limit` for the process to exit; its exit
    /// status.
    pub async fn terminate(mut self, limit: std::time::Duration) -> std::process::ExitStatus {
        let pid = self.child.id().expect("the server is running");
        // The shell's built-in `kill`: no procps needed on a minimal CI image.
        let sent = std::process::Command::new("sh")
            .args(["-c", &format!("kill -TERM {pid}")])
            .status()
            .expect("run kill");
        assert!(sent.success(), "SIGTERM to {pid}");
        tokio::time::timeout(limit, self.child.wait())
            .await
            .expect("the server exits in time after SIGTERM")
            .expect("wait for the server")
    }
}

async fn drain_lines(mut lines: tokio::io::Lines<BufReader<ChildStderr>>) {
    while let Ok(Some(_)) = lines.next_line().await {}
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

/// A `tether agent` child process with an admin listener. Killed when dropped.
pub struct AgentProcess {
    child: Child,
    /// The admin address it bound (`/metrics`, `/readyz`).
    pub admin_addr: SocketAddr,
    _stderr: tokio::task::JoinHandle<()>,
}

impl AgentProcess {
    /// Starts `tether agent --config <config>` (whose `admin_listen` must be set) and waits
    /// until it logs "admin listener serving".
    pub async fn start(config: &Path) -> Self {
        let mut command = Command::new(tether_binary());
        command
            .args(["--log-format", "json", "--log", "info", "agent", "--config"])
            .arg(config);
        Self::spawn(command).await
    }

    /// Runs `command`, which must end up executing `tether --log-format json agent ...` (a
    /// wrapper such as `unshare` that `exec`s it), and waits for its admin listener.
    pub async fn spawn(mut command: Command) -> Self {
        let mut child = command
            .env_remove("TETHER_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn tether agent");
        let stderr = child.stderr.take().expect("piped stderr");
        let mut lines = BufReader::new(stderr).lines();
        let admin_addr = tokio::time::timeout(crate::WAIT, async {
            loop {
                let line = lines
                    .next_line()
                    .await
                    .expect("read agent log")
                    .expect("agent exited before its admin listener served");
                if let Some(addr) = log_field(&line, "admin listener serving", "addr") {
                    return addr;
                }
            }
        })
        .await
        .expect("agent serves its admin listener in time");
        let drain = tokio::spawn(drain_lines(lines));
        Self {
            child,
            admin_addr,
            _stderr: drain,
        }
    }

    /// SIGKILL, and wait for the process to be gone.
    pub async fn kill(mut self) {
        self.child.kill().await.expect("kill the agent");
    }
}
