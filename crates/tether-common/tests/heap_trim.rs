//! `heap_trim` with jemalloc as this test's allocator, so that the bytes a thread frees are
//! counted: a park that ends a burst of frees flushes even right after another flush.
#![allow(clippy::unwrap_used)]

use tether_common::heap_trim::{FLUSH_AFTER_FREED, on_worker_park};

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[test]
fn a_park_after_a_burst_of_frees_flushes_at_once() {
    std::thread::spawn(|| {
        assert!(on_worker_park(), "the first park flushes");
        // A little freed since: throttled.
        drop(std::hint::black_box(vec![1u8; 1024]));
        assert!(!on_worker_park());
        // A burst freed since: flushed although the interval has not passed.
        let burst: Vec<Vec<u8>> = (0..2 * FLUSH_AFTER_FREED / 4096)
            .map(|_| std::hint::black_box(vec![1u8; 4096]))
            .collect();
        drop(burst);
        assert!(on_worker_park());
        assert!(!on_worker_park());
    })
    .join()
    .unwrap();
}
