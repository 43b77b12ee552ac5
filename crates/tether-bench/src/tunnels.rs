//! `tether-bench tunnels`: rounds of direct loopback, the splice floor, tether and the peers
//! found, each started fresh and measured by this tool's own harness against the same targets,
//! interleaved (every system once per round), then one markdown section of medians and a JSON
//! file of them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;

use crate::Common;
use crate::bench_targets::Targets;
use crate::daemons::{Pki, tether_binary, workspace_root};
use crate::measure_idle::{self, IdleSpec};
use crate::measure_latency::{self, RttSpec};
use crate::measure_tput::{self, TputSpec};
use crate::peers::{find_on_path, locate};
use crate::record::{self, Record};
use crate::report;
use crate::report_tunnels;
use crate::systems::{Launch, System};

/// Connections opened, held and closed on fresh daemons before each idle level is measured.
const WARMUP_CONNS: usize = 200;

/// Options of `tether-bench tunnels`.
#[derive(Debug, Args)]
pub(crate) struct TunnelsArgs {
    #[command(flatten)]
    common: Common,
    /// Interleaved rounds (each system once per round); the report gives medians.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Seconds per throughput test (iperf3 -t), after --omit seconds of warm-up.
    #[arg(long, default_value_t = 5)]
    seconds: u32,
    /// Warm-up seconds of each throughput test that are not counted (iperf3 -O).
    #[arg(long, default_value_t = 1)]
    omit: u32,
    /// Parallel streams of the multi-stream tests.
    #[arg(long, default_value_t = 8)]
    streams: u32,
    /// Round trips of the RTT test (64-byte messages, after 200 not counted).
    #[arg(long, default_value_t = 2000)]
    rtt_count: u32,
    /// Connections of the connect test (connect, one byte echoed, close; one after another).
    #[arg(long, default_value_t = 500)]
    connect_count: u32,
    /// Idle connection counts; each level runs against freshly started daemons.
    #[arg(long, default_value = "1000,5000")]
    idle_levels: String,
    /// Leave out the peers (rathole, wstunnel) even when found.
    #[arg(long)]
    no_peers: bool,
    /// Measure only these systems (comma-separated: direct, floor, tether, rathole, wstunnel),
    /// e.g. `--systems tether` while profiling.
    #[arg(long, value_delimiter = ',')]
    systems: Vec<String>,
    /// The rathole binary (default: `rathole` on PATH, if there).
    #[arg(long)]
    rathole: Option<PathBuf>,
    /// The wstunnel binary (default: `wstunnel` on PATH, if there).
    #[arg(long)]
    wstunnel: Option<PathBuf>,
    /// Measure the cost of the server's audit log instead: tether with `audit_log` off and
    /// tether with it writing to a file, interleaved (throughput, RTT, connection rate; no
    /// idle levels, no peers, no floor), in the section marked `tunnels-audit`.
    #[arg(long)]
    audit_log: bool,
}

/// What each round measures of each system.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub(crate) tput: Vec<TputSpec>,
    pub(crate) rtt: RttSpec,
    pub(crate) connect_count: u32,
    pub(crate) idle_levels: Vec<usize>,
    pub(crate) settle: Duration,
    pub(crate) close_settle: Duration,
}

impl TunnelsArgs {
    fn plan(&mut self) -> Result<Plan> {
        let smoke = self.common.smoke;
        if smoke {
            self.rounds = 1;
            self.seconds = 1;
            self.omit = 0;
            self.rtt_count = 200;
            self.connect_count = 50;
            self.idle_levels = "100".to_owned();
        }
        if self.audit_log {
            self.idle_levels = String::new();
        }
        let tput = |streams, reverse| TputSpec {
            streams,
            reverse,
            seconds: self.seconds,
            omit: self.omit,
        };
        Ok(Plan {
            tput: vec![
                tput(1, false),
                tput(self.streams, false),
                tput(1, true),
                tput(self.streams, true),
            ],
            rtt: RttSpec {
                warmup: if smoke { 20 } else { 200 },
                count: self.rtt_count,
                size: 64,
                limit: Duration::from_secs(60),
            },
            connect_count: self.connect_count,
            idle_levels: parse_levels(&self.idle_levels)?,
            settle: Duration::from_millis(if smoke { 500 } else { 2000 }),
            close_settle: Duration::from_secs(if smoke { 1 } else { 5 }),
        })
    }
}

fn parse_levels(text: &str) -> Result<Vec<usize>> {
    text.split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| {
            s.trim()
                .parse()
                .with_context(|| format!("--idle-levels: {s:?} is not a count"))
        })
        .collect()
}

/// Runs the benchmark and writes its section.
pub(crate) async fn run(mut args: TunnelsArgs) -> Result<()> {
    let plan = args.plan()?;
    if find_on_path("iperf3").is_none() {
        bail!("iperf3 is not on PATH (apt-get install iperf3)");
    }
    let binary = tether_binary(&args.common)?;
    let (rathole, wstunnel) = if args.no_peers || args.audit_log {
        (None, None)
    } else {
        (
            locate("rathole", args.rathole.as_deref())?,
            locate("wstunnel", args.wstunnel.as_deref())?,
        )
    };
    let mut systems = vec![System::Direct, System::Floor, System::Tether];
    systems.extend(rathole.is_some().then_some(System::Rathole));
    systems.extend(wstunnel.is_some().then_some(System::Wstunnel));
    if !args.systems.is_empty() {
        systems.retain(|s| args.systems.iter().any(|name| name == s.label()));
        if systems.is_empty() {
            bail!("--systems {:?}: none of these is available", args.systems);
        }
    }
    if args.audit_log {
        systems = vec![System::Tether, System::TetherAudit];
    }
    let pki = Pki::new(&["bench"])?;
    let jsonl = pki.dir().join("tunnels.jsonl");
    let targets = Targets::start().await?;
    let launch = Launch {
        tether: &binary,
        pki: &pki,
        targets: &targets,
        rathole,
        wstunnel,
        audit_yaml: format!(
            "audit_log: {{ output: file, path: \"{}\" }}",
            pki.dir().join("audit.jsonl").display()
        ),
        via: None,
    };
    let result = rounds(&launch, &systems, args.rounds, &plan, &jsonl).await;
    targets.stop().await;
    result?;
    let records = record::read_all(&jsonl)?;
    let saved = save_results(&jsonl, "tunnels", &records)?;
    eprintln!("records and medians: {}", saved.display());
    if args.common.smoke {
        // A smoke run checks that the tool works; its one-second figures from a debug build
        // are not measurements, so no table of targets "not met" is printed.
        report::require_all_ok(&records)?;
        println!("{}", report_tunnels::table(&records));
        println!("{}", report::smoke_summary("tunnels", &records));
        return Ok(());
    }
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    if args.audit_log {
        let lines = std::fs::read_to_string(pki.dir().join("audit.jsonl"))
            .map_or(0, |text| text.lines().count());
        let section = report_tunnels::audit_section(&records, &command, args.rounds, lines);
        println!("{section}");
        return report::write_section(
            args.common.out_path()?,
            report::TUNNELS_AUDIT_MARKER,
            &section,
        );
    }
    let section = report_tunnels::section(&records, &command, args.rounds);
    println!("{section}");
    report::write_section(args.common.out_path()?, report::TUNNELS_MARKER, &section)
}

/// Every round: each system started fresh, measured, stopped; then its idle levels.
async fn rounds(
    launch: &Launch<'_>,
    systems: &[System],
    rounds: usize,
    plan: &Plan,
    jsonl: &Path,
) -> Result<()> {
    for round in 1..=rounds {
        for &system in systems {
            eprintln!("round {round}/{rounds}: {}", system.label());
            let running = launch.start(system).await?;
            let measured = measure_loopback(launch, system, &running, plan, jsonl).await;
            running.stop().await?;
            measured?;
            if system.is_tunnel() && system != System::Floor {
                for &level in &plan.idle_levels {
                    measure_idle_level(launch, system, plan, level, jsonl).await?;
                }
            }
        }
    }
    Ok(())
}

/// Throughput (each direction, 1 and N streams), RTT and connection rate of one system.
async fn measure_loopback(
    launch: &Launch<'_>,
    system: System,
    running: &crate::systems::Running,
    plan: &Plan,
    jsonl: &Path,
) -> Result<()> {
    let label = system.label();
    let pids = running.pids()?;
    for spec in &plan.tput {
        launch.targets.ensure_iperf().await?;
        let record = measure_tput::run(label, running.iperf, *spec, &pids).await;
        record::append(jsonl, &record)?;
    }
    let rtt = measure_latency::rtt(label, running.echo, plan.rtt).await;
    record::append(jsonl, &rtt)?;
    let limit = Duration::from_secs(120);
    let connect =
        measure_latency::connect_rate(label, running.echo, plan.connect_count, &pids, limit).await;
    record::append(jsonl, &connect)
}

/// One idle level on freshly started daemons. A warm-up burst first (its figures are not
/// kept), so that the baseline already holds what any daemon that has served traffic holds for
/// good: code pages touched by the first connection, the allocator's first slabs.
async fn measure_idle_level(
    launch: &Launch<'_>,
    system: System,
    plan: &Plan,
    level: usize,
    jsonl: &Path,
) -> Result<()> {
    let running = launch.start(system).await?;
    let pids = running.pids()?;
    let spec = |count| IdleSpec {
        count,
        settle: plan.settle,
        close_settle: plan.close_settle,
    };
    let warmup = measure_idle::run(
        system.label(),
        running.echo,
        &pids,
        spec(WARMUP_CONNS.min(level)),
    )
    .await;
    let measured = if warmup.ok {
        Ok(measure_idle::run(system.label(), running.echo, &pids, spec(level)).await)
    } else {
        Err(anyhow::anyhow!(
            "warm-up before the idle test: {}",
            warmup.error.unwrap_or_default()
        ))
    };
    running.stop().await?;
    record::append(jsonl, &measured?)
}

/// Copies the run's records to `target/tether-bench/<name>.jsonl` and writes the medians
/// beside them as `<name>.json`; returns the folder.
pub(crate) fn save_results(jsonl: &Path, name: &str, records: &[Record]) -> Result<PathBuf> {
    let saved = workspace_root().join("target/tether-bench");
    std::fs::create_dir_all(&saved)?;
    std::fs::copy(jsonl, saved.join(format!("{name}.jsonl")))?;
    let medians = serde_json::to_string_pretty(&report::medians_json(records))?;
    std::fs::write(saved.join(format!("{name}.json")), medians)?;
    Ok(saved)
}
