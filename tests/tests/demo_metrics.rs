//! `tether demo` exports the same metric families as `tether server` and `tether agent` started
//! from config files: heap, runtime, process, build info and certificate expiry included.

#![allow(clippy::unwrap_used)] // test helpers panic on failure by design

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use tether_e2e::process::{AgentProcess, ServerProcess, tether_binary};
use tether_e2e::tether_testkit::{TestPki, echo::echo_server};
use tether_e2e::{allow_only, wait_forward_echo};
use tether_testkit::http_get;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

/// How long the families may take to converge: the health checker's first probe falls at a
/// random point of its first interval (10 s by default), on both sides alike.
const CONVERGE: Duration = Duration::from_secs(45);

/// Metric family names of a Prometheus text exposition (its `# TYPE` lines).
fn families(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

async fn scrape(admin: SocketAddr) -> BTreeSet<String> {
    let (status, body) = http_get(admin, "/metrics").await;
    assert_eq!(status, 200, "GET /metrics on {admin}");
    families(&body)
}

/// The address in a demo line `  curl -s http://ADDR/metrics ...`, in order: server, agent.
fn metrics_addr(line: &str) -> Option<SocketAddr> {
    let rest = line.trim_start().strip_prefix("curl -s http://")?;
    rest.split_once("/metrics")?.0.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_metrics_are_the_daemons_metrics() {
    // The demo, interactive: it prints the metrics URLs once its traffic check passed.
    let mut demo = Command::new(tether_binary())
        .args(["demo", "--bytes", "65536"])
        .env_remove("TETHER_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(demo.stdout.take().unwrap()).lines();
    let mut printed = Vec::new();
    let mut demo_admins = Vec::new();
    let mut status_hint = false;
    tokio::time::timeout(Duration::from_secs(120), async {
        while demo_admins.len() < 2 || !status_hint {
            let line = lines.next_line().await.unwrap().unwrap_or_else(|| {
                panic!("demo exited early; it printed:\n{}", printed.join("\n"))
            });
            demo_admins.extend(metrics_addr(&line));
            status_hint |= line.contains("tether status --admin http://");
            printed.push(line);
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "demo metrics URLs in time; printed:\n{}",
            printed.join("\n")
        )
    });
    let (demo_server, demo_agent) = (demo_admins[0], demo_admins[1]);

    // The same shape from config files: a forward to an echo target through one agent.
    let pki = TestPki::new();
    let agent_cert = pki.agent("edge-1");
    let (target, _echo) = echo_server().await;
    let server_yaml = pki.write_file(
        "server.yaml",
        &format!(
            "version: 1\n\
             listen: \"127.0.0.1:0\"\n\
             admin_listen: \"127.0.0.1:0\"\n\
             tls: {{ cert: \"{}\", key: \"{}\", client_ca: \"{}\" }}\n\
             forwards:\n  - {{ name: echo, listen: \"127.0.0.1:0\", client: edge-1, target: \"{target}\" }}\n",
            pki.server_cert_path().display(),
            pki.server_key_path().display(),
            pki.ca_path().display(),
        ),
    );
    let server = ServerProcess::start(&server_yaml, 1).await;
    let agent_yaml = pki.write_file(
        "agent.yaml",
        &format!(
            "version: 1\n\
             server_url: \"wss://localhost:{}/v1/connect\"\n\
             tls: {{ cert: \"{}\", key: \"{}\", server_ca: \"{}\" }}\n\
             admin_listen: \"127.0.0.1:0\"\n\
             reconnect: {{ min_delay: 50ms, max_delay: 500ms }}\n\
             policy:\n{}",
            server.tunnel_addr.port(),
            agent_cert.cert_path.display(),
            agent_cert.key_path.display(),
            pki.ca_path().display(),
            allow_only(target),
        ),
    );
    let agent = AgentProcess::start(&agent_yaml).await;
    wait_forward_echo(server.forward_addrs[0]).await;

    // Families appear as their events happen (a dial, a health probe); wait until both pairs
    // agree, and name the difference if they never do.
    let deadline = tokio::time::Instant::now() + CONVERGE;
    loop {
        let pairs = [
            (
                "server",
                scrape(demo_server).await,
                scrape(server.admin_addr).await,
            ),
            (
                "agent",
                scrape(demo_agent).await,
                scrape(agent.admin_addr).await,
            ),
        ];
        if pairs.iter().all(|(_, demo, real)| demo == real) {
            for (daemon, demo, _) in &pairs {
                for family in [
                    "tether_build_info",
                    "tether_heap_allocated_bytes",
                    "tether_heap_resident_bytes",
                    "tether_runtime_alive_tasks",
                    "process_resident_memory_bytes",
                    "tether_tls_cert_expiry_timestamp_seconds",
                ] {
                    assert!(demo.contains(family), "demo {daemon} exports {family}");
                }
            }
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            let report: Vec<String> = pairs
                .iter()
                .map(|(daemon, demo, real)| {
                    format!(
                        "{daemon}: only in the demo {:?}; only in the daemon {:?}",
                        demo.difference(real).collect::<Vec<_>>(),
                        real.difference(demo).collect::<Vec<_>>()
                    )
                })
                .collect();
            panic!("metric families differ:\n{}", report.join("\n"));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    agent.kill().await;
    server.kill().await;
    demo.kill().await.unwrap();
}
