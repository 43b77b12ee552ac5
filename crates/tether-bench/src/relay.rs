//! `tether-bench relay`: what a relay between replicas costs. Two replicas with peering and one
//! agent connected to replica A only: the same echo RTT and one-stream iperf3 throughput through
//! A's forwards (direct) and through B's (relayed over the peer session to A), interleaved.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;

use crate::Common;
use crate::bench_targets::{Targets, wait_for_echo};
use crate::daemons::{AgentProcess, Pki, ServerProcess, free_port, tether_binary};
use crate::measure_latency::{RttSpec, rtt};
use crate::measure_tput::{self, TputSpec};
use crate::process_stats;
use crate::record::Record;
use crate::report;

/// The section of `tether-bench relay` in docs/BENCHMARKS.md.
const RELAY_MARKER: &str = "relay";
/// How long the replicas may take to link and the agent to connect.
const READY_WAIT: Duration = Duration::from_secs(60);

/// `tether-bench relay`.
#[derive(Debug, Args)]
pub(crate) struct RelayArgs {
    #[command(flatten)]
    pub(crate) common: Common,
    /// Interleaved rounds (medians are reported).
    #[arg(long, default_value_t = 3)]
    rounds: u32,
}

/// The two replicas and the agent.
struct Fleet {
    a: ServerProcess,
    b: ServerProcess,
    agent: AgentProcess,
}

/// Replica `name` on 127.0.0.`octet`: agents on `listen`, peers on `peer_port`, forwards for
/// `edge-1` to the echo and iperf3 targets.
async fn replica(
    binary: &Path,
    pki: &Pki,
    (name, octet): (&str, u8),
    peer_ports: (u16, u16),
    targets: &[SocketAddr],
) -> Result<ServerProcess> {
    let ip = IpAddr::V4(Ipv4Addr::new(127, 0, 0, octet));
    let listen = SocketAddr::new(ip, free_port()?);
    let own_peer_port = if octet == 1 {
        peer_ports.0
    } else {
        peer_ports.1
    };
    let extra = format!(
        "server_id: {name}\n\
         peers:\n\
         \x20 listen: \"{ip}:{own_peer_port}\"\n\
         \x20 members: [\"127.0.0.1:{}\", \"127.0.0.2:{}\"]\n\
         \x20 cert: server-peer-{name}.pem\n\
         \x20 key: server-peer-{name}-key.pem\n\
         \x20 server_ca: ca.pem\n\
         \x20 server_name: \"127.0.0.1\"\n\
         \x20 interval: 1s\n",
        peer_ports.0, peer_ports.1
    );
    ServerProcess::start_named(binary, pki, name, listen, "edge-1", targets, &extra).await
}

impl Fleet {
    async fn start(binary: &Path, pki: &Pki, targets: &Targets) -> Result<Fleet> {
        for name in ["a", "b"] {
            let status = std::process::Command::new(binary)
                .args(["certs", "issue", "--server-peer", name, "--dir"])
                .arg(pki.dir())
                .output()
                .context("tether certs issue --server-peer")?;
            if !status.status.success() {
                bail!(
                    "tether certs issue --server-peer {name}: {}",
                    String::from_utf8_lossy(&status.stderr)
                );
            }
        }
        let peer_ports = (free_port()?, free_port()?);
        let forward_targets = [targets.echo, targets.iperf];
        let a = replica(binary, pki, ("a", 1), peer_ports, &forward_targets).await?;
        let b = replica(binary, pki, ("b", 2), peer_ports, &forward_targets).await?;
        let agent = AgentProcess::start(binary, pki, "edge-1", a.tunnel, &forward_targets)?;
        a.wait_for_agents(1, READY_WAIT).await?;
        // B reaches the agent only through A: wait until its relay works.
        wait_for_echo(
            b.forwards[0],
            "a relayed echo through replica b",
            READY_WAIT,
        )
        .await?;
        Ok(Fleet { a, b, agent })
    }

    fn pids(&self) -> Result<Vec<u32>> {
        Ok(vec![self.a.pid()?, self.b.pid()?, self.agent.pid()?])
    }

    async fn stop(self) -> Result<()> {
        self.agent.stop().await?;
        self.b.stop().await?;
        self.a.stop().await
    }
}

/// Runs the comparison and writes its section.
pub(crate) async fn run(args: RelayArgs) -> Result<()> {
    let smoke = args.common.smoke;
    let binary = tether_binary(&args.common)?;
    let targets = Targets::start().await?;
    let pki = Pki::new(&["edge-1"])?;
    let fleet = Fleet::start(&binary, &pki, &targets).await?;
    let rounds = if smoke { 1 } else { args.rounds.max(1) };
    let rtt_spec = RttSpec {
        warmup: if smoke { 20 } else { 500 },
        count: if smoke { 200 } else { 5_000 },
        size: 64,
        limit: Duration::from_secs(60),
    };
    let tput_spec = TputSpec {
        streams: 1,
        reverse: false,
        seconds: if smoke { 1 } else { 5 },
        omit: if smoke { 0 } else { 1 },
    };
    let pids = fleet.pids()?;
    let mut records = Vec::new();
    for round in 0..rounds {
        // Interleaved, the order alternating per round.
        let order = if round % 2 == 0 {
            [("direct", &fleet.a), ("relayed", &fleet.b)]
        } else {
            [("relayed", &fleet.b), ("direct", &fleet.a)]
        };
        for (label, replica) in order {
            records.push(rtt(label, replica.forwards[0], rtt_spec).await);
            targets.ensure_iperf().await?;
            records.push(measure_tput::run(label, replica.forwards[1], tput_spec, &pids).await);
        }
    }
    fleet.stop().await?;
    targets.stop().await;
    let failed: Vec<&Record> = records.iter().filter(|r| !r.ok).collect();
    if let Some(first) = failed.first() {
        bail!(
            "{} of {} measurements failed; first: {} {}: {}",
            failed.len(),
            records.len(),
            first.label,
            first.test,
            first.error.as_deref().unwrap_or("?")
        );
    }
    let section = section(&records, rounds);
    print!("{section}");
    if smoke {
        println!("relay smoke: ok (a smoke run checks the tool, not the figures)");
        return Ok(());
    }
    report::write_section(args.common.out_path()?, RELAY_MARKER, &section)
}

/// The markdown table: direct, relayed, and their ratio.
fn section(records: &[Record], rounds: u32) -> String {
    let rows: [(&str, &str, report::Pick); 3] = [
        ("echo RTT p50 µs (64 B)", "rtt", |r| r.p50_us),
        ("echo RTT p99 µs (64 B)", "rtt", |r| r.p99_us),
        ("1 stream MB/s", "tput1", |r| r.mbps),
    ];
    let mut out = format!(
        "Relay between replicas: one agent on replica A; the same target through A's forward \
         (direct) and B's (relayed over the peer session), {rounds} interleaved rounds, medians \
         (`tether-bench relay`). Machine: {}.\n\n\
         | figure | direct (via A) | relayed (via B) | relayed / direct |\n|---|---|---|---|\n",
        process_stats::machine()
    );
    for (name, test, pick) in rows {
        let direct = report::median(records, "direct", test, pick);
        let relayed = report::median(records, "relayed", test, pick);
        let ratio = match (direct, relayed) {
            (Some((d, _)), Some((r, _))) if d > 0.0 => format!("{:.2}", r / d),
            _ => "–".to_owned(),
        };
        out.push_str(&format!(
            "| {name} | {} | {} | {ratio} |\n",
            report::cell(direct),
            report::cell(relayed)
        ));
    }
    out
}
