//! `tether-bench wan`: each system's link (tether's agent-to-server connection, the floor's
//! relay-to-relay connections, a peer's control link; for direct, the client's connections)
//! through the delay relay (default 50 ms round trip, 1 Gbit/s), interleaved rounds: one
//! stream each way, and connect plus first byte.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Result, bail};
use clap::Args;

use crate::Common;
use crate::bench_targets::Targets;
use crate::daemons::{Pki, tether_binary};
use crate::delay_relay::LinkSpec;
use crate::measure_latency;
use crate::measure_tput::{self, TputSpec};
use crate::peers::{find_on_path, locate};
use crate::record::{self, Record};
use crate::report::{self, Pick, cell, median};
use crate::systems::{Launch, System};
use crate::tunnels::save_results;

/// Options of `tether-bench wan`.
#[derive(Debug, Args)]
pub(crate) struct WanArgs {
    #[command(flatten)]
    common: Common,
    /// Interleaved rounds (each system once per round); the report gives medians.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Round trip of the emulated path, milliseconds.
    #[arg(long, default_value_t = 50)]
    rtt_ms: u64,
    /// Rate of the emulated path, Mbit/s, each direction.
    #[arg(long, default_value_t = 1000.0)]
    mbit: f64,
    /// Seconds per one-stream transfer, after 2 s of warm-up (windows grow first).
    #[arg(long, default_value_t = 10)]
    seconds: u32,
    /// Sequential connections of the connect-and-first-byte test.
    #[arg(long, default_value_t = 20)]
    connect_count: u32,
    /// Leave out the peers (rathole, wstunnel) even when found.
    #[arg(long)]
    no_peers: bool,
    /// Measure only these systems (comma-separated: direct, floor, tether, rathole,
    /// wstunnel), e.g. `--systems tether` for an A/B of two tether builds.
    #[arg(long, value_delimiter = ',')]
    systems: Vec<String>,
    /// The rathole binary (default: `rathole` on PATH, if there).
    #[arg(long)]
    rathole: Option<PathBuf>,
    /// The wstunnel binary (default: `wstunnel` on PATH, if there).
    #[arg(long)]
    wstunnel: Option<PathBuf>,
}

/// Runs the WAN benchmark and writes its section.
pub(crate) async fn run(mut args: WanArgs) -> Result<()> {
    if args.common.smoke {
        args.rounds = 1;
        args.seconds = 1;
        args.connect_count = 3;
    }
    let spec = LinkSpec::new(args.rtt_ms, args.mbit)?;
    if find_on_path("iperf3").is_none() {
        bail!("iperf3 is not on PATH (apt-get install iperf3)");
    }
    let binary = tether_binary(&args.common)?;
    let (rathole, wstunnel) = if args.no_peers {
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
    let pki = Pki::new(&["bench"])?;
    let jsonl = pki.dir().join("wan.jsonl");
    let targets = Targets::start().await?;
    let launch = Launch {
        tether: &binary,
        pki: &pki,
        targets: &targets,
        rathole,
        wstunnel,
        audit_yaml: String::new(),
        via: Some(spec),
    };
    let omit = if args.common.smoke { 0 } else { 2 };
    let result = async {
        for round in 1..=args.rounds {
            for &system in &systems {
                eprintln!("WAN round {round}/{}: {}", args.rounds, system.label());
                measure(
                    &launch,
                    system,
                    args.seconds,
                    omit,
                    args.connect_count,
                    &jsonl,
                )
                .await?;
            }
        }
        Ok::<_, anyhow::Error>(())
    }
    .await;
    targets.stop().await;
    result?;
    let records = record::read_all(&jsonl)?;
    let saved = save_results(&jsonl, "wan", &records)?;
    eprintln!("records and medians: {}", saved.display());
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    if args.common.smoke {
        report::require_all_ok(&records)?;
        println!("{}", table(&records, &spec));
        println!("{}", report::smoke_summary("wan", &records));
        return Ok(());
    }
    let section = section(&records, &spec, &command, args.rounds);
    println!("{section}");
    report::write_section(args.common.out_path()?, report::WAN_MARKER, &section)
}

/// One system, started fresh with its link through the delay relay.
async fn measure(
    launch: &Launch<'_>,
    system: System,
    seconds: u32,
    omit: u32,
    connect_count: u32,
    jsonl: &Path,
) -> Result<()> {
    let label = system.label();
    let running = launch.start(system).await?;
    let measured = async {
        let pids = running.pids()?;
        for reverse in [false, true] {
            launch.targets.ensure_iperf().await?;
            let spec = TputSpec {
                streams: 1,
                reverse,
                seconds,
                omit,
            };
            let mut record = measure_tput::run(label, running.iperf, spec, &pids).await;
            record.test = if reverse { "wan1R" } else { "wan1" }.to_owned();
            record::append(jsonl, &record)?;
        }
        let limit = Duration::from_secs(120);
        let mut connect =
            measure_latency::connect_rate(label, running.echo, connect_count, &pids, limit).await;
        connect.test = "wan_connect".to_owned();
        record::append(jsonl, &connect)
    }
    .await;
    running.stop().await?;
    measured
}

fn table(records: &[Record], spec: &LinkSpec) -> String {
    let mut labels: Vec<&str> = Vec::new();
    for r in records {
        if !labels.contains(&r.label.as_str()) {
            labels.push(&r.label);
        }
    }
    let link_mb = spec.rate / 1e6;
    let rtt_ms = spec.one_way.as_secs_f64() * 2e3;
    let rows: [(&str, &str, Pick); 7] = [
        ("1 stream MB/s", "wan1", |r| r.mbps),
        ("1 stream, reverse MB/s", "wan1R", |r| r.mbps),
        (
            "tunnel RSS during the 1-stream transfer (KiB)",
            "wan1",
            |r| r.rss_kib.map(|v| v as f64),
        ),
        ("connect + first byte p50 µs", "wan_connect", |r| r.p50_us),
        ("connect + first byte p99 µs", "wan_connect", |r| r.p99_us),
        ("1 stream, % of the link", "wan1", |r| r.mbps),
        (
            "connect + first byte p50, round trips",
            "wan_connect",
            |r| r.p50_us,
        ),
    ];
    let mut out = String::from("| figure |");
    for label in &labels {
        let _ = write!(out, " {label} |");
    }
    let _ = writeln!(out, "\n|---|{}", "---|".repeat(labels.len()));
    for (i, (name, test, pick)) in rows.iter().enumerate() {
        let _ = write!(out, "| {name} |");
        for label in &labels {
            let value = median(records, label, test, *pick);
            let text = match i {
                5 => value.map_or("–".into(), |(v, _)| {
                    format!("{:.0} %", 100.0 * v / link_mb)
                }),
                6 => value.map_or("–".into(), |(v, _)| format!("{:.2}", v / 1e3 / rtt_ms)),
                _ => cell(value),
            };
            let _ = write!(out, " {text} |");
        }
        out.push('\n');
    }
    out
}

fn section(records: &[Record], spec: &LinkSpec, command: &str, rounds: usize) -> String {
    let rtt_ms = spec.one_way.as_secs_f64() * 2e3;
    let mut out = String::from("## Over a long, fat path (`tether-bench wan`)\n\n");
    let _ = writeln!(out, "- Date: {}", report::today());
    let _ = writeln!(out, "- tether: {}", report::git_describe());
    let _ = writeln!(
        out,
        "- Command: `{command}` ({rounds} interleaved rounds; medians)"
    );
    let _ = writeln!(
        out,
        "- Path: the delay relay, {rtt_ms:.0} ms round trip, {:.0} Mbit/s each way ({:.0} MB/s), \
         on each tunnel's link; for direct, on the client's own connections.\n",
        spec.rate * 8.0 / 1e6,
        spec.rate / 1e6
    );
    out.push_str(&table(records, spec));
    out
}
