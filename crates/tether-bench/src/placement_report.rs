//! The figures of `tether-bench placement-kill` and their markdown section: measured against
//! the placement the agents' own ranking predicts for the sample, and against the model of
//! the full fleet scaled down to the sample.

use std::fmt::Write as _;
use std::time::Duration;

use tokio::time::Instant;

use crate::kill_probe::{Counters, Probe};
use crate::{process_stats, report};

/// Probe dials in one phase of the run.
pub(crate) struct Phase {
    name: &'static str,
    /// What should succeed.
    expect: &'static str,
    ok: usize,
    total: usize,
    first_error: Option<String>,
}

impl Phase {
    /// The probes that started in `[from, to)` through a replica for which `through` holds.
    pub(crate) fn of(
        (name, expect): (&'static str, &'static str),
        probes: &[Probe],
        (from, to): (Option<Instant>, Option<Instant>),
        through: impl Fn(std::net::SocketAddr) -> bool,
    ) -> Phase {
        let inside: Vec<&Probe> = probes
            .iter()
            .filter(|p| from.is_none_or(|f| p.at >= f) && to.is_none_or(|t| p.at < t))
            .filter(|p| through(p.proxy))
            .collect();
        Phase {
            name,
            expect,
            ok: inside.iter().filter(|p| p.ok).count(),
            total: inside.len(),
            first_error: inside.iter().find_map(|p| p.error.clone()),
        }
    }
}

/// The same placement computed for the full fleet (`tether-bench placement`'s model).
pub(crate) struct Model {
    pub(crate) agents: usize,
    pub(crate) movers: u64,
    pub(crate) busiest: u64,
}

/// Everything one run measured.
pub(crate) struct Measured {
    pub(crate) replicas: usize,
    pub(crate) agents: usize,
    /// Concurrent probe dials.
    pub(crate) probers: usize,
    pub(crate) k: usize,
    pub(crate) placed_cold: Duration,
    pub(crate) predicted_before: Vec<u64>,
    /// Survivors only.
    pub(crate) predicted_after: Vec<u64>,
    pub(crate) predicted_movers: u64,
    /// The survivors' counters before the kill and once placed again.
    pub(crate) base: Vec<Counters>,
    pub(crate) end: Vec<Counters>,
    pub(crate) replaced_in: Duration,
    /// Peak new sessions per second: all survivors, the busiest one.
    pub(crate) peaks: (f64, f64),
    /// Before, during and after through the survivors; before through the killed replica.
    pub(crate) phases: [Phase; 4],
    pub(crate) model: Model,
    /// The load average at the start and the end.
    pub(crate) load: (String, String),
}

/// `/proc/loadavg`'s first three figures.
pub(crate) fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|t| t.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn min_max(values: impl Iterator<Item = u64> + Clone) -> String {
    let min = values.clone().min().unwrap_or(0);
    let max = values.max().unwrap_or(0);
    format!("{min}-{max}")
}

impl Measured {
    fn received(&self) -> impl Iterator<Item = u64> + Clone + '_ {
        self.end
            .iter()
            .zip(&self.base)
            .map(|(e, b)| e.added.saturating_sub(b.added))
    }

    fn predicted_received(&self) -> u64 {
        self.predicted_after
            .iter()
            .zip(&self.predicted_before[1..])
            .map(|(a, b)| a.saturating_sub(*b))
            .max()
            .unwrap_or(0)
    }

    /// The markdown section.
    pub(crate) fn markdown(&self, command: &str) -> String {
        let scale = self.agents as f64 / self.model.agents as f64;
        let (n, k, agents) = (self.replicas, self.k, self.agents);
        let mut out = format!(
            "## A replica dies, with real sessions (`tether-bench placement-kill`)\n\n\
             - Machine: {}; load average {} at the start, {} at the end\n\
             - Command: `{command}` ({}, {})\n\
             - {n} real servers with peering on 127.0.0.1..{n}; {agents} agents in the bench \
             process with `placement.replicas_per_agent: {k}` and every replica in `servers:`. \
             Once every agent is placed (each replica holding exactly the sessions the ranking \
             predicts) replica 1 gets SIGKILL. {} probe workers dial a random agent through a \
             random live replica's HTTP CONNECT frontend (relayed when that replica does not \
             hold the agent) and check a 64-byte echo; the dead replica leaves the probe set at \
             the kill. The survivors' `/metrics` are read every 100 ms.\n\n\
             | figure | measured | predicted for the sample | model {n} x {} scaled to the sample |\n\
             |---|---|---|---|\n",
            process_stats::machine(),
            self.load.0,
            self.load.1,
            report::git_describe(),
            report::today(),
            self.probers,
            report::format_thousands(self.model.agents as f64),
        );
        self.figure_rows(&mut out, scale);
        for phase in &self.phases {
            let _ = writeln!(
                out,
                "| dials {} | {} of {} ({:.2} %) | {} | {} |",
                phase.name,
                phase.ok,
                phase.total,
                100.0 * phase.ok as f64 / phase.total.max(1) as f64,
                phase.expect,
                phase.expect,
            );
        }
        for phase in &self.phases {
            if let Some(error) = &phase.first_error {
                let _ = writeln!(out, "\nFirst failed dial {}: `{error}`", phase.name);
            }
        }
        out
    }

    fn figure_rows(&self, out: &mut String, scale: f64) {
        let survivors_before = self.base.iter().map(|c| c.connected);
        let survivors_after = self.end.iter().map(|c| c.connected);
        let removed: u64 = self
            .end
            .iter()
            .zip(&self.base)
            .map(|(e, b)| e.removed.saturating_sub(b.removed))
            .sum();
        let received: u64 = self.received().sum();
        let busiest = self.received().max().unwrap_or(0);
        let rows = [
            (
                "time for every agent to be placed, from cold".to_owned(),
                format!("{:.1} s", self.placed_cold.as_secs_f64()),
                "-".to_owned(),
                "-".to_owned(),
            ),
            (
                "sessions per surviving replica before the kill (min-max)".to_owned(),
                min_max(survivors_before),
                min_max(self.predicted_before[1..].iter().copied()),
                "-".to_owned(),
            ),
            (
                "... once placed again (min-max)".to_owned(),
                min_max(survivors_after),
                min_max(self.predicted_after.iter().copied()),
                "-".to_owned(),
            ),
            (
                "agents that reconnected (new sessions on survivors)".to_owned(),
                received.to_string(),
                format!("{} (the dead replica's)", self.predicted_movers),
                format!("{:.0}", self.model.movers as f64 * scale),
            ),
            (
                "sessions the survivors lost".to_owned(),
                removed.to_string(),
                "0".to_owned(),
                "0".to_owned(),
            ),
            (
                "most new sessions at one survivor".to_owned(),
                busiest.to_string(),
                self.predicted_received().to_string(),
                format!("{:.1}", self.model.busiest as f64 * scale),
            ),
            (
                "time from the kill until every agent is placed again".to_owned(),
                format!("{:.2} s", self.replaced_in.as_secs_f64()),
                "-".to_owned(),
                "-".to_owned(),
            ),
            (
                "peak new sessions per second, all survivors (0.5 s windows)".to_owned(),
                format!("{:.0}", self.peaks.0),
                "-".to_owned(),
                format!(
                    "x {:.0} at full size: {:.0}",
                    1.0 / scale,
                    self.peaks.0 / scale
                ),
            ),
            (
                "... at the busiest survivor".to_owned(),
                format!("{:.0}", self.peaks.1),
                "-".to_owned(),
                format!("{:.0}", self.peaks.1 / scale),
            ),
        ];
        for (name, measured, predicted, model) in rows {
            let _ = writeln!(out, "| {name} | {measured} | {predicted} | {model} |");
        }
    }
}
