//! The daemons under a test-owned NOTIFY_SOCKET: READY once serving, WATCHDOG pings at half of
//! WATCHDOG_USEC, STOPPING on SIGTERM, then a clean exit (what `Type=notify` units rely on).

#![cfg(target_os = "linux")]
// Test helpers panic on failure by design; the deadlines are real time (a child process).
#![allow(clippy::unwrap_used, clippy::disallowed_types)]

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_tether");
const WITHIN: Duration = Duration::from_secs(20);
/// WATCHDOG_USEC given to the daemon: pings are expected every 100 ms.
const WATCHDOG_USEC: &str = "200000";

fn run_ok(args: &[&str]) {
    let out = Command::new(BIN)
        .args(args)
        .env("TETHER_LOG", "warn")
        .output()
        .unwrap();
    assert!(out.status.success(), "tether {args:?}: {out:?}");
}

fn pki(dir: &Path) {
    let d = dir.to_str().unwrap();
    run_ok(&["certs", "init", "--dir", d, "--ip", "127.0.0.1"]);
    run_ok(&["certs", "issue", "--dir", d, "--agent", "edge-1"]);
}

/// A daemon child with its notify socket and its JSON log lines.
struct Daemon {
    child: Child,
    notify: UnixDatagram,
    logs: mpsc::Receiver<serde_json::Value>,
}

impl Daemon {
    fn start(dir: &Path, command: &str, config: &Path) -> Daemon {
        let socket_path = dir.join(format!("{command}-notify.sock"));
        let notify = UnixDatagram::bind(&socket_path).unwrap();
        let mut child = Command::new(BIN)
            .args(["--log-format", "json", "--log", "info", command, "--config"])
            .arg(config)
            .env("NOTIFY_SOCKET", &socket_path)
            .env("WATCHDOG_USEC", WATCHDOG_USEC)
            .env_remove("WATCHDOG_PID")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, logs) = mpsc::sync_channel(4096);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(value) = serde_json::from_str(&line) {
                    if tx.send(value).is_err() {
                        return;
                    }
                }
            }
        });
        Daemon {
            child,
            notify,
            logs,
        }
    }

    /// The next notification other than a watchdog ping; counts the pings on the way.
    fn next_state(&self, deadline: Instant) -> (String, usize) {
        let mut pings = 0;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no notification in time");
            self.notify.set_read_timeout(Some(left)).unwrap();
            let mut buf = [0u8; 1024];
            let n = match self.notify.recv(&mut buf) {
                Ok(n) => n,
                Err(err) => self.fail(&format!("no notification ({err}) after {pings} pings")),
            };
            let message = String::from_utf8(buf[..n].to_vec()).unwrap();
            if message == "WATCHDOG=1" {
                pings += 1;
            } else {
                return (message, pings);
            }
        }
    }

    /// Fails the test with the daemon's log lines so far and its exit status.
    fn fail(&self, what: &str) -> ! {
        let logs: Vec<String> = self.logs.try_iter().map(|l| l.to_string()).collect();
        panic!("{what}\n--- daemon log ---\n{}", logs.join("\n"));
    }

    /// Waits for `count` watchdog pings; fails on anything else.
    fn pings(&self, count: usize, deadline: Instant) {
        for _ in 0..count {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "watchdog pings stopped");
            self.notify.set_read_timeout(Some(left)).unwrap();
            let mut buf = [0u8; 1024];
            let n = self.notify.recv(&mut buf).expect("a watchdog ping");
            assert_eq!(&buf[..n], b"WATCHDOG=1");
        }
    }

    /// The fields of the log event `message`, waiting for it.
    fn log_event(&self, message: &str, deadline: Instant) -> serde_json::Value {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let event = self
                .logs
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no log event {message:?}"));
            if event["fields"]["message"] == message {
                return event["fields"].clone();
            }
        }
    }

    fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    fn wait_exit(&mut self, deadline: Instant) -> std::process::ExitStatus {
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "daemon did not exit in time");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn server_notifies_ready_watchdog_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path());
    let config = dir.path().join("server.yaml");
    std::fs::write(
        &config,
        "version: 1\nlisten: \"127.0.0.1:0\"\nadmin_listen: \"127.0.0.1:0\"\n",
    )
    .unwrap();
    let deadline = Instant::now() + WITHIN;
    let mut server = Daemon::start(dir.path(), "server", &config);

    let (state, _) = server.next_state(deadline);
    assert_eq!(state, "READY=1");
    // READY means serving: both listeners accept now.
    let running = server.log_event("server running", deadline);
    for field in ["listen", "admin"] {
        let addr: SocketAddr = running[field].as_str().unwrap().parse().unwrap();
        TcpStream::connect(addr).unwrap_or_else(|e| panic!("{field} {addr}: {e}"));
    }
    // WATCHDOG_USEC=200ms: a ping every 100 ms, so 5 pings well within the deadline.
    server.pings(5, deadline);

    server.sigterm();
    let (state, _) = server.next_state(deadline);
    assert_eq!(state, "STOPPING=1");
    assert!(server.wait_exit(deadline).success());
}

#[test]
fn agent_notifies_ready_watchdog_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path());
    // No server listens on port 1: READY does not wait for a session, only for the agent to
    // have started its connector (a down server is the agent's ordinary state).
    let config = dir.path().join("agent.yaml");
    std::fs::write(
        &config,
        "version: 1\n\
         server_url: \"wss://127.0.0.1:1/v1/connect\"\n\
         tls: {cert: agent-edge-1.pem, key: agent-edge-1-key.pem, server_ca: ca.pem}\n\
         admin_listen: \"127.0.0.1:0\"\n",
    )
    .unwrap();
    let deadline = Instant::now() + WITHIN;
    let mut agent = Daemon::start(dir.path(), "agent", &config);

    let (state, _) = agent.next_state(deadline);
    assert_eq!(state, "READY=1");
    agent.pings(5, deadline);

    agent.sigterm();
    let (state, _) = agent.next_state(deadline);
    assert_eq!(state, "STOPPING=1");
    assert!(agent.wait_exit(deadline).success());
}

#[test]
fn without_notify_socket_the_server_runs_as_before() {
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path());
    let config = dir.path().join("server.yaml");
    std::fs::write(
        &config,
        "version: 1\nlisten: \"127.0.0.1:0\"\nadmin_listen: \"127.0.0.1:0\"\n",
    )
    .unwrap();
    let mut child = Command::new(BIN)
        .args(["--log-format", "json", "server", "--config"])
        .arg(&config)
        .env_remove("NOTIFY_SOCKET")
        .env("WATCHDOG_USEC", WATCHDOG_USEC)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let mut running = false;
    for line in stderr.lines().map_while(Result::ok) {
        if line.contains("\"server running\"") {
            running = true;
            break;
        }
        assert!(!line.contains("notification failed"), "{line}");
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(running, "the server did not start without NOTIFY_SOCKET");
}
