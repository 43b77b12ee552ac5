//! The soak's samples and verdict: resource growth of the last server life against its own
//! warm-up baseline and of the stable agent against the run's, streams opened == closed, and
//! the byte checks of the traffic; printed as Markdown.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::process_stats::machine;
use crate::soak_faults::FaultCounts;
use crate::soak_traffic::Counts;

/// Growth allowed after the warm-up: fds and tasks by a count, RSS by a share plus a floor.
const FD_SLACK: f64 = 16.0;
const TASK_SLACK: f64 = 32.0;
const RSS_SHARE: f64 = 0.25;
const RSS_FLOOR_KIB: f64 = 16.0 * 1024.0;

/// One sample of the processes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sample {
    pub(crate) at: Duration,
    /// Which server life (from 1) was sampled.
    pub(crate) life: u32,
    pub(crate) server_rss_kib: f64,
    pub(crate) server_fds: f64,
    pub(crate) server_tasks: f64,
    pub(crate) streams_active: f64,
    pub(crate) agent_rss_kib: f64,
    pub(crate) agent_fds: f64,
}

pub(crate) struct Report<'a> {
    pub(crate) duration: Duration,
    pub(crate) warmup: Duration,
    pub(crate) workers: usize,
    pub(crate) samples: &'a [Sample],
    /// When each server life started (index 0 is life 1).
    pub(crate) lives: &'a [Duration],
    pub(crate) counts: &'a Counts,
    pub(crate) faults: FaultCounts,
    /// The last life's `(opened, closed)` streams once traffic stopped.
    pub(crate) settled: (f64, f64),
}

impl Report<'_> {
    /// The stable agent's baseline: the first sample at or after the warm-up.
    fn agent_baseline(&self) -> Sample {
        self.first_at(self.warmup, |_| true)
    }

    /// The last server life's baseline: its first sample at least the warm-up after it started.
    fn server_baseline(&self) -> Sample {
        let life = self.lives.len() as u32;
        let started = self.lives.last().copied().unwrap_or_default();
        self.first_at(started + self.warmup, |s| s.life == life)
    }

    fn first_at(&self, at: Duration, keep: impl Fn(&Sample) -> bool) -> Sample {
        let last = *self.samples.last().expect("at least the final sample");
        self.samples
            .iter()
            .find(|s| s.at >= at && keep(s))
            .copied()
            .unwrap_or(last)
    }

    /// Everything that is out of bounds.
    pub(crate) fn problems(&self) -> Vec<String> {
        let server = self.server_baseline();
        let agent = self.agent_baseline();
        let last = *self.samples.last().expect("the final sample");
        let mut out = Vec::new();
        let rss_bound = |b: f64| b + (b * RSS_SHARE).max(RSS_FLOOR_KIB);
        let mut check = |what: &str, now: f64, bound: f64| {
            if now > bound {
                out.push(format!("{what}: {now} at the end, bound {bound:.0}"));
            }
        };
        check(
            "server RSS KiB",
            last.server_rss_kib,
            rss_bound(server.server_rss_kib),
        );
        check(
            "agent RSS KiB",
            last.agent_rss_kib,
            rss_bound(agent.agent_rss_kib),
        );
        check("server fds", last.server_fds, server.server_fds + FD_SLACK);
        check("agent fds", last.agent_fds, agent.agent_fds + FD_SLACK);
        check(
            "server tasks",
            last.server_tasks,
            server.server_tasks + TASK_SLACK,
        );
        check("server streams active", last.streams_active, 0.0);
        let (opened, closed) = self.settled;
        if opened != closed {
            out.push(format!("streams opened {opened} != closed {closed}"));
        }
        out.extend(self.traffic_problems());
        out
    }

    fn traffic_problems(&self) -> Vec<String> {
        let c = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut out = Vec::new();
        let short = c(&self.counts.short);
        if short > 0 {
            out.push(format!(
                "{short} echoes ended with a clean EOF before their last byte"
            ));
        }
        let corrupt = c(&self.counts.corrupt);
        if corrupt > 0 {
            out.push(format!(
                "{corrupt} transfers came back different from what was sent"
            ));
        }
        if c(&self.counts.transfers_ok) == 0 {
            out.push("no transfer succeeded".into());
        }
        out
    }

    pub(crate) fn markdown(&self) -> String {
        let c = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let counts = self.counts;
        let mut md = String::new();
        let _ = writeln!(md, "machine: {}", machine());
        let _ = writeln!(
            md,
            "duration {:?}, {} workers, {} server lives; {}",
            self.duration,
            self.workers,
            self.lives.len(),
            self.faults
        );
        let _ = writeln!(
            md,
            "transfers ok {} ({:.1} MiB byte-exact), failed {} (of which {} clean EOFs across a server SIGKILL), wrong byte {}, short clean EOF {}, resets {}, empty {}; last server life: streams opened {} closed {}\n",
            c(&counts.transfers_ok),
            c(&counts.bytes) as f64 / f64::from(1 << 20),
            c(&counts.transfers_failed),
            c(&counts.cut_by_server_kill),
            c(&counts.corrupt),
            c(&counts.short),
            c(&counts.resets),
            c(&counts.empty),
            self.settled.0,
            self.settled.1,
        );
        self.table(&mut md);
        md
    }

    fn table(&self, md: &mut String) {
        md.push_str("| at | server life | server RSS MiB | server fds | server tasks | streams active | agent RSS MiB | agent fds |\n");
        md.push_str("|---|---|---|---|---|---|---|---|\n");
        let (server, agent) = (self.server_baseline().at, self.agent_baseline().at);
        // About 24 rows, always with the baselines, the first sample of each life and the end.
        let step = (self.samples.len() / 24).max(1);
        let last = self.samples.len() - 1;
        let mut life = 0;
        for (i, s) in self.samples.iter().enumerate() {
            let new_life = s.life != life;
            life = s.life;
            if i % step != 0 && i != last && s.at != server && s.at != agent && !new_life {
                continue;
            }
            let mark = match (s.at == server, s.at == agent) {
                (true, true) => " (baselines)",
                (true, false) => " (server baseline)",
                (false, true) => " (agent baseline)",
                (false, false) => "",
            };
            let _ = writeln!(
                md,
                "| {:.0} s{mark} | {} | {:.1} | {} | {} | {} | {:.1} | {} |",
                s.at.as_secs_f64(),
                s.life,
                s.server_rss_kib / 1024.0,
                s.server_fds,
                s.server_tasks,
                s.streams_active,
                s.agent_rss_kib / 1024.0,
                s.agent_fds
            );
        }
    }
}
