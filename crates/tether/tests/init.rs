//! `tether init` from a clean directory: the configs it writes pass check-config, and a server
//! and an agent started from them carry traffic through the forward byte-exact (the fixed
//! ports of the generated files are moved to ephemeral ones with `--set`, read back from the
//! daemons' JSON logs). Also: colour never reaches a pipe, and JSON logs are plain JSON.

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
        self.wait_for(message, |line| {
            let value: serde_json::Value = serde_json::from_str(line).ok()?;
            (value["fields"]["message"] == message)
                .then(|| value["fields"][field].as_str().map(str::to_owned))
                .flatten()
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
