//! Scrape-time process metrics: the jemalloc heap (`tether_heap_*_bytes`), tokio's live task
//! count (`tether_runtime_alive_tasks`) and the standard `process_*` series.

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{IntGauge, Registry};
use tokio::runtime::Handle;

/// jemalloc's heap counters at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeapStats {
    /// Bytes in live allocations (`stats.allocated`).
    pub allocated: u64,
    /// Bytes in physically resident pages mapped by the allocator (`stats.resident`).
    pub resident: u64,
}

/// jemalloc's statistics could not be read.
#[derive(Debug, thiserror::Error)]
#[error("cannot read jemalloc statistics: {0}")]
pub struct HeapStatsError(tikv_jemalloc_ctl::Error);

/// Refreshes jemalloc's cached statistics (advances its epoch) and reads them.
///
/// The numbers describe jemalloc's heap. They describe the process's heap only when jemalloc is
/// the global allocator (the `tether` binary, and test binaries that set it); otherwise they
/// stay near zero.
pub fn heap_stats() -> Result<HeapStats, HeapStatsError> {
    tikv_jemalloc_ctl::epoch::advance().map_err(HeapStatsError)?;
    let allocated = tikv_jemalloc_ctl::stats::allocated::read().map_err(HeapStatsError)?;
    let resident = tikv_jemalloc_ctl::stats::resident::read().map_err(HeapStatsError)?;
    Ok(HeapStats {
        allocated: allocated as u64,
        resident: resident as u64,
    })
}

/// Registers [`RuntimeCollector`] for `runtime` and, on Linux, the `process_*` collector into
/// `registry`. Call once per registry (a second call fails with `AlreadyReg`).
pub fn register(registry: &Registry, runtime: Handle) -> prometheus::Result<()> {
    registry.register(Box::new(RuntimeCollector::new(runtime)?))?;
    #[cfg(target_os = "linux")]
    registry.register(Box::new(
        prometheus::process_collector::ProcessCollector::for_self(),
    ))?;
    Ok(())
}

/// Reads the heap and the runtime when scraped, not on a timer: the values are as fresh as the
/// scrape and cost nothing between scrapes.
#[derive(Debug)]
pub struct RuntimeCollector {
    runtime: Handle,
    heap_allocated: IntGauge,
    heap_resident: IntGauge,
    alive_tasks: IntGauge,
}

impl RuntimeCollector {
    /// A collector reporting the tasks of `runtime`.
    pub fn new(runtime: Handle) -> prometheus::Result<Self> {
        Ok(Self {
            runtime,
            heap_allocated: IntGauge::new(
                "tether_heap_allocated_bytes",
                "Bytes in live heap allocations (jemalloc stats.allocated).",
            )?,
            heap_resident: IntGauge::new(
                "tether_heap_resident_bytes",
                "Bytes in resident pages mapped by the allocator (jemalloc stats.resident).",
            )?,
            alive_tasks: IntGauge::new(
                "tether_runtime_alive_tasks",
                "Tasks alive in the tokio runtime (spawned and not yet finished).",
            )?,
        })
    }
}

impl Collector for RuntimeCollector {
    fn desc(&self) -> Vec<&Desc> {
        [&self.heap_allocated, &self.heap_resident, &self.alive_tasks]
            .into_iter()
            .flat_map(|gauge| gauge.desc())
            .collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let tasks = self.runtime.metrics().num_alive_tasks();
        self.alive_tasks
            .set(i64::try_from(tasks).unwrap_or(i64::MAX));
        let mut families = self.alive_tasks.collect();
        // Without heap numbers the heap series are left out rather than reported as zero, so
        // that a heap alert sees "absent", not "shrunk to nothing".
        match heap_stats() {
            Ok(heap) => {
                self.heap_allocated
                    .set(i64::try_from(heap.allocated).unwrap_or(i64::MAX));
                self.heap_resident
                    .set(i64::try_from(heap.resident).unwrap_or(i64::MAX));
                families.extend(self.heap_allocated.collect());
                families.extend(self.heap_resident.collect());
            }
            Err(err) => tracing::debug!(error = %err, "heap metrics unavailable"),
        }
        families
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn value(registry: &Registry, name: &str) -> Option<f64> {
        registry
            .gather()
            .iter()
            .find(|f| f.name() == name)
            .map(|f| f.get_metric()[0].get_gauge().get_value())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn alive_tasks_follow_the_runtime() {
        let registry = Registry::new();
        register(&registry, Handle::current()).unwrap();
        let before = value(&registry, "tether_runtime_alive_tasks").unwrap();
        let tasks: Vec<_> = (0..10)
            .map(|_| {
                let (tx, rx) = tokio::sync::oneshot::channel::<()>();
                (tokio::spawn(async move { rx.await.ok() }), tx)
            })
            .collect();
        let during = value(&registry, "tether_runtime_alive_tasks").unwrap();
        assert!(during >= before + 10.0, "before {before}, during {during}");
        for (handle, tx) in tasks {
            drop(tx);
            handle.await.unwrap();
        }
        // A joined task is released just after its output is handed over: poll, bounded.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let after = value(&registry, "tether_runtime_alive_tasks").unwrap();
            if after <= before {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "before {before}, after {after}"
            );
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn heap_and_process_series_are_exported() {
        let registry = Registry::new();
        register(&registry, Handle::current()).unwrap();
        let names: Vec<String> = registry
            .gather()
            .iter()
            .map(|f| f.name().to_owned())
            .collect();
        for name in [
            "tether_heap_allocated_bytes",
            "tether_heap_resident_bytes",
            "tether_runtime_alive_tasks",
            "process_open_fds",
            "process_resident_memory_bytes",
            "process_start_time_seconds",
        ] {
            assert!(names.iter().any(|n| n == name), "{name} missing: {names:?}");
        }
        // jemalloc is not this test binary's allocator, but its own bookkeeping is resident.
        let heap = heap_stats().unwrap();
        assert!(heap.resident > 0, "{heap:?}");
        assert!(register(&registry, Handle::current()).is_err());
    }
}
