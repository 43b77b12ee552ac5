//! `tether demo`: a throwaway CA, a server, an agent and an echo target on loopback, a forward
//! through the tunnel, traffic checked byte for byte, and the URLs to look at.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use tether_common::pki::{self, Ca, IssueOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config_load;
use crate::daemon_registry::daemon_registry;

const AGENT_ID: &str = "demo-agent";

/// The loopback addresses of one demo run, bound up front.
struct DemoListeners {
    tunnel: TcpListener,
    server_admin: TcpListener,
    forward: TcpListener,
    agent_admin: TcpListener,
}

/// Their addresses (and the echo target's), for the configs and the printed URLs.
#[derive(Clone, Copy)]
struct DemoAddrs {
    target: SocketAddr,
    tunnel: SocketAddr,
    server_admin: SocketAddr,
    forward: SocketAddr,
    agent_admin: SocketAddr,
}

impl DemoListeners {
    async fn bind() -> anyhow::Result<DemoListeners> {
        Ok(DemoListeners {
            tunnel: TcpListener::bind("127.0.0.1:0").await?,
            server_admin: TcpListener::bind("127.0.0.1:0").await?,
            forward: TcpListener::bind("127.0.0.1:0").await?,
            agent_admin: TcpListener::bind("127.0.0.1:0").await?,
        })
    }

    fn addrs(&self, target: SocketAddr) -> anyhow::Result<DemoAddrs> {
        Ok(DemoAddrs {
            target,
            tunnel: self.tunnel.local_addr()?,
            server_admin: self.server_admin.local_addr()?,
            forward: self.forward.local_addr()?,
            agent_admin: self.agent_admin.local_addr()?,
        })
    }
}

/// The server and agent configs of the demo (YAML, as `--keep` writes them).
fn demo_yaml(addrs: &DemoAddrs) -> (String, String) {
    let DemoAddrs {
        target,
        tunnel,
        server_admin,
        forward,
        agent_admin,
    } = addrs;
    let server_yaml = format!(
        "version: 1\n\
         listen: \"{tunnel}\"\n\
         admin_listen: \"{server_admin}\"\n\
         tls: {{ cert: server.pem, key: server-key.pem, client_ca: ca.pem }}\n\
         forwards:\n  - {{ name: demo, listen: \"{forward}\", client: {AGENT_ID}, target: \"{target}\" }}\n"
    );
    let agent_yaml = format!(
        "version: 1\n\
         server_url: \"wss://localhost:{port}/v1/connect\"\n\
         tls: {{ cert: agent-{AGENT_ID}.pem, key: agent-{AGENT_ID}-key.pem, server_ca: ca.pem }}\n\
         admin_listen: \"{agent_admin}\"\n\
         reconnect: {{ min_delay: 100ms, max_delay: 2s }}\n\
         policy:\n  allow:\n    - {{ cidrs: [\"127.0.0.1/32\"], ports: [\"{target_port}\"] }}\n",
        port = tunnel.port(),
        target_port = target.port(),
    );
    (server_yaml, agent_yaml)
}

/// The running server and agent, each on its own token.
struct Daemons {
    server_token: CancellationToken,
    agent_token: CancellationToken,
    server_task: tokio::task::JoinHandle<Result<(), tether_server::ServerError>>,
    agent_task: tokio::task::JoinHandle<Result<(), tether_agent::AgentError>>,
}

impl Daemons {
    /// Stops the agent, then the server; their errors, if any.
    async fn stop(self) -> anyhow::Result<()> {
        self.agent_token.cancel();
        let agent_result = self.agent_task.await;
        self.server_token.cancel();
        let server_result = self.server_task.await;
        agent_result.context("agent task")??;
        server_result.context("server task")??;
        Ok(())
    }
}

pub(crate) async fn run(
    once: bool,
    bytes: usize,
    keep: Option<&Path>,
    logs: &crate::logging::LogControl,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let dir = DemoDir::new(keep)?;
    write_pki(dir.path())?;

    let tracker = TaskTracker::new();
    let target = TcpListener::bind("127.0.0.1:0").await?;
    let target_addr = target.local_addr()?;
    tracker.spawn(echo_target(target, shutdown.clone()));
    let listeners = DemoListeners::bind().await?;
    let addrs = listeners.addrs(target_addr)?;
    let (server_yaml, agent_yaml) = demo_yaml(&addrs);
    let server_config =
        config_load::server_from_str(&server_yaml, dir.path(), "demo server config")?;
    let agent_config = config_load::agent_from_str(&agent_yaml, dir.path(), "demo agent config")?;
    if keep.is_some() {
        for (name, text) in [("server.yaml", &server_yaml), ("agent.yaml", &agent_yaml)] {
            let path = dir.path().join(name);
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        }
    }

    let server_registry = daemon_registry(logs)?;
    let agent_registry = daemon_registry(logs)?;
    let server = tether_server::Server::new(server_config, &server_registry)?;
    let sessions = server.registry();
    let agent = tether_agent::Agent::new(agent_config, &agent_registry)?;
    let mut agent_status = agent.status();
    let server_token = shutdown.child_token();
    let agent_token = shutdown.child_token();
    let daemons = Daemons {
        server_task: tracker.spawn(server.run(
            tether_server::Listeners {
                tunnel: listeners.tunnel,
                admin: listeners.server_admin,
                forwards: vec![listeners.forward],
                frontends: Default::default(),
            },
            server_token.clone(),
        )),
        agent_task: tracker.spawn(agent.run(
            tether_agent::AgentListeners {
                admin: Some(listeners.agent_admin),
            },
            agent_token.clone(),
        )),
        server_token,
        agent_token,
    };
    tracker.close();

    print_setup(dir.path(), keep.is_some(), &addrs);
    wait_ready(&mut agent_status, &sessions).await?;
    println!("agent connected; sending traffic through the tunnel...");

    let outcome = traffic(addrs.forward, bytes).await;
    print_outcome(&outcome, bytes, once, &addrs);
    if once || outcome.is_err() {
        shutdown.cancel();
    }
    shutdown.cancelled().await;
    let stopped = daemons.stop().await;
    tracker.wait().await;
    stopped?;
    outcome.map(|_| ())
}

/// Where everything is. Addresses, not URLs: with `--once` everything here is gone by the
/// time it is read.
fn print_setup(dir: &Path, kept: bool, addrs: &DemoAddrs) {
    if kept {
        println!(
            "tether demo: CA, certificates and the working server.yaml and agent.yaml kept in {}",
            dir.display()
        );
    } else {
        println!(
            "tether demo: throwaway CA and certificates in {}",
            dir.display()
        );
    }
    let DemoAddrs {
        target,
        tunnel,
        server_admin,
        forward,
        agent_admin,
    } = addrs;
    println!("  server   tunnel {tunnel}, admin {server_admin}");
    println!("  agent    \"{AGENT_ID}\", admin {agent_admin}");
    println!("  target   echo service on {target} (reachable only through the agent's policy)");
    println!("  forward  {forward} -> agent \"{AGENT_ID}\" -> {target}");
}

/// Until the agent is connected and the server has registered its session (bounded).
async fn wait_ready(
    agent_status: &mut tokio::sync::watch::Receiver<tether_agent::AgentStatus>,
    sessions: &tether_server::SessionRegistry,
) -> anyhow::Result<()> {
    tokio::time::timeout(
        Duration::from_secs(15),
        agent_status.wait_for(|status| status.connected),
    )
    .await
    .context("the agent did not connect within 15 s")?
    .context("the agent stopped")?;
    // The agent counts itself connected at the upgrade; the server registers the session a
    // moment later: traffic before that finds no session.
    tokio::time::timeout(Duration::from_secs(15), async {
        while sessions.sessions(AGENT_ID).is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .context("the server did not register the agent's session within 15 s")?;
    Ok(())
}

/// The traffic check's numbers, and what to do next.
fn print_outcome(
    outcome: &anyhow::Result<TrafficReport>,
    bytes: usize,
    once: bool,
    addrs: &DemoAddrs,
) {
    match outcome {
        Ok(report) => {
            println!(
                "  {} bytes echoed byte-exact in {:.1} ms ({:.0} MB/s each way)",
                bytes,
                report.bulk.as_secs_f64() * 1000.0,
                bytes as f64 / report.bulk.as_secs_f64() / 1e6
            );
            println!(
                "  {} new connections with a 64-byte echo each: median {} us, p99 {} us",
                report.connects.len(),
                percentile(&report.connects, 50).as_micros(),
                percentile(&report.connects, 99).as_micros()
            );
        }
        Err(err) => println!("  traffic check FAILED: {err:#}"),
    }
    if once {
        println!("--once: stopping; run `tether demo` without --once to keep the daemons running");
    } else if outcome.is_ok() {
        let (server_admin, agent_admin) = (addrs.server_admin, addrs.agent_admin);
        println!("running until Ctrl-C; look around:");
        println!("  curl -s http://{server_admin}/metrics        server metrics");
        println!("  curl -s http://{agent_admin}/metrics        agent metrics");
        println!("  tether status --admin http://{server_admin}   clients and their sessions");
    }
}

/// Where the demo writes: a temporary directory removed at the end, or `--keep DIR`, left
/// behind with the configs.
enum DemoDir {
    Temp(tempfile::TempDir),
    Kept(std::path::PathBuf),
}

impl DemoDir {
    fn new(keep: Option<&Path>) -> anyhow::Result<DemoDir> {
        match keep {
            Some(dir) => {
                if dir.join("ca-key.pem").exists() || dir.join("server.yaml").exists() {
                    bail!(
                        "--keep {}: the directory already holds a setup; pick an empty one",
                        dir.display()
                    );
                }
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
                Ok(DemoDir::Kept(dir.to_owned()))
            }
            None => Ok(DemoDir::Temp(
                tempfile::Builder::new()
                    .prefix("tether-demo-")
                    .tempdir()
                    .context("creating a temporary directory")?,
            )),
        }
    }

    fn path(&self) -> &Path {
        match self {
            DemoDir::Temp(dir) => dir.path(),
            DemoDir::Kept(dir) => dir,
        }
    }
}

fn write_pki(dir: &Path) -> anyhow::Result<()> {
    let ca = Ca::generate("tether demo CA")?;
    let server = ca.issue_server(
        &["localhost".to_string()],
        &["127.0.0.1".parse()?],
        &IssueOptions::default(),
    )?;
    let agent = ca.issue_agent(AGENT_ID, &IssueOptions::default())?;
    pki::write_file_public(&dir.join("ca.pem"), ca.cert_pem())?;
    pki::write_file_public(&dir.join("server.pem"), &server.cert_pem)?;
    pki::write_file_private(&dir.join("server-key.pem"), &server.key_pem)?;
    pki::write_file_public(&dir.join(format!("agent-{AGENT_ID}.pem")), &agent.cert_pem)?;
    pki::write_file_private(
        &dir.join(format!("agent-{AGENT_ID}-key.pem")),
        &agent.key_pem,
    )?;
    Ok(())
}

async fn echo_target(listener: TcpListener, shutdown: CancellationToken) {
    let connections = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let Ok((mut socket, _)) = accepted else {
            continue;
        };
        let stop = shutdown.clone();
        connections.spawn(async move {
            let (mut read, mut write) = socket.split();
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = async {
                    let _ = tokio::io::copy(&mut read, &mut write).await;
                    let _ = write.shutdown().await;
                } => {}
            }
        });
    }
    connections.close();
    connections.wait().await;
}

struct TrafficReport {
    bulk: Duration,
    connects: Vec<Duration>,
}

async fn traffic(forward: SocketAddr, bytes: usize) -> anyhow::Result<TrafficReport> {
    let mut payload = vec![0u8; bytes];
    fastrand::Rng::with_seed(7).fill(&mut payload);

    let started = Instant::now();
    let stream = TcpStream::connect(forward).await?;
    stream.set_nodelay(true)?;
    let (mut read, mut write) = stream.into_split();
    let sent = payload.clone();
    let writer = tokio::spawn(async move {
        write.write_all(&sent).await?;
        write.shutdown().await?;
        Ok::<_, std::io::Error>(())
    });
    let mut echoed = Vec::with_capacity(bytes);
    tokio::time::timeout(Duration::from_secs(60), read.read_to_end(&mut echoed))
        .await
        .context("echo did not finish within 60 s")??;
    writer.await??;
    let bulk = started.elapsed();
    if echoed != payload {
        bail!(
            "echo differs: sent {} bytes, got {} bytes back",
            payload.len(),
            echoed.len()
        );
    }

    let mut connects = Vec::new();
    for _ in 0..50 {
        let started = Instant::now();
        let mut stream = TcpStream::connect(forward).await?;
        stream.set_nodelay(true)?;
        stream.write_all(&[42u8; 64]).await?;
        let mut back = [0u8; 64];
        tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut back))
            .await
            .context("small echo timed out")??;
        if back != [42u8; 64] {
            bail!("small echo differs");
        }
        connects.push(started.elapsed());
    }
    Ok(TrafficReport { bulk, connects })
}

fn percentile(samples: &[Duration], pct: usize) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    let index = (sorted.len() * pct / 100).min(sorted.len().saturating_sub(1));
    sorted.get(index).copied().unwrap_or_default()
}
