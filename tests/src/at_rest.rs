//! Leak checks: what the process holds at rest (live tasks, jemalloc heap, open fds) and a wait
//! until, after traffic, every stream counter balances and those resources are back at baseline.

use std::time::Duration;

use tether_common::runtime_metrics::heap_stats;

use tether_testkit::metrics::metric_or_zero;

/// How long the process may take to come back to rest after a burst of traffic.
pub const SETTLE: Duration = Duration::from_secs(45);
/// Live tasks may differ from the baseline by this much (timers, the harness's own tasks).
pub const TASK_SLACK: usize = 5;
/// The heap may exceed its baseline by this much (allocator caches, grown tables).
pub const HEAP_SLACK: u64 = 4 << 20;

/// What the process holds at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resources {
    /// Tasks alive in the current tokio runtime.
    pub tasks: usize,
    /// jemalloc `stats.allocated` (meaningful when jemalloc is the global allocator).
    pub heap_allocated: u64,
    /// Entries of `/proc/self/fd`.
    pub fds: usize,
}

impl Resources {
    /// Measures now. Must run inside a tokio runtime.
    pub fn now() -> Resources {
        Resources {
            tasks: tokio::runtime::Handle::current()
                .metrics()
                .num_alive_tasks(),
            heap_allocated: heap_stats().map_or(0, |h| h.allocated),
            fds: open_fds(),
        }
    }
}

/// Open file descriptors of this process.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |dir| dir.count())
}

/// Why one daemon's stream counters do not balance, if they do not.
pub fn stream_imbalance(name: &str, registry: &prometheus::Registry) -> Option<String> {
    let opened = metric_or_zero(registry, "tether_streams_opened_total", &[]);
    let closed = tether_testkit::metrics::metric_sum(registry, "tether_streams_closed_total", &[]);
    let active = metric_or_zero(registry, "tether_streams_active", &[]);
    (opened != closed || active != 0.0)
        .then(|| format!("{name}: opened {opened}, closed {closed}, active {active}"))
}

/// Waits (up to [`SETTLE`]) until every daemon's streams balance (opened == closed, none
/// active), live tasks are within [`TASK_SLACK`] of `baseline`, open fds are at most the
/// baseline and the heap is within [`HEAP_SLACK`] above it; returns what it measured then.
/// Panics with every unmet condition otherwise.
pub async fn wait_at_rest(
    what: &str,
    daemons: &[(&str, &prometheus::Registry)],
    baseline: Resources,
) -> Resources {
    let deadline = tokio::time::Instant::now() + SETTLE;
    loop {
        let now = Resources::now();
        let mut unmet: Vec<String> = daemons
            .iter()
            .filter_map(|(name, registry)| stream_imbalance(name, registry))
            .collect();
        if now.tasks.abs_diff(baseline.tasks) > TASK_SLACK {
            unmet.push(format!(
                "alive tasks {} vs baseline {} (±{TASK_SLACK})",
                now.tasks, baseline.tasks
            ));
        }
        if now.fds > baseline.fds {
            unmet.push(format!("open fds {} vs baseline {}", now.fds, baseline.fds));
        }
        if now.heap_allocated > baseline.heap_allocated + HEAP_SLACK {
            unmet.push(format!(
                "heap allocated {} vs baseline {} (+{HEAP_SLACK})",
                now.heap_allocated, baseline.heap_allocated
            ));
        }
        if unmet.is_empty() {
            return now;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not back at rest after {SETTLE:?}: {}",
            unmet.join("; ")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
