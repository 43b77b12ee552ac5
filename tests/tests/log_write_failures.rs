//! The real binaries with a broken stderr: `/dev/full` from the start, or a pipe whose reader
//! has exited. Both daemons start, carry traffic, count the dropped lines in
//! `tether_log_write_errors_total` and stop cleanly on SIGTERM.

#![allow(clippy::unwrap_used)] // test helpers panic on failure by design

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use tether_e2e::http::get;
use tether_e2e::process::tether_binary;
use tether_e2e::tether_testkit::{TestPki, echo_server};
use tether_e2e::{WAIT, wait_forward_echo};
use tether_testkit::metrics::sample;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

/// A loopback port that was free a moment ago (the daemons cannot report the ports they bind
/// when their stderr is broken).
fn free_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

struct Addrs {
    tunnel: SocketAddr,
    server_admin: SocketAddr,
    forward: SocketAddr,
    agent_admin: SocketAddr,
}

fn configs(pki: &TestPki, echo: SocketAddr) -> (Addrs, std::path::PathBuf, std::path::PathBuf) {
    let addrs = Addrs {
        tunnel: free_port(),
        server_admin: free_port(),
        forward: free_port(),
        agent_admin: free_port(),
    };
    let server = pki.write_file(
        "server.yaml",
        &format!(
            "version: 1\n\
             listen: \"{}\"\n\
             admin_listen: \"{}\"\n\
             tls: {{ cert: \"{}\", key: \"{}\", client_ca: \"{}\" }}\n\
             forwards:\n\
             \x20 - {{ name: echo, listen: \"{}\", client: edge-1, target: \"{echo}\" }}\n",
            addrs.tunnel,
            addrs.server_admin,
            pki.server_cert_path().display(),
            pki.server_key_path().display(),
            pki.ca_path().display(),
            addrs.forward,
        ),
    );
    let cert = pki.agent("edge-1");
    let agent = pki.write_file(
        "agent.yaml",
        &format!(
            "version: 1\n\
             server_url: \"wss://{}/v1/connect\"\n\
             server_name: \"localhost\"\n\
             tls: {{ cert: \"{}\", key: \"{}\", server_ca: \"{}\" }}\n\
             admin_listen: \"{}\"\n\
             reconnect: {{ min_delay: 50ms, max_delay: 200ms }}\n\
             policy:\n  allow:\n    - {{ cidrs: [\"127.0.0.1/32\"], ports: [\"{}\"] }}\n",
            addrs.tunnel,
            cert.cert_path.display(),
            cert.key_path.display(),
            pki.ca_path().display(),
            addrs.agent_admin,
            echo.port(),
        ),
    );
    (addrs, server, agent)
}

/// `tether --log debug <daemon> --config <config>` with `stderr` as its standard error.
fn spawn(daemon: &str, config: &std::path::Path, stderr: Stdio) -> Child {
    Command::new(tether_binary())
        .args(["--log", "debug", daemon, "--config"])
        .arg(config)
        .env_remove("TETHER_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// `tether_log_write_errors_total` of the daemon whose admin listener is `admin`, once it
/// answers.
async fn write_errors(admin: SocketAddr) -> f64 {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Ok(response) = get(admin, "/metrics").await
            && let Some(value) = sample(&response.body, "tether_log_write_errors_total")
        {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{admin} never served tether_log_write_errors_total"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn echo_once(forward: SocketAddr, byte: u8) {
    let mut stream = tokio::time::timeout(WAIT, TcpStream::connect(forward))
        .await
        .unwrap()
        .unwrap();
    stream.write_all(&[byte]).await.unwrap();
    let mut back = [0u8; 1];
    tokio::time::timeout(WAIT, stream.read_exact(&mut back))
        .await
        .expect("echo through the tunnel in time")
        .unwrap();
    assert_eq!(back[0], byte);
}

/// SIGTERM, then the process must exit with success in time.
async fn terminate(mut child: Child, name: &str) {
    if let Some(status) = child.try_wait().unwrap() {
        panic!("{name} exited before SIGTERM: {status}");
    }
    let pid = child.id().unwrap();
    let status = std::process::Command::new("sh")
        .args(["-c", &format!("kill -TERM {pid}")])
        .status()
        .unwrap();
    assert!(status.success());
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .unwrap_or_else(|_| panic!("{name} did not stop on SIGTERM"))
        .unwrap();
    assert!(
        status.success(),
        "{name} exit status after SIGTERM: {status}"
    );
}

/// Both daemons running with broken stderr: the tunnel carries traffic (including a second
/// session after an agent restart), both count dropped lines, both stop on SIGTERM.
async fn serve_with_broken_stderr(stderr: impl Fn() -> Stdio) {
    let pki = TestPki::new();
    let (echo, _echo) = echo_server().await;
    let (addrs, server_config, agent_config) = configs(&pki, echo);
    let server = spawn("server", &server_config, stderr());
    let agent = spawn("agent", &agent_config, stderr());
    wait_forward_echo(addrs.forward).await;
    for i in 0..20 {
        echo_once(addrs.forward, i).await;
    }
    // A new session after the breakage: the agent restarts.
    terminate(agent, "agent").await;
    let agent = spawn("agent", &agent_config, stderr());
    wait_forward_echo(addrs.forward).await;
    for i in 0..20 {
        echo_once(addrs.forward, i).await;
    }
    assert!(
        write_errors(addrs.server_admin).await > 0.0,
        "server counted"
    );
    assert!(write_errors(addrs.agent_admin).await > 0.0, "agent counted");
    let ready = get(addrs.server_admin, "/readyz").await.unwrap();
    assert_eq!(ready.status, 200);
    terminate(agent, "agent").await;
    terminate(server, "server").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemons_serve_and_stop_with_stderr_on_dev_full() {
    serve_with_broken_stderr(|| {
        Stdio::from(
            std::fs::OpenOptions::new()
                .write(true)
                .open("/dev/full")
                .unwrap(),
        )
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemons_serve_and_stop_after_their_log_reader_exits() {
    // Each daemon's stderr is a pipe into `head -n 1`, which reads one line and exits; every
    // later write meets a pipe without a reader (EPIPE).
    let readers = std::sync::Mutex::new(Vec::new());
    serve_with_broken_stderr(|| {
        let (read, write) = std::io::pipe().unwrap();
        let head = std::process::Command::new("head")
            .args(["-n", "1"])
            .stdin(read)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        readers.lock().unwrap().push(head);
        Stdio::from(write)
    })
    .await;
    for mut head in readers.into_inner().unwrap() {
        assert!(
            head.wait().unwrap().success(),
            "the reader exited by itself"
        );
    }
}
