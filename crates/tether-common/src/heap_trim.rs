//! Giving freed memory back after a burst: a runtime worker that goes idle flushes its
//! jemalloc thread cache, at most once per [`FLUSH_INTERVAL`] unless it has freed
//! [`FLUSH_AFTER_FREED`] bytes since its last flush.
//!
//! jemalloc keeps recently freed small objects in a cache per thread. After a burst of
//! connections closes, those caches pin pages that the background purge cannot return (in the
//! benchmark, about a third of what was not given back 5 s after closing 1,000 connections).
//! Disabling a thread's cache flushes it; enabling it again restores the fast path. Doing this
//! when a worker parks costs nothing while the daemon is busy and empties the caches soon after
//! it goes quiet. The time limit keeps a worker that parks between every small message from
//! flushing each time; the byte limit makes sure that the park ending a burst flushes even
//! when the previous flush was moments before (a parked worker may sleep for a long time, and
//! whatever its cache holds stays pinned until it wakes).

use std::cell::Cell;
use std::time::Duration;

use tikv_jemalloc_ctl::thread::ThreadLocal;
use tokio::time::Instant;

/// Least time between two flushes on one thread, unless it freed [`FLUSH_AFTER_FREED`].
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(250);

/// Bytes freed by a thread since its last flush that make its next park flush at once.
pub const FLUSH_AFTER_FREED: u64 = 64 * 1024;

thread_local! {
    /// When this thread last flushed, and its freed-bytes counter then.
    static LAST_FLUSH: Cell<Option<(Instant, u64)>> = const { Cell::new(None) };
    /// jemalloc's counter of the bytes this thread freed (`None` if it cannot be read).
    static FREED: Option<ThreadLocal<u64>> = tikv_jemalloc_ctl::thread::deallocatedp::read().ok();
}

/// For tokio's `on_thread_park`: flushes this thread's jemalloc cache unless it was flushed
/// less than [`FLUSH_INTERVAL`] ago and has freed less than [`FLUSH_AFTER_FREED`] bytes since.
/// Returns whether it flushed.
///
/// Without jemalloc as the allocator the flush only touches jemalloc's own (unused) state.
pub fn on_worker_park() -> bool {
    let now = Instant::now();
    let freed = FREED.with(|freed| freed.map_or(0, ThreadLocal::get));
    let due = LAST_FLUSH.with(|last| match last.get() {
        Some((at, freed_then))
            if now.duration_since(at) < FLUSH_INTERVAL
                && freed.saturating_sub(freed_then) < FLUSH_AFTER_FREED =>
        {
            false
        }
        _ => {
            last.set(Some((now, freed)));
            true
        }
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
