//! Giving freed memory back after a burst: a runtime worker that goes idle flushes its
//! jemalloc thread cache, at most once per [`FLUSH_INTERVAL`], or once per [`MIN_FLUSH_GAP`]
//! when it has freed [`FLUSH_AFTER_FREED`] bytes since its last flush.
//!
//! jemalloc keeps recently freed small objects in a cache per thread. After a burst of
//! connections closes, those caches pin pages that the background purge cannot return (in the
//! benchmark, about a third of what was not given back 5 s after closing 1,000 connections).
//! Disabling a thread's cache flushes it; enabling it again restores the fast path. Doing this
//! when a worker parks costs nothing while the daemon is busy and empties the caches soon after
//! it goes quiet. The time limits keep a worker that parks between every message from flushing
//! each time (flushing at every park cost about 5 % of the CPU of a bulk transfer: refills,
//! and pages purged and faulted in again); the byte limit makes the park that ends a burst of
//! frees flush even when the previous flush was recent, since a parked worker may sleep for a
//! long time and whatever its cache holds stays pinned until it wakes.

use std::cell::Cell;
use std::time::Duration;

use tikv_jemalloc_ctl::thread::ThreadLocal;
use tokio::time::Instant;

/// Least time between two flushes on one thread that has freed little since its last one.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(250);

/// Least time between two flushes on one thread that has freed [`FLUSH_AFTER_FREED`].
pub const MIN_FLUSH_GAP: Duration = Duration::from_millis(10);

/// Bytes freed by a thread since its last flush that shorten the wait to [`MIN_FLUSH_GAP`].
pub const FLUSH_AFTER_FREED: u64 = 64 * 1024;

thread_local! {
    /// When this thread last flushed, and its freed-bytes counter then.
    static LAST_FLUSH: Cell<Option<(Instant, u64)>> = const { Cell::new(None) };
    /// jemalloc's counter of the bytes this thread freed (`None` if it cannot be read).
    static FREED: Option<ThreadLocal<u64>> = tikv_jemalloc_ctl::thread::deallocatedp::read().ok();
}

/// Bytes the calling thread has freed through jemalloc (0 when jemalloc is not the allocator).
pub fn freed_by_this_thread() -> u64 {
    FREED.with(|freed| freed.map_or(0, ThreadLocal::get))
}

/// Whether a thread that last flushed at `last` (time, freed counter) and has freed `freed`
/// bytes in all should flush at `now`.
fn flush_due(last: Option<(Instant, u64)>, now: Instant, freed: u64) -> bool {
    let Some((at, freed_then)) = last else {
        return true;
    };
    let since = now.saturating_duration_since(at);
    since >= FLUSH_INTERVAL
        || (since >= MIN_FLUSH_GAP && freed.saturating_sub(freed_then) >= FLUSH_AFTER_FREED)
}

/// For tokio's `on_thread_park`: flushes this thread's jemalloc cache when [`flush_due`].
/// Returns whether it flushed.
///
/// Without jemalloc as the allocator the flush only touches jemalloc's own (unused) state.
pub fn on_worker_park() -> bool {
    let now = Instant::now();
    let freed = freed_by_this_thread();
    let due = LAST_FLUSH.with(|last| {
        let due = flush_due(last.get(), now, freed);
        if due {
            last.set(Some((now, freed)));
        }
        due
    });
    if due {
        flush_thread_cache();
    }
    due
}

/// Flushes the calling thread's jemalloc cache (by disabling it, which flushes, then enabling
/// it again). Errors are ignored: a build without thread caches has nothing to flush.
pub fn flush_thread_cache() {
    use tikv_jemalloc_ctl::Access;
    use tikv_jemalloc_ctl::AsName;
    let name = b"thread.tcache.enabled\0".name();
    if name.write(false).is_ok() {
        let _ = name.write(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flushes_are_throttled_per_thread() {
        // A fresh thread: the first park flushes, an immediate second one does not.
        let flushed = std::thread::spawn(|| (on_worker_park(), on_worker_park()))
            .join()
            .unwrap();
        assert_eq!(flushed, (true, false));
    }

    #[test]
    fn a_burst_of_frees_shortens_the_wait_but_not_below_the_gap() {
        let at = Instant::now();
        let last = Some((at, 1_000_000));
        let after = |ms| at + Duration::from_millis(ms);
        let burst = 1_000_000 + FLUSH_AFTER_FREED;
        assert!(flush_due(None, at, 0), "a thread that never flushed");
        assert!(!flush_due(last, after(5), burst), "inside the gap");
        assert!(
            !flush_due(last, after(15), 1_000_000 + 1024),
            "little freed"
        );
        assert!(flush_due(last, after(15), burst));
        assert!(!flush_due(last, after(249), burst - 1));
        assert!(
            flush_due(last, after(250), 1_000_000),
            "the interval passed"
        );
    }

    #[test]
    fn the_thread_cache_is_enabled_again_after_a_flush() {
        use tikv_jemalloc_ctl::Access;
        use tikv_jemalloc_ctl::AsName;
        std::thread::spawn(|| {
            flush_thread_cache();
            let enabled: bool = b"thread.tcache.enabled\0".name().read().unwrap();
            assert!(enabled);
        })
        .join()
        .unwrap();
    }
}
