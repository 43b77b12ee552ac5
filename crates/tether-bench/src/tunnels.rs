//! `tether-bench tunnels`: rounds of direct loopback, tether and the peers on PATH through the
//! same harness targets, interleaved, then one markdown section with medians and ratios.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;

use crate::Common;
use crate::daemons::{Pki, TetherPair, tether_binary, workspace_root};
use crate::harness::{self, RunSpec, Targets};
use crate::peers::{Rathole, find_on_path};
use crate::report;

/// Connections opened, held and closed on fresh daemons before each idle level is measured.
const WARMUP_CONNS: u32 = 200;

/// Options of `tether-bench tunnels`.
#[derive(Debug, Args)]
pub(crate) struct TunnelsArgs {
    #[command(flatten)]
    common: Common,
    /// Interleaved rounds (each system once per round); the report gives medians.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Seconds per throughput test.
    #[arg(long, default_value_t = 5)]
    seconds: u32,
    /// Idle connection counts; each level runs against freshly started daemons.
    #[arg(long, default_value = "1000,5000")]
    idle_levels: String,
    /// The harness script (default: ../shared/bench/tunnelbench.py beside the checkout).
    #[arg(long)]
    harness: Option<PathBuf>,
    /// Leave out peers found on PATH.
    #[arg(long)]
    no_peers: bool,
    /// Measure the cost of the server's audit log instead: tether with `audit_log` off and
    /// tether with it writing to a file, interleaved (throughput, RTT, connection rate; no
    /// idle levels, no peers), in the section marked `tunnels-audit`.
    #[arg(long)]
    audit_log: bool,
}

/// A system under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum System {
    Direct,
    Tether,
    /// tether with the server's audit log writing to a file.
    TetherAudit,
    Rathole,
}

impl System {
    fn label(self) -> &'static str {
        match self {
            System::Direct => "direct",
            System::Tether => "tether",
            System::TetherAudit => "tether, audit log on",
            System::Rathole => "rathole",
        }
    }
}

/// A started tunnel.
enum Running {
    Direct,
    Tether(TetherPair),
    Rathole(Rathole),
}

impl Running {
    fn entries(&self) -> Option<(std::net::SocketAddr, std::net::SocketAddr)> {
        match self {
            Running::Direct => None,
            Running::Tether(pair) => Some((pair.server.forwards[0], pair.server.forwards[1])),
            Running::Rathole(r) => Some((r.echo, r.iperf)),
        }
    }

    fn pids(&self) -> Result<Vec<u32>> {
        match self {
            Running::Direct => Ok(Vec::new()),
            Running::Tether(pair) => pair.pids(),
            Running::Rathole(r) => r.pids(),
        }
    }

    async fn stop(self) -> Result<()> {
        match self {
            Running::Direct => Ok(()),
            Running::Tether(pair) => pair.stop().await,
            Running::Rathole(r) => r.stop().await,
        }
    }
}

/// Runs the benchmark and writes its section.
pub(crate) async fn run(mut args: TunnelsArgs) -> Result<()> {
    if args.common.smoke {
        args.rounds = 1;
        args.seconds = 1;
        args.idle_levels = "100".to_owned();
    }
    if find_on_path("iperf3").is_none() {
        bail!("iperf3 is not on PATH (apt-get install iperf3)");
    }
    let script = match harness::locate(args.harness.as_deref()) {
        Ok(script) => script,
        // The harness lives beside the checkout, not in it: a smoke run on a machine without
        // it says so loudly instead of failing the whole test run.
        Err(err) if args.common.smoke => {
            eprintln!("SKIPPED tunnels smoke: {err:#}");
            return Ok(());
        }
        Err(err) => return Err(err),
    };
    let binary = tether_binary(&args.common)?;
    let rathole = if args.no_peers {
        None
    } else {
        find_on_path("rathole")
    };
    let mut systems = vec![System::Direct, System::Tether];
    if rathole.is_some() {
        systems.push(System::Rathole);
    }
    if args.audit_log {
        systems = vec![System::Tether, System::TetherAudit];
        args.idle_levels = String::new();
    }
    let levels: Vec<u32> = args
        .idle_levels
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.trim()
                .parse()
                .with_context(|| format!("--idle-levels: {s:?} is not a count"))
        })
        .collect::<Result<_>>()?;
    let pki = Pki::new(&["bench"])?;
    let audit_yaml = format!(
        "audit_log: {{ output: file, path: \"{}\" }}",
        pki.dir().join("audit.jsonl").display()
    );
    let jsonl = pki.dir().join("tunnels.jsonl");
    let warmup_jsonl = pki.dir().join("warmup.jsonl");
    let targets = Targets::start(&script).await?;
    let target_addrs = [targets.echo, targets.iperf];
    let mut base = vec![
        "--seconds".to_owned(),
        args.seconds.to_string(),
        "--max-seconds".to_owned(),
        "600".to_owned(),
    ];
    if args.common.smoke {
        base.extend(
            [
                "--omit",
                "0",
                "--rtt-count",
                "200",
                "--rtt-warmup",
                "20",
                "--connect-count",
                "50",
                "--settle",
                "0.5",
                "--close-settle",
                "1",
            ]
            .map(str::to_owned),
        );
    }
    let result = async {
        for round in 1..=args.rounds {
            for &system in &systems {
                eprintln!("round {round}/{}: {}", args.rounds, system.label());
                let start = || async {
                    Ok::<_, anyhow::Error>(match system {
                        System::Direct => Running::Direct,
                        System::Tether => {
                            Running::Tether(TetherPair::start(&binary, &pki, &target_addrs).await?)
                        }
                        System::TetherAudit => Running::Tether(
                            TetherPair::start_with(&binary, &pki, &target_addrs, &audit_yaml)
                                .await?,
                        ),
                        System::Rathole => Running::Rathole(
                            Rathole::start(
                                rathole.as_deref().context("rathole")?,
                                pki.dir(),
                                &targets,
                            )
                            .await?,
                        ),
                    })
                };
                let running = start().await?;
                let spec = RunSpec {
                    label: system.label(),
                    entries: running.entries(),
                    pids: running.pids()?,
                    tests: "tput,rtt,connect",
                    extra: base.clone(),
                };
                let measured = harness::run(&script, &targets, spec, &jsonl).await;
                running.stop().await?;
                measured?;
                if system == System::Direct {
                    continue;
                }
                // Each idle level on fresh daemons: allocators keep earlier high-water marks.
                // A warm-up burst first (WARMUP_CONNS held, then closed; its records are not
                // reported), so that the baseline already holds what any daemon that has
                // served traffic holds for good: code pages touched by the first connection,
                // the allocator's first slabs and metadata.
                for level in &levels {
                    let running = start().await?;
                    let idle = |count: u32, out| {
                        run_idle(&script, &targets, &running, system, &base, count, out)
                    };
                    let measured = async {
                        idle(WARMUP_CONNS.min(*level), &warmup_jsonl)
                            .await
                            .context("warm-up before the idle test")?;
                        idle(*level, &jsonl).await
                    }
                    .await;
                    running.stop().await?;
                    measured?;
                }
            }
        }
        Ok::<_, anyhow::Error>(())
    }
    .await;
    targets.stop().await;
    result?;
    let records = harness::records(&jsonl)?;
    let saved = workspace_root().join("target/tether-bench");
    std::fs::create_dir_all(&saved)?;
    std::fs::copy(&jsonl, saved.join("tunnels.jsonl"))?;
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    if args.common.smoke {
        // A smoke run checks that the tool works; its one-second figures from a debug build
        // are not measurements, so no table of targets "not met" is printed.
        report::require_all_ok(&records)?;
        println!("{}", report::smoke_summary("tunnels", &records));
        return Ok(());
    }
    let mut section = report::tunnels(&records, &command, args.rounds);
    let mut marker = report::TUNNELS_MARKER;
    if args.audit_log {
        section = section.replacen(
            "## End to end against peers (`tether-bench tunnels`)",
            "## The audit log's cost (`tether-bench tunnels --audit-log`)",
            1,
        );
        marker = report::TUNNELS_AUDIT_MARKER;
        // The peers' targets do not apply to an on/off comparison of tether with itself.
        if let Some(at) = section.find("| target | goal |") {
            section.truncate(at);
        }
        let lines = std::fs::read_to_string(pki.dir().join("audit.jsonl"))
            .map_or(0, |text| text.lines().count());
        section.push_str(&format!(
            "\nThe audit log held {lines} lines at the end (one per tunnelled connection).\n"
        ));
    }
    println!("{section}");
    report::write_section(args.common.out_path()?, marker, &section)
}

/// One harness `idle` test of `count` connections through `running`, recorded in `out`.
async fn run_idle(
    script: &Path,
    targets: &Targets,
    running: &Running,
    system: System,
    base: &[String],
    count: u32,
    out: &Path,
) -> Result<()> {
    let mut extra = base.to_vec();
    extra.extend(["--idle-levels".to_owned(), count.to_string()]);
    let spec = RunSpec {
        label: system.label(),
        entries: running.entries(),
        pids: running.pids()?,
        tests: "idle",
        extra,
    };
    harness::run(script, targets, spec, out).await
}
