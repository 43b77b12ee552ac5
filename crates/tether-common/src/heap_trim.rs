//! Giving freed memory back after a burst: a runtime worker that goes idle flushes its
//! jemalloc thread cache, at most once per [`FLUSH_INTERVAL`].
//!
//! jemalloc keeps recently freed small objects in a cache per thread. After a burst of
//! connections closes, those caches pin pages that the background purge cannot return (in the
//! benchmark, about a third of what was not given back 5 s after closing 1,000 connections).
//! Disabling a thread's cache flushes it; enabling it again restores the fast path. Doing this
//! when a worker parks, throttled, costs nothing while the daemon is busy and empties the
//! caches soon after it goes quiet.

use std::cell::Cell;
use std::time::Duration;

use tokio::time::Instant;

/// Least time between two flushes on one thread.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(250);

thread_local! {
    static LAST_FLUSH: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// For tokio's `on_thread_park`: flushes this thread's jemalloc cache unless it was flushed
/// less than [`FLUSH_INTERVAL`] ago. Returns whether it flushed.
///
/// Without jemalloc as the allocator the flush only touches jemalloc's own (unused) state.
pub fn on_worker_park() -> bool {
    let now = Instant::now();
    let due = LAST_FLUSH.with(|last| match last.get() {
        Some(at) if now.duration_since(at) < FLUSH_INTERVAL => false,
        _ => {
            last.set(Some(now));
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
