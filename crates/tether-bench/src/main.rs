//! `tether-bench`: measures tether against direct loopback and any peer tunnel on PATH, and how
//! many agents one server holds; writes the results into `docs/BENCHMARKS.md`.

mod daemons;
mod harness;
mod http_get;
mod many_agents;
mod peers;
mod process_stats;
mod replica_mesh;
mod report;
mod soak;
mod soak_traffic;
mod tunnels;

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
    /// Throughput, RTT, connection rate and idle memory through tether, direct loopback and the
    /// peers found on PATH (rathole), interleaved round by round, with ../shared/bench's harness.
    Tunnels(tunnels::TunnelsArgs),
    /// N agent sessions (in this process) against one real server: server RSS per agent, and
    /// the time for all of them to reconnect after the server restarts.
    Agents(many_agents::AgentsArgs),
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
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Tunnels(args) => tunnels::run(args).await,
            Command::Agents(args) => many_agents::run(args).await,
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
