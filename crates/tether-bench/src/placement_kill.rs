//! `tether-bench placement-kill`: the reconnect load of a replica's death with real sessions.
//! N real servers with peering on 127.0.0.1..N and a sample of agents in this process with
//! `placement.replicas_per_agent: k`; once every agent is placed, one replica gets SIGKILL.
//! Measures sessions per replica before and after, the agents that reconnected, the time
//! until every agent is placed again, the survivors' peak rate of new sessions, and dial
//! success through a random live replica before, during and after; compares them with the
//! placement computed by the agents' own ranking function.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use tether_common::pki::{IssueOptions, issue_server_peer_files};
use tether_common::placement;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::Common;
use crate::agent_pool::{issue_agents, stop_agents};
use crate::daemons::{Pki, ServerProcess, tether_binary};
use crate::kill_probe::{self, Echo, ProbeTargets};
use crate::placement_report::{Measured, Model, Phase, load_average};
use crate::report;

/// The section in docs/BENCHMARKS.md.
const MARKER: &str = "placement-kill";
/// Concurrent probe dials.
const PROBERS: usize = 4;
/// The phases of the probe dials.
const BEFORE: &str = "through a random replica, before the kill";
const DURING: &str = "through a random survivor, from the kill until placed again";
const AFTER: &str = "through a random survivor, once placed again";
const VICTIM: &str = "through the killed replica (started before the kill; cut when in flight)";

/// The fleet of `tether-bench placement` that the sample is compared with.
const MODEL_AGENTS: usize = 20_000;
/// How often the survivors' counters are read after the kill.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);

/// `tether-bench placement-kill`.
#[derive(Debug, Args)]
pub(crate) struct KillArgs {
    #[command(flatten)]
    common: Common,
    /// Server replicas (real processes on 127.0.0.1 to 127.0.0.N).
    #[arg(long, default_value_t = 20)]
    replicas: u8,
    /// Agents in the sample (in this process).
    #[arg(long, default_value_t = 1_000)]
    agents: usize,
    /// `placement.replicas_per_agent`.
    #[arg(long, default_value_t = 2)]
    k: usize,
    /// Bound on each wait (the peer mesh, every agent placed, placed again).
    #[arg(long, default_value = "180")]
    wait_secs: u64,
    /// Probe dials before the kill and after everything is placed again, seconds each.
    #[arg(long, default_value = "5")]
    probe_secs: u64,
}

/// The replicas: `servers[i]` on 127.0.0.(i+1); `None` once killed.
struct Fleet {
    servers: Vec<Option<ServerProcess>>,
    proxies: Vec<SocketAddr>,
}

fn ip(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, i as u8 + 1))
}

/// Three distinct ports free on every replica address: agents, peers, CONNECT frontend.
fn pick_ports(replicas: usize) -> Result<[u16; 3]> {
    let mut picked: Vec<u16> = Vec::new();
    for _ in 0..200 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let free = (1..replicas).all(|i| std::net::TcpListener::bind((ip(i), port)).is_ok());
        if free && !picked.contains(&port) {
            picked.push(port);
            if picked.len() == 3 {
                return Ok([picked[0], picked[1], picked[2]]);
            }
        }
    }
    bail!("no three ports free on every replica address")
}

impl Fleet {
    async fn start(binary: &Path, pki: &Pki, n: usize, agents: usize) -> Result<Fleet> {
        let [tunnel, peer, proxy] = pick_ports(n)?;
        let members: Vec<String> = (0..n).map(|i| format!("\"{}:{peer}\"", ip(i))).collect();
        let mut servers = Vec::new();
        for i in 0..n {
            let name = format!("replica-{}", i + 1);
            issue_server_peer_files(pki.dir(), &name, &IssueOptions::default())?;
            let extra = format!(
                "server_id: {name}\nmax_agents: {}\n\
                 peers:\n\
                 \x20 listen: \"{}:{peer}\"\n\
                 \x20 members: [{}]\n\
                 \x20 cert: server-peer-{name}.pem\n\
                 \x20 key: server-peer-{name}-key.pem\n\
                 \x20 server_ca: ca.pem\n\
                 \x20 server_name: localhost\n\
                 \x20 interval: 2s\n\
                 frontends:\n\
                 \x20 http_connect_listen: \"{}:{proxy}\"\n\
                 \x20 anonymous_clients: [\"*\"]\n",
                agents + 16,
                ip(i),
                members.join(", "),
                ip(i),
            );
            let listen = SocketAddr::new(ip(i), tunnel);
            let server =
                ServerProcess::start_named(binary, pki, &name, listen, "unused", &[], &extra)
                    .await?;
            servers.push(Some(server));
        }
        let proxies = (0..n).map(|i| SocketAddr::new(ip(i), proxy)).collect();
        Ok(Fleet { servers, proxies })
    }

    fn live(&self) -> impl Iterator<Item = (usize, &ServerProcess)> {
        self.servers
            .iter()
            .enumerate()
            .filter_map(|(i, s)| Some((i, s.as_ref()?)))
    }

    /// Waits until every replica has a peer session to every other one.
    async fn wait_mesh(&self, wait: Duration) -> Result<()> {
        let deadline = Instant::now() + wait;
        let want = (self.servers.len() - 1) as f64;
        for (i, server) in self.live() {
            loop {
                let text = crate::http_get::get(server.admin, "/metrics").await?;
                let out = crate::http_get::sample(&text, "tether_peer_sessions{direction=\"out\"}");
                if out == Some(want) {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("replica {} has {out:?} of {want} peer sessions", i + 1);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        Ok(())
    }

    fn admins(&self) -> Vec<SocketAddr> {
        self.live().map(|(_, s)| s.admin).collect()
    }

    /// SIGKILL of replica `i` (no drain, no GOAWAY).
    async fn kill(&mut self, i: usize) -> Result<()> {
        let server = self.servers[i].take().context("already killed")?;
        let status = tokio::process::Command::new("kill")
            .args(["-KILL", &server.pid()?.to_string()])
            .status()
            .await?;
        if !status.success() {
            bail!("kill -KILL replica {} failed", i + 1);
        }
        drop(server);
        Ok(())
    }

    async fn stop(self) {
        for server in self.servers.into_iter().flatten() {
            let _ = server.stop().await;
        }
    }
}

/// Sessions per replica (indices into `members`) with each agent on its top `k`, and the
/// agents placed on `members[dead]`.
fn predict(ids: &[String], members: &[String], k: usize, dead: Option<usize>) -> (Vec<u64>, u64) {
    let mut per = vec![0u64; members.len()];
    let mut on_dead = 0;
    for id in ids {
        for member in placement::top_k(id, members, k) {
            let i = members.iter().position(|m| m == member).unwrap_or(0);
            per[i] += 1;
            on_dead += u64::from(Some(i) == dead);
        }
    }
    (per, on_dead)
}

/// The placement of `MODEL_AGENTS` agents (ids as `issue_agents` names them) when
/// `members[dead]` dies: sessions re-established, and the most at one survivor.
fn model(members: &[String], k: usize, dead: usize) -> Model {
    let ids: Vec<String> = (0..MODEL_AGENTS).map(|i| format!("a{i:05}")).collect();
    let (before, movers) = predict(&ids, members, k, Some(dead));
    let survivors: Vec<String> = members
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != dead)
        .map(|(_, m)| m.clone())
        .collect();
    let (after, _) = predict(&ids, &survivors, k, None);
    let old: Vec<u64> = before
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != dead)
        .map(|(_, c)| *c)
        .collect();
    let busiest = after
        .iter()
        .zip(&old)
        .map(|(a, b)| a.saturating_sub(*b))
        .max()
        .unwrap_or(0);
    Model {
        agents: MODEL_AGENTS,
        movers,
        busiest,
    }
}

/// An agent with every replica in `servers:`, k-of-N placement, allowed to reach the echo.
fn build_agent(
    dir: &Path,
    id: &str,
    urls: &str,
    k: usize,
    echo: SocketAddr,
) -> Result<tether_agent::Agent> {
    let yaml = format!(
        "version: 1\n\
         servers: [{urls}]\n\
         server_name: localhost\n\
         tls: {{ cert: agent-{id}.pem, key: agent-{id}-key.pem, server_ca: ca.pem }}\n\
         admin_listen: \"\"\n\
         placement: {{ replicas_per_agent: {k} }}\n\
         policy:\n  allow:\n    - {{ cidrs: [\"127.0.0.1/32\"], ports: [{}] }}\n",
        echo.port()
    );
    let mut config: tether_agent::AgentConfig =
        serde_yaml_ng::from_str(&yaml).context("agent config")?;
    config.resolve_paths(dir);
    tether_agent::Agent::new(config, &prometheus::Registry::new())
        .with_context(|| format!("agent {id}"))
}

/// Runs the measurement and writes its section.
pub(crate) async fn run(mut args: KillArgs) -> Result<()> {
    if args.common.smoke {
        (args.replicas, args.agents, args.probe_secs) =
            (args.replicas.min(4), args.agents.min(40), 1);
    }
    let n = usize::from(args.replicas);
    if !(3..=250).contains(&n) || args.k == 0 || args.k >= n || args.agents == 0 {
        bail!("--replicas in 3..=250, --k in 1..replicas, --agents at least 1");
    }
    let load_before = load_average();
    let binary = tether_binary(&args.common)?;
    let pki = Pki::new(&[])?;
    eprintln!("issuing {} agent certificates", args.agents);
    let ids = issue_agents(pki.dir(), args.agents)?;
    let echo = Echo::start().await?;
    let wait = Duration::from_secs(args.wait_secs);
    let fleet = Fleet::start(&binary, &pki, n, args.agents).await?;
    let urls: Vec<String> = (0..n)
        .map(|i| {
            format!(
                "\"wss://{}/v1/connect\"",
                SocketAddr::new(
                    ip(i),
                    fleet.servers[0].as_ref().map_or(0, |s| s.tunnel.port())
                )
            )
        })
        .collect();
    let stop = CancellationToken::new();
    let mut agents = JoinSet::new();
    let measured = async {
        fleet.wait_mesh(wait).await?;
        eprintln!("{n} replicas linked; starting {} agents", ids.len());
        let started = Instant::now();
        for id in &ids {
            let agent = build_agent(pki.dir(), id, &urls.join(", "), args.k, echo.addr)?;
            let stop = stop.clone();
            agents.spawn(async move {
                agent
                    .run(tether_agent::AgentListeners::default(), stop)
                    .await
            });
        }
        measure(fleet, &ids, &args, (echo.addr, wait), started).await
    }
    .await;
    stop_agents(&stop, &mut agents).await;
    echo.stop();
    let (mut measured, fleet) = measured?;
    fleet.stop().await;
    measured.load = (load_before, load_average());
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let section = measured.markdown(&command);
    println!("{section}");
    if args.common.smoke {
        return Ok(());
    }
    report::write_section(args.common.out_path()?, MARKER, &section)
}

/// Places every agent, kills replica 1, and measures until the fleet is placed again.
async fn measure(
    mut fleet: Fleet,
    ids: &[String],
    args: &KillArgs,
    (echo, wait): (SocketAddr, Duration),
    started: Instant,
) -> Result<(Measured, Fleet)> {
    let n = fleet.servers.len();
    let members: Vec<String> = (0..n).map(|i| ip(i).to_string()).collect();
    let dead = 0;
    let (before, on_dead) = predict(ids, &members, args.k, Some(dead));
    let (after, _) = predict(ids, &members[1..], args.k, None);
    let model = model(&members, args.k, dead);
    kill_probe::sample_until(&fleet.admins(), &before, SAMPLE_EVERY * 5, wait).await?;
    let placed_cold = started.elapsed();
    eprintln!("all placed in {placed_cold:.1?}; probing, then killing replica 1");
    let survivors: Vec<SocketAddr> = fleet.admins()[1..].to_vec();
    let mut base = Vec::new();
    for admin in &survivors {
        base.push(kill_probe::counters(*admin).await?);
    }
    let targets = Arc::new(ProbeTargets {
        proxies: std::sync::Mutex::new(fleet.proxies.clone()),
        agents: ids.to_vec(),
        echo,
    });
    let stop_probes = CancellationToken::new();
    let probers = tokio::spawn(kill_probe::run_probers(
        targets.clone(),
        PROBERS,
        stop_probes.clone(),
    ));
    let probe_secs = Duration::from_secs(args.probe_secs);
    tokio::time::sleep(probe_secs).await;
    *targets
        .proxies
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = fleet.proxies[1..].to_vec();
    let victim = fleet.proxies[dead];
    let killed = Instant::now();
    fleet.kill(dead).await?;
    let samples = kill_probe::sample_until(&survivors, &after, SAMPLE_EVERY, wait).await;
    let placed = Instant::now();
    if samples.is_ok() {
        tokio::time::sleep(probe_secs).await;
    }
    stop_probes.cancel();
    let probes = probers.await.context("the probers")?;
    let samples = samples?;
    let mut end = Vec::new();
    for admin in &survivors {
        end.push(kill_probe::counters(*admin).await?);
    }
    let measured = Measured {
        replicas: n,
        agents: ids.len(),
        probers: PROBERS,
        k: args.k,
        placed_cold,
        predicted_before: before,
        predicted_after: after,
        predicted_movers: on_dead,
        base,
        end,
        replaced_in: placed - killed,
        peaks: kill_probe::peak_rates(&samples, Duration::from_millis(500)),
        phases: [
            Phase::of((BEFORE, "all"), &probes, (None, Some(killed)), |p| {
                p != victim
            }),
            Phase::of(
                (DURING, "all"),
                &probes,
                (Some(killed), Some(placed)),
                |p| p != victim,
            ),
            Phase::of((AFTER, "all"), &probes, (Some(placed), None), |p| {
                p != victim
            }),
            Phase::of(
                (VICTIM, "all but those in flight"),
                &probes,
                (None, Some(killed)),
                |p| p == victim,
            ),
        ],
        model,
        load: (String::new(), String::new()),
    };
    Ok((measured, fleet))
}
