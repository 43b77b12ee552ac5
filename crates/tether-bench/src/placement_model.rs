//! `tether-bench placement`: the k-of-N placement of a large fleet computed with the same
//! function agents use (no processes): sessions per replica, the reconnect load when one
//! replica dies and the moves when one joins, against every agent on every replica.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use tokio::time::Instant;

use anyhow::{Result, bail};
use clap::Args;
use tether_common::placement;

use crate::report;

/// The section of `tether-bench placement` in docs/BENCHMARKS.md.
const PLACEMENT_MARKER: &str = "placement";

/// `tether-bench placement`.
#[derive(Debug, Args)]
pub(crate) struct PlacementArgs {
    /// Server replicas in the model.
    #[arg(long, default_value_t = 20)]
    replicas: usize,
    /// Agents in the model.
    #[arg(long, default_value_t = 20_000)]
    agents: usize,
    /// Sessions per agent (`placement.replicas_per_agent`).
    #[arg(long, default_value_t = 2)]
    k: usize,
    /// Where to write the markdown section (between its markers). Default: print only.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Session counts of one placement.
struct Load {
    per_replica: Vec<usize>,
}

impl Load {
    fn of(placed: &HashMap<usize, Vec<usize>>, replicas: usize) -> Load {
        let mut per_replica = vec![0; replicas];
        for top in placed.values() {
            for r in top {
                per_replica[*r] += 1;
            }
        }
        Load { per_replica }
    }

    fn mean(&self) -> f64 {
        self.per_replica.iter().sum::<usize>() as f64 / self.per_replica.len().max(1) as f64
    }

    fn min(&self) -> usize {
        self.per_replica.iter().copied().min().unwrap_or(0)
    }

    fn max(&self) -> usize {
        self.per_replica.iter().copied().max().unwrap_or(0)
    }
}

/// Each agent's replicas (indices into `members`), by the agents' own rule.
fn place(agents: &[String], members: &[String], k: usize) -> HashMap<usize, Vec<usize>> {
    agents
        .iter()
        .enumerate()
        .map(|(a, agent)| {
            let top = placement::top_k(agent, members, k)
                .into_iter()
                .map(|m| members.iter().position(|x| x == m).unwrap_or(0))
                .collect();
            (a, top)
        })
        .collect()
}

/// Runs the model and prints (and optionally writes) its section.
pub(crate) fn run(args: PlacementArgs) -> Result<()> {
    if args.replicas < 2 || args.k == 0 || args.k >= args.replicas || args.agents == 0 {
        bail!("--replicas must be at least 2, --k in 1..replicas, --agents at least 1");
    }
    let members: Vec<String> = (0..args.replicas)
        .map(|i| format!("10.0.{}.{}", i / 250, i % 250 + 1))
        .collect();
    let agents: Vec<String> = (0..args.agents).map(|i| format!("agent-{i}")).collect();
    let started = Instant::now();
    let placed = place(&agents, &members, args.k);
    let rank_ns = started.elapsed().as_nanos() as f64 / args.agents as f64;
    let load = Load::of(&placed, args.replicas);

    // One replica dies: its agents reconnect to their next replica in rank order.
    let survivors: Vec<String> = members[1..].to_vec();
    let after_death = place(&agents, &survivors, args.k);
    let mut received = vec![0usize; args.replicas];
    let mut reconnects = 0;
    for (a, before) in &placed {
        for r in &after_death[a] {
            let r = r + 1; // index in `members`
            if !before.contains(&r) {
                received[r] += 1;
                reconnects += 1;
            }
        }
    }
    let busiest = received.iter().copied().max().unwrap_or(0);

    // One replica joins.
    let mut grown = members.clone();
    grown.push("10.0.99.1".to_owned());
    let after_join = place(&agents, &grown, args.k);
    let joined = after_join
        .values()
        .filter(|top| top.contains(&args.replicas))
        .count();
    let moved_elsewhere = placed
        .iter()
        .filter(|(a, before)| {
            after_join[a]
                .iter()
                .any(|r| *r != args.replicas && !before.contains(r))
        })
        .count();

    let figures = Figures {
        load,
        reconnects,
        busiest,
        joined,
        moved_elsewhere,
        rank_ns,
    };
    let section = figures.section(&args);
    print!("{section}");
    report::write_section(args.out, PLACEMENT_MARKER, &section)
}

/// What the model found.
struct Figures {
    load: Load,
    reconnects: usize,
    busiest: usize,
    joined: usize,
    moved_elsewhere: usize,
    rank_ns: f64,
}

impl Figures {
    /// The markdown section.
    fn section(&self, args: &PlacementArgs) -> String {
        let dead = 0;
        let mut section = String::new();
        let n = args.replicas;
        let _ = writeln!(
            section,
            "Placement model: {} agents, {n} replicas, k = {} (`tether-bench placement --replicas {n} \
             --agents {} --k {}`; the agents' own ranking function, no processes).\n",
            report::format_thousands(args.agents as f64),
            args.k,
            args.agents,
            args.k
        );
        let _ = writeln!(
            section,
            "| figure | k of N | every agent on every replica |"
        );
        let _ = writeln!(section, "|---|---|---|");
        let _ = writeln!(
            section,
            "| sessions per replica: mean (min-max) | {:.0} ({}-{}) | {} |",
            self.load.mean(),
            self.load.min(),
            self.load.max(),
            args.agents
        );
        let _ = writeln!(
            section,
            "| busiest replica over the mean | {:.3} | 1 |",
            self.load.max() as f64 / self.load.mean()
        );
        let _ = writeln!(
            section,
            "| replica {dead} dies: sessions to re-establish | {} ({:.1} % of all) | 0 (the others already hold every agent) |",
            report::format_thousands(self.reconnects as f64),
            100.0 * self.reconnects as f64 / (args.agents * args.k) as f64
        );
        let _ = writeln!(
            section,
            "| ... most received by one survivor | {} (mean {:.0}) | 0 |",
            self.busiest,
            self.reconnects as f64 / (n - 1) as f64
        );
        let _ = writeln!(
            section,
            "| a replica joins: sessions it takes | {} (expected k/(N+1): {:.0}) | {} |",
            report::format_thousands(self.joined as f64),
            (args.agents * args.k) as f64 / (n + 1) as f64,
            report::format_thousands(args.agents as f64)
        );
        let _ = writeln!(
            section,
            "| a replica joins: agents moving between old replicas | {} | 0 |",
            self.moved_elsewhere
        );
        let _ = writeln!(
            section,
            "| ranking cost per agent (N = {n}) | {:.1} us | - |",
            self.rank_ns / 1000.0
        );
        section
    }
}
