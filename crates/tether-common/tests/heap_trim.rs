//! `heap_trim` with jemalloc as this test's allocator, so that the bytes a thread frees are
//! counted (the counter behind the flush after a burst of frees).
#![allow(clippy::unwrap_used)]

use tether_common::heap_trim::{FLUSH_AFTER_FREED, freed_by_this_thread};

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[test]
fn a_burst_of_frees_is_counted_for_the_thread_that_freed_it() {
    let before = freed_by_this_thread();
    let burst: Vec<Vec<u8>> = (0..2 * FLUSH_AFTER_FREED / 4096)
        .map(|_| std::hint::black_box(vec![1u8; 4096]))
        .collect();
    // Another thread's frees are not this thread's.
    std::thread::spawn(|| drop(std::hint::black_box(vec![1u8; 1 << 20])))
        .join()
        .unwrap();
    let other = freed_by_this_thread() - before;
    assert!(
        other < 4096,
        "{other} bytes counted before the burst was freed"
    );
    drop(burst);
    let freed = freed_by_this_thread() - before;
    assert!(freed >= 2 * FLUSH_AFTER_FREED, "{freed} bytes counted");
}
