//! `tether init` from a clean directory: the configs it writes pass check-config, and a server
//! and an agent started from them carry traffic through the forward byte-exact (the fixed
//! ports of the generated files are moved to ephemeral ones with `--set`, read back from the
//! daemons' JSON logs). Also: colour never reaches a pipe, and JSON logs are plain JSON; and the
//! admin index pages (`/`) of both daemons render their live data in a real headless browser
//! (Debian's `chromium`, installed by .ci/run and scripts/install-test-deps).

#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used, clippy::disallowed_types)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_tether");
const WITHIN: Duration = Duration::from_secs(30);

fn tether(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

/// A daemon whose stderr lines are collected (raw text).
struct Daemon {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Daemon {
    fn start(args: &[&str], env: &[(&str, &str)]) -> Daemon {
        let mut command = Command::new(BIN);
        command
            .args(args)
            .env_remove("NO_COLOR")
            .env_remove("TETHER_LOG")
            .env_remove("TETHER_LOG_FORMAT")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::sync_channel(4096);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Daemon { child, lines }
    }

    /// Lines until `pick` returns a value; fails with what was seen.
    fn wait_for<T>(&self, what: &str, mut pick: impl FnMut(&str) -> Option<T>) -> T {
        let deadline = Instant::now() + WITHIN;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(value) = pick(&line) {
                        return value;
                    }
                    seen.push(line);
                }
                Err(_) => panic!("no {what}; log:\n{}", seen.join("\n")),
            }
        }
    }

    /// The `field` of the first JSON log line whose message is `message`.
    fn json_field(&self, message: &str, field: &str) -> String {
        self.json_fields(message, &[field]).remove(0)
    }

    /// The `fields` of the first JSON log line whose message is `message`.
    fn json_fields(&self, message: &str, fields: &[&str]) -> Vec<String> {
        self.wait_for(message, |line| {
            let value: serde_json::Value = serde_json::from_str(line).ok()?;
            if value["fields"]["message"] != message {
                return None;
            }
            fields
                .iter()
                .map(|f| value["fields"][*f].as_str().map(str::to_owned))
                .collect()
        })
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A target that sends back everything it reads, for one connection at a time.
fn echo_target() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            std::thread::spawn(move || {
                let mut reader = stream.try_clone().unwrap();
                let _ = std::io::copy(&mut reader, &mut stream);
                let _ = stream.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    addr
}

fn init(dir: &Path, target: &str) {
    let out = tether(&[
        "init",
        "--dir",
        dir.to_str().unwrap(),
        "--server-name",
        "localhost",
        "--agent",
        "edge-1",
        "--target",
        target,
    ]);
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("server.yaml") && stdout.contains("agent.yaml"),
        "{stdout}"
    );
}

#[test]
fn init_writes_matching_configs_that_carry_traffic_byte_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pki");
    let target = echo_target();
    init(&dir, &target.to_string());
    for name in ["server.yaml", "agent.yaml"] {
        let path = dir.join(name);
        let out = tether(&["check-config", path.to_str().unwrap()]);
        assert!(out.status.success(), "{name}: {out:?}");
    }
    // Nothing more than asked: no proxy frontends, nothing on all interfaces.
    let server_text = std::fs::read_to_string(dir.join("server.yaml")).unwrap();
    let keys: String = server_text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(!keys.contains("0.0.0.0:"), "{server_text}");
    assert!(!keys.contains("frontends"), "{server_text}");
    // A second init into the same directory refuses to overwrite.
    let again = tether(&["init", "--dir", dir.to_str().unwrap(), "--agent", "edge-1"]);
    assert!(!again.status.success(), "{again:?}");

    let server_config = dir.join("server.yaml");
    // The forward's fixed port may be taken on a busy machine: the test moves it by editing
    // the generated file, the one change an operator might make.
    let edited = server_text.replace("127.0.0.1:18080", "127.0.0.1:0");
    std::fs::write(&server_config, edited).unwrap();
    let server = Daemon::start(
        &[
            "server",
            "--config",
            server_config.to_str().unwrap(),
            "--log-format",
            "json",
            "--set",
            "listen=127.0.0.1:0",
            "--set",
            "admin_listen=127.0.0.1:0",
        ],
        &[],
    );
    let forward = server.json_field("forward listening", "listen");
    let tunnel = server.json_field("server running", "listen");
    let tunnel_port = tunnel.rsplit(':').next().unwrap().to_owned();
    let agent_config = dir.join("agent.yaml");
    let url = format!("server_url=wss://localhost:{tunnel_port}/v1/connect");
    let agent = Daemon::start(
        &[
            "agent",
            "--config",
            agent_config.to_str().unwrap(),
            "--log-format",
            "json",
            "--set",
            &url,
            "--set",
            "admin_listen=127.0.0.1:0",
        ],
        &[],
    );
    agent.json_field("connected to the server", "server.id");
    // The server logs this once the session is registered: the forward finds it from then on.
    server.json_field("agent connected", "protocol");

    let payload: Vec<u8> = (0..256 * 1024u32).map(|i| (i * 7 % 251) as u8).collect();
    let mut stream = TcpStream::connect(&forward).unwrap();
    stream.set_read_timeout(Some(WITHIN)).unwrap();
    let writer = {
        let mut stream = stream.try_clone().unwrap();
        let payload = payload.clone();
        std::thread::spawn(move || {
            stream.write_all(&payload).unwrap();
            stream.shutdown(std::net::Shutdown::Write).unwrap();
        })
    };
    let mut back = Vec::new();
    stream.read_to_end(&mut back).unwrap();
    writer.join().unwrap();
    assert!(
        back == payload,
        "{} bytes back of {}",
        back.len(),
        payload.len()
    );
}

#[test]
fn text_logs_to_a_pipe_have_no_colour_codes_and_json_logs_are_json() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pki");
    init(&dir, "127.0.0.1:9");
    let config = dir.join("server.yaml");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("127.0.0.1:18080", "127.0.0.1:0");
    std::fs::write(&config, text).unwrap();
    let args = |format: &'static str| {
        vec![
            "server".to_owned(),
            "--config".to_owned(),
            config.to_str().unwrap().to_owned(),
            "--log-format".to_owned(),
            format.to_owned(),
            "--set".to_owned(),
            "listen=127.0.0.1:0".to_owned(),
            "--set".to_owned(),
            "admin_listen=127.0.0.1:0".to_owned(),
        ]
    };
    let text_args = args("text");
    let text_args: Vec<&str> = text_args.iter().map(String::as_str).collect();
    let server = Daemon::start(&text_args, &[]);
    let line = server.wait_for("the running line", |l| {
        l.contains("server running").then(|| l.to_owned())
    });
    assert!(!line.contains('\u{1b}'), "colour codes in a pipe: {line:?}");
    drop(server);

    let json_args = args("json");
    let json_args: Vec<&str> = json_args.iter().map(String::as_str).collect();
    let server = Daemon::start(&json_args, &[]);
    let line = server.wait_for("the running line", |l| {
        l.contains("server running").then(|| l.to_owned())
    });
    let value: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(value["fields"]["message"], "server running");
    assert!(!line.contains('\u{1b}'), "{line:?}");
}

/// The DOM of `url` after its script ran, from headless chromium.
fn rendered_dom(url: &str, profile: &Path) -> String {
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--virtual-time-budget=3000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(["--dump-dom", url])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|err| {
            panic!(
                "cannot run chromium ({err}); install the Debian package `chromium` \
                 (apt-get install --no-install-recommends chromium), as .ci/run does"
            )
        });
    assert!(out.status.success(), "chromium failed: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Fetches `url` until the rendered DOM holds every one of `needles` (the page refreshes from
/// live data; a session may still be coming up).
fn wait_for_dom(url: &str, profile: &Path, needles: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let dom = rendered_dom(url, profile);
        if needles.iter().all(|n| dom.contains(n)) {
            return dom;
        }
        assert!(
            Instant::now() < deadline,
            "{url} never rendered {needles:?}; last DOM:\n{dom}"
        );
    }
}

#[test]
fn admin_index_pages_render_live_data_in_a_headless_browser() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pki");
    let target = echo_target();
    init(&dir, &target.to_string());
    let server_config = dir.join("server.yaml");
    let text = std::fs::read_to_string(&server_config)
        .unwrap()
        .replace("127.0.0.1:18080", "127.0.0.1:0");
    std::fs::write(&server_config, text).unwrap();
    let agent_config = dir.join("agent.yaml");
    let text = std::fs::read_to_string(&agent_config)
        .unwrap()
        .replace("labels: {}", "labels: { site: eu-west, role: db }");
    std::fs::write(&agent_config, text).unwrap();

    let server = Daemon::start(
        &[
            "server",
            "--config",
            server_config.to_str().unwrap(),
            "--log-format",
            "json",
            "--set",
            "listen=127.0.0.1:0",
            "--set",
            "admin_listen=127.0.0.1:0",
        ],
        &[],
    );
    let running = server.json_fields("server running", &["admin", "listen"]);
    let (admin, tunnel) = (&running[0], &running[1]);
    let url = format!(
        "server_url=wss://localhost:{}/v1/connect",
        tunnel.rsplit(':').next().unwrap()
    );
    let agent = Daemon::start(
        &[
            "agent",
            "--config",
            agent_config.to_str().unwrap(),
            "--log-format",
            "json",
            "--set",
            &url,
            "--set",
            "admin_listen=127.0.0.1:0",
        ],
        &[],
    );
    let agent_admin = agent.json_field("admin listener serving", "addr");
    let agent_admin = agent_admin
        .trim_start_matches("Some(")
        .trim_end_matches(')')
        .to_owned();
    server.json_field("agent connected", "protocol");

    let profile = tmp.path().join("chromium");
    let dom = wait_for_dom(
        &format!("http://{admin}/"),
        &profile,
        &[
            "1 client, 1 session",
            "edge-1",
            "role=db, site=eu-west",
            "healthy",
        ],
    );
    assert!(
        dom.contains("edge-1-target"),
        "the forward is listed:\n{dom}"
    );
    for link in ["metrics", "v1/clients", "readyz", "healthz"] {
        assert!(
            dom.contains(&format!("href=\"{link}\"")),
            "links {link}:\n{dom}"
        );
    }
    let dom = wait_for_dom(
        &format!("http://{agent_admin}/"),
        &profile,
        &[
            "<th>connection</th><td>connected</td>",
            "<th>gate</th><td>enabled</td>",
            "tether_agent_dials_total{outcome=\"ok\"}",
        ],
    );
    assert!(dom.contains("href=\"v1/status\""), "{dom}");
}
