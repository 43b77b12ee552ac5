//! No head-of-line blocking: a stream whose reader never reads holds at most one window of
//! memory and does not slow the other streams of the session. Alone in its binary so that the
//! timing is not disturbed by other tests.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use common::{Pair, bounded, wait_until};
use tether_mux::MuxConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Moves `len` bytes from the server to the agent on a new stream; returns the time taken.
async fn transfer(pair: &mut Pair, len: usize) -> Duration {
    let (mut s, mut a) = pair.open().await;
    let chunk = vec![0x5Au8; 256 * 1024];
    let started = Instant::now();
    let writer = async {
        let mut left = len;
        while left > 0 {
            let n = left.min(chunk.len());
            s.write_all(&chunk[..n]).await.unwrap();
            left -= n;
        }
        s.shutdown().await.unwrap();
    };
    let reader = async {
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = 0;
        loop {
            let n = a.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            total += n;
        }
        assert_eq!(total, len);
    };
    bounded("transfer", async { tokio::join!(writer, reader) }).await;
    let elapsed = started.elapsed();
    a.shutdown().await.unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).await.unwrap();
    elapsed
}

fn mb_per_s(len: usize, took: Duration) -> f64 {
    len as f64 / took.as_secs_f64() / 1e6
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_stream_neither_grows_memory_nor_slows_the_others() {
    let window = MuxConfig::default().window as u64;
    let mut pair = Pair::new();

    // Enough bytes that one solo transfer takes at least 100 ms.
    let mut len = 8 * 1024 * 1024;
    while transfer(&mut pair, len).await < Duration::from_millis(100) {
        len *= 2;
    }
    let mut solo = Duration::MAX;
    for _ in 0..3 {
        solo = solo.min(transfer(&mut pair, len).await);
    }

    // A stream whose far reader never reads: its writer blocks after exactly one window.
    let (mut stuck_writer, stuck_reader) = pair.open().await;
    let written = Arc::new(AtomicU64::new(0));
    let counter = written.clone();
    let blocked = tokio::spawn(async move {
        let chunk = vec![1u8; 10_000];
        loop {
            match stuck_writer.write(&chunk).await {
                Ok(n) => counter.fetch_add(n as u64, Ordering::SeqCst),
                Err(err) => return err,
            };
        }
    });
    wait_until("the stuck writer used its window", || {
        written.load(Ordering::SeqCst) >= window
    })
    .await;
    wait_until("the window is buffered at the reader", || {
        stuck_reader.debug_buffered() as u64 == window
    })
    .await;

    let mut stuck = Duration::MAX;
    for _ in 0..3 {
        stuck = stuck.min(transfer(&mut pair, len).await);
    }
    // Still exactly one window written and buffered, however long the other stream ran.
    assert_eq!(written.load(Ordering::SeqCst), window);
    assert_eq!(stuck_reader.debug_buffered() as u64, window);

    let (solo_rate, stuck_rate) = (mb_per_s(len, solo), mb_per_s(len, stuck));
    eprintln!(
        "{len} bytes: solo {solo:?} ({solo_rate:.0} MB/s), beside a stuck stream {stuck:?} \
         ({stuck_rate:.0} MB/s)"
    );
    assert!(
        stuck_rate >= solo_rate * 0.5,
        "throughput fell from {solo_rate:.0} to {stuck_rate:.0} MB/s beside a stuck stream"
    );

    // Dropping the stuck reader resets the stream; the blocked writer is woken with an error.
    drop(stuck_reader);
    let err = bounded("blocked writer", blocked).await.unwrap();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
    pair.finish().await;
}
