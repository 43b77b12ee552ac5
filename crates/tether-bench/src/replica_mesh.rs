//! `tether-bench agents --replicas R`: R real servers on 127.0.0.1..R (one port) and N agents
//! in this process, each with every replica in `servers:`. Measures the time to the full mesh
//! (every replica holding N agents) from cold and after one replica restarts, and each
//! replica's RSS per agent.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::Common;
use crate::agent_pool::{issue_agents, stop_agents};
use crate::daemons::{Pki, ServerProcess, tether_binary};
use crate::process_stats;
use crate::report;

/// Full mesh back after one replica restarts: the targets by fleet size (docs/BENCHMARKS.md).
const TARGETS: [(u64, &str); 2] = [(100, "≤ 2 s"), (3000, "≤ 10 s")];

/// Runs the replica benchmark and writes its section.
pub(crate) async fn run(common: &Common, count: usize, replicas: u8, wait: Duration) -> Result<()> {
    let binary = tether_binary(common)?;
    let pki = Pki::new(&[])?;
    eprintln!("issuing {count} agent certificates");
    let ids = issue_agents(pki.dir(), count)?;
    let port = common_port(replicas)?;
    let extra = |i: u8| format!("server_id: replica-{i}\nmax_agents: {}\n", count + 16);
    let addr = |i: u8| SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, i)), port);
    let mut servers = Vec::new();
    for i in 1..=replicas {
        let name = format!("replica-{i}");
        servers.push(
            ServerProcess::start_named(&binary, &pki, &name, addr(i), "unused", &[], &extra(i))
                .await?,
        );
    }
    let mut rss_base = Vec::new();
    for server in &servers {
        rss_base.push(process_stats::rss_kib(server.pid()?)?);
    }
    let urls: Vec<String> = (1..=replicas)
        .map(|i| format!("\"wss://{}/v1/connect\"", addr(i)))
        .collect();

    let stop = CancellationToken::new();
    let mut agents = JoinSet::new();
    let started = Instant::now();
    for id in &ids {
        let agent = build_agent(pki.dir(), id, &urls)?;
        let stop = stop.clone();
        agents.spawn(async move {
            agent
                .run(tether_agent::AgentListeners::default(), stop)
                .await
        });
    }
    let n = ids.len() as u64;
    let measured = async {
        for server in &servers {
            server.wait_for_agents(n, wait).await?;
        }
        let mesh = started.elapsed();
        let mut per_agent = Vec::new();
        for (server, base) in servers.iter().zip(&rss_base) {
            let rss = process_stats::rss_kib(server.pid()?)?;
            per_agent.push(rss.saturating_sub(*base) * 1024 / n.max(1));
        }
        eprintln!("full mesh in {mesh:.1?}; restarting replica-1");
        let first = (addr(1), extra(1));
        let back = restart_first(&mut servers, (&binary, &pki), first, n, wait).await?;
        Ok::<_, anyhow::Error>(Measured {
            mesh,
            back,
            per_agent,
        })
    }
    .await;
    stop_agents(&stop, &mut agents).await;
    for server in servers {
        server.stop().await?;
    }
    let measured = measured?;
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let section = measured.markdown(n, replicas, &command);
    println!("{section}");
    report::write_section(common.out_path()?, report::REPLICAS_MARKER, &section)
}

/// Stops `servers[0]` (SIGTERM) and starts it again on `addr` with `extra`; how long after
/// its start every agent is back on it (the others must keep all of theirs).
async fn restart_first(
    servers: &mut Vec<ServerProcess>,
    (binary, pki): (&Path, &Pki),
    (addr, extra): (SocketAddr, String),
    n: u64,
    wait: Duration,
) -> Result<Duration> {
    let first = servers.remove(0);
    first.stop().await?;
    let restarted =
        ServerProcess::start_named(binary, pki, "replica-1", addr, "unused", &[], &extra).await?;
    let up = Instant::now();
    restarted.wait_for_agents(n, wait).await?;
    let back = up.elapsed();
    for server in servers.iter() {
        if server.agents_connected().await? != n {
            bail!("a replica that was not restarted lost agents");
        }
    }
    servers.insert(0, restarted);
    Ok(back)
}

/// A port free on 127.0.0.1 to 127.0.0.`replicas` (checked by binding each).
fn common_port(replicas: u8) -> Result<u16> {
    for _ in 0..50 {
        let first = std::net::TcpListener::bind("127.0.0.1:0")?;
        let port = first.local_addr()?.port();
        let free = (2..=replicas)
            .all(|i| std::net::TcpListener::bind((Ipv4Addr::new(127, 0, 0, i), port)).is_ok());
        if free {
            return Ok(port);
        }
    }
    bail!("no port free on every replica address")
}

/// An agent with the library defaults and every replica in `servers:`.
fn build_agent(dir: &Path, id: &str, urls: &[String]) -> Result<tether_agent::Agent> {
    let yaml = format!(
        "version: 1\n\
         servers: [{}]\n\
         server_name: localhost\n\
         tls: {{ cert: agent-{id}.pem, key: agent-{id}-key.pem, server_ca: ca.pem }}\n\
         admin_listen: \"\"\n",
        urls.join(", ")
    );
    let mut config: tether_agent::AgentConfig =
        serde_yaml_ng::from_str(&yaml).context("agent config")?;
    config.resolve_paths(dir);
    tether_agent::Agent::new(config, &prometheus::Registry::new())
        .with_context(|| format!("agent {id}"))
}

struct Measured {
    mesh: Duration,
    back: Duration,
    /// Each replica's RSS growth per agent, in bytes.
    per_agent: Vec<u64>,
}

impl Measured {
    fn markdown(&self, n: u64, replicas: u8, command: &str) -> String {
        let target = TARGETS
            .iter()
            .find(|(size, _)| n <= *size)
            .map_or("", |(_, target)| target);
        let per_agent: Vec<String> = self
            .per_agent
            .iter()
            .map(|b| report::format_thousands(*b as f64))
            .collect();
        format!(
            "## Agents on every replica (`tether-bench agents --replicas`)\n\n\
             - Machine: {}\n\
             - Command: `{command}`\n\
             - {replicas} server replicas (real binaries on 127.0.0.1..{replicas}, one port); \
             {n} agents in the bench process, each listing every replica in `servers:` \
             (default backoff 0.5 s to 60 s, full jitter). The restarted replica gets SIGTERM \
             (drain, GOAWAY restart) and starts again on the same address.\n\n\
             | figure | value | target |\n|---|---|---|\n\
             | agents x replicas | {n} x {replicas} | |\n\
             | full mesh from cold | {:.1} s | |\n\
             | full mesh back after one replica restarts (from its start) | {:.2} s | {target} |\n\
             | server RSS per agent, each replica | {} B | no higher than with one replica |\n",
            process_stats::machine(),
            self.mesh.as_secs_f64(),
            self.back.as_secs_f64(),
            per_agent.join(" / "),
        )
    }
}
