//! Property test of credit accounting: whatever the write and read sizes, a sender never sends
//! beyond its credit (the receiver would reset the stream), the receiver never buffers more than
//! the window it granted (which may grow up to `max_window`), and every byte arrives in order.
#![allow(clippy::unwrap_used)]

mod common;

use common::{Pair, Pattern, bounded, read_pattern};
use proptest::prelude::*;
use tether_mux::MuxConfig;
use tokio::io::AsyncWriteExt;

async fn run_case(window: u32, max_data: u32, writes: Vec<usize>, reads: Vec<(usize, u8)>) {
    // Windows may grow (the in-memory pipe has a tiny round trip): up to four times.
    let max_window = window.saturating_mul(4);
    let config = MuxConfig {
        window,
        max_data,
        max_window,
        ..MuxConfig::default()
    };
    let mut pair = Pair::with_config(config);
    let (mut s, mut a) = pair.open().await;
    let pattern = Pattern::new(window as u64);
    let total: usize = writes.iter().sum();
    let writer = async {
        let mut off = 0u64;
        for len in &writes {
            let mut buf = vec![0u8; *len];
            pattern.fill(off, &mut buf);
            s.write_all(&buf).await.unwrap();
            off += *len as u64;
        }
        s.shutdown().await.unwrap();
    };
    let reader = async {
        let mut got = Vec::with_capacity(total);
        let mut step = 0;
        loop {
            let (size, pause) = reads[step % reads.len()];
            step += 1;
            // Let the writer get ahead so that the buffer fills up to the window.
            for _ in 0..pause {
                tokio::task::yield_now().await;
            }
            let buffered = a.debug_buffered();
            assert!(
                buffered <= max_window as usize,
                "{buffered} bytes buffered, window {window} growing to {max_window}"
            );
            let mut buf = vec![0u8; size];
            let n = tokio::io::AsyncReadExt::read(&mut a, &mut buf)
                .await
                .unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        got
    };
    let ((), got) = bounded("case", async { tokio::join!(writer, reader) }).await;
    assert_eq!(got.len(), total);
    let mut expect = vec![0u8; total];
    pattern.fill(0, &mut expect);
    assert!(got == expect, "bytes differ");
    // Nothing was ever over the window on either side.
    for metrics in [&pair.server_metrics, &pair.agent_metrics] {
        assert_eq!(
            metrics
                .protocol_errors
                .with_label_values(&["flow_control"])
                .get(),
            0
        );
    }
    // The reverse direction with the same sizes, read by the helper.
    let reverse = async {
        let mut off = 0u64;
        for len in &writes {
            let mut buf = vec![0u8; *len];
            pattern.fill(off, &mut buf);
            a.write_all(&buf).await.unwrap();
            off += *len as u64;
        }
        a.shutdown().await.unwrap();
    };
    let ((), read) = bounded("reverse", async {
        tokio::join!(reverse, read_pattern(&mut s, &pattern))
    })
    .await;
    assert_eq!(read.unwrap(), total as u64);
    drop((s, a));
    pair.finish().await;
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn credit_is_never_exceeded_and_buffers_stay_within_the_window(
        (window, max_data, writes) in (
            prop_oneof![Just(1u32), 2u32..64, 64u32..4096, 4096u32..300_000],
            prop_oneof![Just(1u32), 1u32..1024, 1024u32..=65_536],
        )
            .prop_flat_map(|(window, max_data)| {
                // Each window costs a WINDOW round trip and each max_data a frame: keep a case
                // to a few dozen of each so that tiny windows and frames stay quick.
                let most = (window as usize * 4)
                    .min(max_data as usize * 64)
                    .clamp(16, 200_000);
                (Just(window), Just(max_data), prop::collection::vec(0usize..most, 1..12))
            }),
        mut reads in prop::collection::vec((prop_oneof![1usize..16, 16usize..70_000], 0u8..20), 1..8),
    ) {
        // One large read in every cycle bounds the number of reads.
        reads.push((64 * 1024, 0));
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(run_case(window, max_data, writes, reads));
    }
}
