//! `tether-bench soak`: a real server and two agent processes of one client, the agents behind
//! a partitionable relay, under mixed traffic (sequence-checked transfers, resets, empty
//! connections) with faults (agent SIGKILL, server SIGTERM and SIGKILL with restarts on the
//! same ports, partitions, reloads) for a set time with compressed timeouts. Fails if the last
//! server life or the stable agent grew beyond its bound after its warm-up, if streams opened
//! != closed at the end, or if one byte came back wrong.

use std::time::Duration;

use anyhow::{Result, bail};
use clap::Args;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::Common;
use crate::daemons::{Pki, tether_binary};
use crate::http_get;
use crate::soak_faults::nth;
use crate::soak_report::Report;
use crate::soak_rig::Rig;
use crate::soak_traffic::{echo_target, worker};

/// How long the streams may take to close, and the agents to come back, once traffic stops.
const SETTLE: Duration = Duration::from_secs(30);
/// The share of the run during which the server may be restarted; its last life runs the rest.
const RESTARTS_UNTIL: f64 = 0.5;

#[derive(Debug, Args)]
pub(crate) struct SoakArgs {
    #[command(flatten)]
    common: Common,
    /// How long traffic and faults run (`60s`, `10m`, `1h`).
    #[arg(long, default_value = "10m", value_parser = tether_common::duration::parse_duration)]
    duration: Duration,
    /// The warm-up before a baseline sample, in percent of the run: from the start for the
    /// stable agent, from the start of its last life for the server.
    #[arg(long, default_value_t = 20)]
    warmup_percent: u32,
    /// Concurrent traffic workers.
    #[arg(long, default_value_t = 8)]
    workers: usize,
    /// How often a fault is injected, in the cycle server SIGTERM, partition, server SIGKILL,
    /// agent kill, reload, partition, agent kill, reload (server restarts only in the first
    /// half of the run; agent kills instead after).
    #[arg(long, default_value = "15s", value_parser = tether_common::duration::parse_duration)]
    fault_every: Duration,
    /// How often the processes are sampled.
    #[arg(long, default_value = "5s", value_parser = tether_common::duration::parse_duration)]
    sample_every: Duration,
}

pub(crate) async fn run(args: SoakArgs) -> Result<()> {
    let binary = tether_binary(&args.common)?;
    let pki = Pki::new(&["soak"])?;
    let stop = CancellationToken::new();
    let mut tasks = JoinSet::new();
    let target = echo_target(stop.clone(), &mut tasks).await?;
    let mut rig = Rig::start(binary, pki, target, stop.clone(), &mut tasks).await?;
    rig.wait_for_sessions(2, Duration::from_secs(60)).await?;

    let traffic = CancellationToken::new();
    let mut workers = JoinSet::new();
    for _ in 0..args.workers {
        workers.spawn(worker(
            rig.server.forward(),
            rig.counts.clone(),
            traffic.clone(),
        ));
    }
    let started = Instant::now();
    let samples = inject_and_sample(&mut rig, &args, started).await;
    rig.heal(true);
    // The workers finish their last operation before the echo target stops (with `stop`,
    // below): an echo connection dropped mid-transfer ends with a FIN, which the tunnel
    // rightly passes on, and the worker would count a short clean EOF. The first version of
    // the soak stopped both at once; that was its one "wrong transfer" in an hour.
    traffic.cancel();
    while workers.join_next().await.is_some() {}
    let mut samples = samples?;
    rig.wait_for_sessions(2, SETTLE).await?;
    let settled = settle(&rig).await;
    samples.push(rig.sample(started).await?);
    let report = Report {
        duration: args.duration,
        warmup: args
            .duration
            .mul_f64(f64::from(args.warmup_percent) / 100.0),
        workers: args.workers,
        samples: &samples,
        lives: &rig.lives,
        counts: &rig.counts,
        faults: rig.faults,
        settled,
    };
    println!("{}", report.markdown());
    let verdict = report.problems();
    rig.stop().await?;
    stop.cancel();
    while tasks.join_next().await.is_some() {}
    if verdict.is_empty() {
        Ok(())
    } else {
        bail!("soak failed:\n- {}", verdict.join("\n- "))
    }
}

/// The run: a sample every `sample_every`, a fault every `fault_every`, partitions healed
/// when due.
async fn inject_and_sample(
    rig: &mut Rig,
    args: &SoakArgs,
    started: Instant,
) -> Result<Vec<crate::soak_report::Sample>> {
    let restarts_until = args.duration.mul_f64(RESTARTS_UNTIL);
    let mut samples = Vec::new();
    let mut injected = 0u32;
    let mut next_fault = started + args.fault_every;
    while started.elapsed() < args.duration {
        samples.push(rig.sample(started).await?);
        let next_sample = Instant::now() + args.sample_every;
        while Instant::now() < next_sample && started.elapsed() < args.duration {
            rig.heal(false);
            if Instant::now() >= next_fault {
                let fault = nth(injected, started.elapsed() < restarts_until);
                injected += 1;
                next_fault += args.fault_every;
                rig.inject(fault, started).await?;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(samples)
}

/// Waits until the server's streams balance; `(opened, closed)` at the end.
async fn settle(rig: &Rig) -> (f64, f64) {
    let deadline = Instant::now() + SETTLE;
    loop {
        let text = match rig.server.process() {
            Ok(server) => http_get::get(server.admin, "/metrics")
                .await
                .unwrap_or_default(),
            Err(_) => String::new(),
        };
        let opened = http_get::sample(&text, "tether_streams_opened_total").unwrap_or(-1.0);
        let closed = closed_total(&text);
        if (opened == closed && opened >= 0.0) || Instant::now() > deadline {
            return (opened, closed);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn closed_total(text: &str) -> f64 {
    text.lines()
        .filter(|line| line.starts_with("tether_streams_closed_total{"))
        .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}
