//! `tether-bench`: measures tether against direct loopback, a splice(2) floor and any peer tunnel
//! found, on loopback and over an emulated WAN path, and how many agents one server holds;
//! writes the results into `docs/BENCHMARKS.md`.

mod agent_pool;
mod bench_targets;
mod daemons;
mod delay_relay;
mod echo_server;
mod http_get;
mod kill_probe;
mod many_agents;
mod measure_idle;
mod measure_latency;
mod measure_tput;
mod peers;
mod placement_kill;
mod placement_model;
mod placement_report;
mod process_stats;
mod record;
mod relay;
mod replica_mesh;
mod report;
mod report_tunnels;
mod soak;
mod soak_faults;
mod soak_relay;
mod soak_report;
mod soak_rig;
mod soak_server;
mod soak_traffic;
mod splice_relay;
mod systems;
mod tunnels;
mod wan;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "tether-bench", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Throughput (iperf3, 1 and N streams, both directions), tunnel CPU per byte, RTT,
    /// connection rate and idle memory of direct loopback, the floor (two splice(2) relays),
    /// tether and the peers found (rathole, wstunnel), each started fresh, in interleaved
    /// rounds; medians as a markdown table and JSON (target/tether-bench/tunnels.json).
    ///
    /// The method (what each test does, what the CPU figures leave out) is in
    /// docs/BENCHMARKS.md, "How the end-to-end figures are measured". This harness replaced the
    /// external script of earlier runs; it measures the same tests the same way.
    Tunnels(tunnels::TunnelsArgs),
    /// The same systems with their link through a delay relay (default 50 ms, 1 Gbit/s): one
    /// stream each way, and connect plus first byte.
    ///
    /// The relay (this kernel has no netem) holds every byte for the one-way delay and paces each
    /// direction to the rate; see docs/BENCHMARKS.md, "How the end-to-end figures are measured".
    Wan(wan::WanArgs),
    /// N agent sessions (in this process) against one real server: server RSS per agent, and
    /// the time for all of them to reconnect after the server restarts.
    Agents(many_agents::AgentsArgs),
    /// The k-of-N placement of a large fleet, computed with the agents' own ranking: sessions
    /// per replica, the reconnect load of a replica's death and the moves of a join.
    Placement(placement_model::PlacementArgs),
    /// N real replicas with peering and a sample of agents placed on k of them: one replica
    /// gets SIGKILL; who reconnects, how fast, the survivors' connection rate and dial success
    /// through a random replica, against the placement model.
    PlacementKill(placement_kill::KillArgs),
    /// Two replicas with peering and one agent on the first: echo RTT and one-stream
    /// throughput through the first (direct) and the second (relayed), interleaved.
    Relay(relay::RelayArgs),
    /// (child process of a run) The echo target.
    #[command(hide = true)]
    EchoServer {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// (child process of a run) One side of the floor: relays `LISTEN=UPSTREAM` routes with
    /// splice(2).
    #[command(hide = true)]
    SpliceRelay {
        #[arg(long = "route", value_parser = splice_relay::parse_route, required = true)]
        routes: Vec<splice_relay::Route>,
    },
    /// Server and agents under mixed traffic and faults for a set time; fails if RSS, fds or
    /// tasks grow beyond a bound after the warm-up, or a stream or a byte is lost.
    Soak(soak::SoakArgs),
}

/// Options shared by both modes.
#[derive(Debug, Clone, Args)]
pub(crate) struct Common {
    /// A few seconds per mode, small counts, results not written to docs (CI runs this so that
    /// the tool cannot rot).
    #[arg(long)]
    pub(crate) smoke: bool,
    /// The tether binary to measure. Default: build the workspace's (release, or debug with
    /// --smoke) and use it.
    #[arg(long)]
    pub(crate) tether: Option<PathBuf>,
    /// Where to write the markdown section (between the mode's markers; created if missing).
    /// Default: docs/BENCHMARKS.md, or nothing with --smoke.
    #[arg(long)]
    pub(crate) out: Option<PathBuf>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TETHER_BENCH_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,tether_agent=error")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    // The child processes relay on one thread, as lean as a relay gets.
    let mut builder = match cli.command {
        Command::EchoServer { .. } | Command::SpliceRelay { .. } => {
            tokio::runtime::Builder::new_current_thread()
        }
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Tunnels(args) => tunnels::run(args).await,
            Command::Wan(args) => wan::run(args).await,
            Command::Agents(args) => many_agents::run(args).await,
            Command::Placement(args) => placement_model::run(args),
            Command::PlacementKill(args) => placement_kill::run(args).await,
            Command::Relay(args) => relay::run(args).await,
            Command::EchoServer { listen } => echo_server::serve(listen).await,
            Command::SpliceRelay { routes } => splice_relay::serve(&routes).await,
            Command::Soak(args) => soak::run(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

impl Common {
    /// The file the report goes into, if any.
    pub(crate) fn out_path(&self) -> anyhow::Result<Option<PathBuf>> {
        Ok(match (&self.out, self.smoke) {
            (Some(path), _) => Some(path.clone()),
            (None, true) => None,
            (None, false) => Some(daemons::workspace_root().join("docs/BENCHMARKS.md")),
        })
    }
}
