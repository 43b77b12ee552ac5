//! `tether-bench agents`: N agent sessions, run in this process by the agent library, against
//! one real `tether server` (or `--replicas R` of them, every agent connected to every
//! replica): RSS per agent, and how long all of them take to connect and to reconnect after a
//! server (replica) restarts.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::Common;
use crate::agent_pool::{issue_agents, stop_agents};
use crate::daemons::{Pki, ServerProcess, tether_binary};
use crate::process_stats;
use crate::report;

/// Options of `tether-bench agents`.
#[derive(Debug, Args)]
pub(crate) struct AgentsArgs {
    #[command(flatten)]
    common: Common,
    /// Agent sessions (each with its own certificate and id).
    #[arg(long, default_value_t = 10_000)]
    count: usize,
    /// How long connecting (and reconnecting) all of them may take before the run fails.
    #[arg(long, default_value = "180")]
    wait_secs: u64,
    /// Server replicas on 127.0.0.1, 127.0.0.2, ... (one port); each agent lists them all in
    /// `servers:` and keeps a session to each. 1: the single-server benchmark.
    #[arg(long, default_value_t = 1)]
    replicas: u8,
}

/// Runs the benchmark and writes its section.
pub(crate) async fn run(mut args: AgentsArgs) -> Result<()> {
    if args.common.smoke {
        args.count = args.count.min(50);
        args.wait_secs = args.wait_secs.min(60);
    }
    let wait = Duration::from_secs(args.wait_secs);
    if args.replicas > 1 {
        return crate::replica_mesh::run(&args.common, args.count, args.replicas, wait).await;
    }
    let binary = tether_binary(&args.common)?;
    let pki = Pki::new(&[])?;
    eprintln!("issuing {} agent certificates", args.count);
    let ids = issue_agents(pki.dir(), args.count)?;
    let extra = format!("max_agents: {}\n", args.count + 16);
    let first = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    let server = ServerProcess::start(&binary, &pki, first, "unused", &[], &extra).await?;
    let tunnel = server.tunnel;
    let rss_base = process_stats::rss_kib(server.pid()?)?;

    let stop = CancellationToken::new();
    let mut agents = JoinSet::new();
    let started = Instant::now();
    for id in &ids {
        let agent = build_agent(pki.dir(), id, tunnel)?;
        let stop = stop.clone();
        agents.spawn(async move {
            agent
                .run(tether_agent::AgentListeners::default(), stop)
                .await
        });
    }
    eprintln!("{} agents started; waiting for their sessions", ids.len());
    let n = ids.len() as u64;
    let measured = async {
        server.wait_for_agents(n, wait).await?;
        let connect_all = started.elapsed();
        let rss_connected = process_stats::rss_kib(server.pid()?)?;
        eprintln!("all connected in {connect_all:.1?}; restarting the server");
        let stopping = Instant::now();
        server.stop().await?;
        let restarted = ServerProcess::start(&binary, &pki, tunnel, "unused", &[], &extra).await?;
        let up = Instant::now();
        restarted.wait_for_agents(n, wait).await?;
        let reconnect = up.elapsed();
        let since_stop = stopping.elapsed();
        let rss_after = process_stats::rss_kib(restarted.pid()?)?;
        restarted.stop().await?;
        Ok::<_, anyhow::Error>(Measured {
            connect_all,
            rss_base,
            rss_connected,
            reconnect,
            since_stop,
            rss_after,
        })
    }
    .await;
    stop_agents(&stop, &mut agents).await;
    let measured = measured?;
    if args.common.smoke {
        println!(
            "agents smoke: ok: {n} agents connected in {:.1?} and reconnected {:.1?} after a \
             server restart (a smoke run checks the tool, not the figures; `tether-bench agents` \
             measures)",
            measured.connect_all, measured.reconnect
        );
        return Ok(());
    }
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let section = measured.markdown(n, &command);
    println!("{section}");
    report::write_section(args.common.out_path()?, report::AGENTS_MARKER, &section)
}

struct Measured {
    connect_all: Duration,
    rss_base: u64,
    rss_connected: u64,
    reconnect: Duration,
    since_stop: Duration,
    rss_after: u64,
}

impl Measured {
    fn markdown(&self, n: u64, command: &str) -> String {
        let per_agent = |rss: u64| (rss.saturating_sub(self.rss_base) * 1024) / n.max(1);
        format!(
            "## Agents held by one server (`tether-bench agents`)\n\n\
             - Machine: {}\n\
             - Command: `{command}`\n\
             - The agents run in the bench process (the agent library, one certificate and id \
             each, default reconnect backoff 0.5 s to 60 s with full jitter); the server is the \
             real binary. RSS is the server's VmRSS.\n\n\
             | figure | value | target |\n|---|---|---|\n\
             | agents | {n} | 10,000 |\n\
             | server RSS before / with all agents | {} / {} MiB | ≤ 1,024 MiB |\n\
             | server RSS per agent | {} B | |\n\
             | time for all to connect from cold | {:.1} s | |\n\
             | reconnect storm after a server restart (from the new server's start) | {:.1} s | ≤ 60 s |\n\
             | the same, from the SIGTERM of the old server | {:.1} s | |\n\
             | new server's RSS once all are back | {} MiB | |\n",
            process_stats::machine(),
            self.rss_base / 1024,
            self.rss_connected / 1024,
            report::format_thousands(per_agent(self.rss_connected) as f64),
            self.connect_all.as_secs_f64(),
            self.reconnect.as_secs_f64(),
            self.since_stop.as_secs_f64(),
            self.rss_after / 1024,
        )
    }
}

/// An agent with the library defaults, dialing `tunnel`, allowed to reach nothing.
fn build_agent(dir: &Path, id: &str, tunnel: SocketAddr) -> Result<tether_agent::Agent> {
    let yaml = format!(
        "version: 1\n\
         server_url: \"wss://{tunnel}/v1/connect\"\n\
         tls: {{ cert: agent-{id}.pem, key: agent-{id}-key.pem, server_ca: ca.pem }}\n\
         admin_listen: \"\"\n"
    );
    let mut config: tether_agent::AgentConfig =
        serde_yaml_ng::from_str(&yaml).context("agent config")?;
    config.resolve_paths(dir);
    // Each agent has its own registry: they are separate daemons that share a process here.
    tether_agent::Agent::new(config, &prometheus::Registry::new())
        .with_context(|| format!("agent {id}"))
}
