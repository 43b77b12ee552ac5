//! The real binaries and SIGHUP: an identical agent.yaml, and one that differs only in a value
//! that falls back to the same effective value, change nothing (same server-side session, no
//! reconnect, "config unchanged"); an invalid file is rejected and the old config keeps
//! running; restarting the server makes the agent reconnect and nothing else (no reload, no
//! gate change, same agent process). The server binary reloads on SIGHUP and on file change.

#![allow(clippy::unwrap_used)] // test helpers panic on failure by design

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tether_e2e::WAIT;
use tether_e2e::process::{ServerProcess, tether_binary};
use tether_e2e::tether_testkit::{AgentCert, TestPki};
use tether_testkit::metrics::scrape;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

fn server_yaml(pki: &TestPki, listen: &str) -> String {
    format!(
        "version: 1\n\
         listen: \"{listen}\"\n\
         admin_listen: \"127.0.0.1:0\"\n\
         tls: {{ cert: \"{}\", key: \"{}\", client_ca: \"{}\" }}\n",
        pki.server_cert_path().display(),
        pki.server_key_path().display(),
        pki.ca_path().display(),
    )
}

fn agent_yaml(pki: &TestPki, cert: &AgentCert, tunnel: SocketAddr, server_name: &str) -> String {
    format!(
        "version: 1\n\
         server_url: \"wss://{tunnel}/v1/connect\"\n\
         server_name: \"{server_name}\"\n\
         tls: {{ cert: \"{}\", key: \"{}\", server_ca: \"{}\" }}\n\
         admin_listen: \"\"\n\
         reconnect: {{ min_delay: 50ms, max_delay: 200ms }}\n",
        cert.cert_path.display(),
        cert.key_path.display(),
        pki.ca_path().display(),
    )
}

/// A `tether agent` child process whose JSON log messages are collected.
struct AgentProcess {
    child: Child,
    messages: Arc<Mutex<Vec<String>>>,
    _reader: tokio::task::JoinHandle<()>,
}

impl AgentProcess {
    fn start(config: &Path) -> AgentProcess {
        Self::start_with(config, &["--log", "info"])
    }

    /// `extra` goes before the subcommand (e.g. `--log info`).
    fn start_with(config: &Path, extra: &[&str]) -> AgentProcess {
        let mut child = Command::new(tether_binary())
            .args(["--log-format", "json"])
            .args(extra)
            .args(["agent", "--config"])
            .arg(config)
            .env_remove("TETHER_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let messages = Arc::new(Mutex::new(Vec::new()));
        let sink = messages.clone();
        let reader = tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let message = serde_json::from_str::<serde_json::Value>(&line)
                    .ok()
                    .and_then(|v| v["fields"]["message"].as_str().map(str::to_owned))
                    .unwrap_or(line);
                sink.lock().unwrap().push(message);
            }
        });
        AgentProcess {
            child,
            messages,
            _reader: reader,
        }
    }

    fn count(&self, message: &str) -> usize {
        self.messages
            .lock()
            .unwrap()
            .iter()
            .filter(|m| m.starts_with(message))
            .count()
    }

    async fn wait_count(&self, message: &str, n: usize) {
        tokio::time::timeout(WAIT, async {
            while self.count(message) < n {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .unwrap_or_else(|_| {
            panic!(
                "{n} x {message:?} in time; log: {:#?}",
                self.messages.lock().unwrap()
            )
        });
    }

    fn sighup(&self) {
        let pid = self.child.id().unwrap();
        // The shell's built-in `kill`: no procps needed on a minimal CI image.
        let status = std::process::Command::new("sh")
            .args(["-c", &format!("kill -HUP {pid}")])
            .status()
            .unwrap();
        assert!(status.success());
    }
}

/// The ids of edge-1's sessions on the server.
async fn server_sessions(admin: SocketAddr) -> Vec<String> {
    let response = tether_e2e::http::get(admin, "/v1/clients").await.unwrap();
    let body: serde_json::Value = serde_json::from_str(&response.body).unwrap();
    body["clients"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["client"] == "edge-1")
        .flat_map(|c| c["sessions"].as_array().cloned().unwrap_or_default())
        .map(|s| s["session_id"].to_string())
        .collect()
}

async fn wait_one_session(admin: SocketAddr) -> String {
    tokio::time::timeout(WAIT, async {
        loop {
            let sessions = server_sessions(admin).await;
            if let [one] = sessions.as_slice() {
                return one.clone();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("one session of edge-1 on the server")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_without_effective_change_and_server_restart_disturb_nothing() {
    let pki = TestPki::new();
    let server_config = pki.write_file("server.yaml", &server_yaml(&pki, "127.0.0.1:0"));
    let server = ServerProcess::start(&server_config, 0).await;
    let tunnel = server.tunnel_addr;
    let cert = pki.agent("edge-1");
    let agent_config = pki.write_file("agent.yaml", &agent_yaml(&pki, &cert, tunnel, ""));
    let mut agent = AgentProcess::start(&agent_config);
    agent.wait_count("connected to the server", 1).await;
    let session = wait_one_session(server.admin_addr).await;

    // Identical file: unchanged.
    agent.sighup();
    agent.wait_count("config unchanged", 1).await;
    // server_name spelled out as the URL's host, which is what "" falls back to: unchanged.
    std::fs::write(&agent_config, agent_yaml(&pki, &cert, tunnel, "127.0.0.1")).unwrap();
    agent.sighup();
    agent.wait_count("config unchanged", 2).await;
    // An invalid file: rejected, the old config keeps running.
    std::fs::write(&agent_config, "server_url: 42\nnot_a_key: 1\n").unwrap();
    agent.sighup();
    agent.wait_count("config reload rejected", 1).await;
    assert_eq!(agent.count("config reloaded"), 0);
    assert_eq!(agent.count("connected to the server"), 1);
    assert_eq!(wait_one_session(server.admin_addr).await, session);

    // A server restart on the same port: the agent reconnects, and does nothing else.
    std::fs::write(&agent_config, agent_yaml(&pki, &cert, tunnel, "")).unwrap();
    agent.wait_count("config unchanged", 3).await; // the file watcher saw the repair
    let reloads_before = agent.count("reloading config");
    let gate_before = agent.count("activation gate");
    server.kill().await;
    let restarted = pki.write_file("server-2.yaml", &server_yaml(&pki, &tunnel.to_string()));
    let server = ServerProcess::start(&restarted, 0).await;
    agent.wait_count("connected to the server", 2).await;
    // Session ids count per server process; the new process holds exactly one again.
    wait_one_session(server.admin_addr).await;
    assert_eq!(agent.count("reloading config"), reloads_before, "no reload");
    assert_eq!(
        agent.count("activation gate"),
        gate_before,
        "no gate change"
    );
    assert!(
        agent.child.try_wait().unwrap().is_none(),
        "same agent process"
    );
    server.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_config_log_filter_changes_in_place_on_sighup() {
    let pki = TestPki::new();
    let server_config = pki.write_file("server.yaml", &server_yaml(&pki, "127.0.0.1:0"));
    let server = ServerProcess::start(&server_config, 0).await;
    let cert = pki.agent("edge-1");
    let base = agent_yaml(&pki, &cert, server.tunnel_addr, "");
    let agent_config = pki.write_file("agent.yaml", &format!("{base}log: warn\n"));
    // No --log and no TETHER_LOG: the config's filter is in charge.
    let agent = AgentProcess::start_with(&agent_config, &[]);
    let session = wait_one_session(server.admin_addr).await;
    assert_eq!(
        agent.count("connected to the server"),
        0,
        "info is filtered out"
    );

    std::fs::write(&agent_config, format!("{base}log: info\n")).unwrap();
    agent.sighup();
    // The reload's own line was written under the old filter; the next one shows the new one.
    tokio::time::timeout(WAIT, async {
        while agent.count("config unchanged") == 0 {
            agent.sighup();
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .expect("info lines appear after the filter changed");
    assert_eq!(
        wait_one_session(server.admin_addr).await,
        session,
        "no reconnect"
    );
    server.kill().await;
}

async fn wait_metric(admin: SocketAddr, series: &str, value: f64) {
    tokio::time::timeout(WAIT, async {
        while scrape(admin, series).await < value {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{series} reaches {value} in time"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_binary_reloads_on_sighup_and_file_change() {
    let pki = TestPki::new();
    let text = server_yaml(&pki, "127.0.0.1:0");
    let config = pki.write_file("server.yaml", &text);
    let server = ServerProcess::start(&config, 0).await;
    let admin = server.admin_addr;
    let sighup = |pid: u32| {
        let status = std::process::Command::new("sh")
            .args(["-c", &format!("kill -HUP {pid}")])
            .status()
            .unwrap();
        assert!(status.success());
    };
    sighup(server.pid().unwrap());
    wait_metric(
        admin,
        "tether_config_reloads_total{result=\"unchanged\"}",
        1.0,
    )
    .await;

    // Saving the file is enough: a new allow-list applies in place...
    std::fs::write(&config, format!("{text}allowed_agents: [edge-1]\n")).unwrap();
    wait_metric(
        admin,
        "tether_config_reloads_total{result=\"applied\"}",
        1.0,
    )
    .await;
    // ... a new tunnel address needs a restart (said and counted), and bad YAML is rejected.
    let moved = server_yaml(&pki, "127.0.0.1:1");
    std::fs::write(&config, format!("{moved}allowed_agents: [edge-1]\n")).unwrap();
    wait_metric(admin, "tether_config_restart_required_total", 1.0).await;
    std::fs::write(&config, "listen: [\n").unwrap();
    wait_metric(
        admin,
        "tether_config_reloads_total{result=\"invalid\"}",
        1.0,
    )
    .await;
    let response = tether_e2e::http::get(admin, "/healthz").await.unwrap();
    assert_eq!(response.status, 200, "the server keeps running");
    server.kill().await;
}
