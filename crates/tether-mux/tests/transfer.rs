//! Data integrity: byte-exact transfers, many concurrent sequenced streams, half-close, FIN
//! after DATA, and RST propagation (RELIABILITY.md "What no data lost means").
#![allow(clippy::unwrap_used)]

mod common;

use std::io;

use common::{Pair, Pattern, bounded, read_pattern, read_until_error, wait_until, write_pattern};
use tether_mux::MuxConfig;
use tether_proto::ResetCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MIB: u64 = 1024 * 1024;

/// Sends `len` bytes each way at once on one stream and checks both directions byte for byte.
async fn exchange(pair: &mut Pair, len: u64, seed: u64) {
    let (server_side, agent_side) = pair.open().await;
    let (mut sr, mut sw) = tokio::io::split(server_side);
    let (mut ar, mut aw) = tokio::io::split(agent_side);
    let down = Pattern::new(seed);
    let up = Pattern::new(seed ^ 0xFFFF);
    let (w1, r1, w2, r2) = bounded("exchange", async {
        tokio::join!(
            write_pattern(&mut sw, &down, len),
            read_pattern(&mut ar, &down),
            write_pattern(&mut aw, &up, len),
            read_pattern(&mut sr, &up),
        )
    })
    .await;
    w1.unwrap();
    w2.unwrap();
    assert_eq!(r1.unwrap(), len, "server to agent, {len} bytes");
    assert_eq!(r2.unwrap(), len, "agent to server, {len} bytes");
}

#[tokio::test]
async fn byte_exact_transfer_of_edge_sizes_both_ways() {
    let mut pair = Pair::new();
    for (i, len) in [0, 1, 65_535, 65_536, 65_537, MIB].into_iter().enumerate() {
        exchange(&mut pair, len, i as u64).await;
    }
    let stats = pair.server.stats();
    let expected = 65_535 + 65_536 + 65_537 + MIB + 1;
    assert_eq!(stats.bytes_tx, expected);
    assert_eq!(stats.bytes_rx, expected);
    pair.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn byte_exact_transfer_of_64_mib_both_ways() {
    let mut pair = Pair::new();
    let started = tokio::time::Instant::now();
    exchange(&mut pair, 64 * MIB, 7).await;
    eprintln!("64 MiB each way in {:?}", started.elapsed());
    pair.finish().await;
}

#[tokio::test]
async fn two_hundred_concurrent_streams_deliver_sequenced_chunks_in_order() {
    const STREAMS: u32 = 200;
    const CHUNKS: u32 = 40;
    let config = MuxConfig {
        accept_backlog: 256,
        ..MuxConfig::default()
    };
    let mut pair = Pair::with_config(config);
    let server = pair.server.clone();
    let agent_in = &mut pair.agent_in;
    // The agent echoes every stream back, checking the sequence on the way.
    let echo = async move {
        let mut tasks = Vec::new();
        for _ in 0..STREAMS {
            let pending = agent_in.accept().await.unwrap();
            let mut stream = pending.accept().unwrap();
            tasks.push(tokio::spawn(async move {
                let mut header = [0u8; 8];
                let mut index = None;
                for seq in 0..CHUNKS {
                    stream.read_exact(&mut header).await.unwrap();
                    let idx = u32::from_be_bytes(header[..4].try_into().unwrap());
                    let got = u32::from_be_bytes(header[4..].try_into().unwrap());
                    assert_eq!(got, seq, "stream {idx}: chunk out of order");
                    assert_eq!(*index.get_or_insert(idx), idx);
                    let mut body = vec![0u8; chunk_len(idx, seq) - 8];
                    stream.read_exact(&mut body).await.unwrap();
                    assert!(body.iter().all(|b| *b == (idx as u8) ^ (seq as u8)));
                    stream.write_all(&header).await.unwrap();
                    stream.write_all(&body).await.unwrap();
                }
                let mut rest = Vec::new();
                stream.read_to_end(&mut rest).await.unwrap();
                assert!(rest.is_empty());
                stream.shutdown().await.unwrap();
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
    };
    let clients = async move {
        let mut clients = Vec::new();
        for idx in 0..STREAMS {
            let session = server.clone();
            clients.push(tokio::spawn(async move {
                let stream = session.open(common::target()).await.unwrap();
                let (mut r, mut w) = tokio::io::split(stream);
                let writer = async {
                    for seq in 0..CHUNKS {
                        let mut chunk = vec![(idx as u8) ^ (seq as u8); chunk_len(idx, seq)];
                        chunk[..4].copy_from_slice(&idx.to_be_bytes());
                        chunk[4..8].copy_from_slice(&seq.to_be_bytes());
                        w.write_all(&chunk).await.unwrap();
                    }
                    w.shutdown().await.unwrap();
                };
                let reader = async {
                    for seq in 0..CHUNKS {
                        let mut chunk = vec![0u8; chunk_len(idx, seq)];
                        r.read_exact(&mut chunk).await.unwrap();
                        assert_eq!(u32::from_be_bytes(chunk[..4].try_into().unwrap()), idx);
                        assert_eq!(u32::from_be_bytes(chunk[4..8].try_into().unwrap()), seq);
                        assert!(chunk[8..].iter().all(|b| *b == (idx as u8) ^ (seq as u8)));
                    }
                    let mut rest = Vec::new();
                    r.read_to_end(&mut rest).await.unwrap();
                    assert!(rest.is_empty(), "EOF only after the last chunk");
                };
                tokio::join!(writer, reader);
            }));
        }
        for client in clients {
            client.await.unwrap();
        }
    };
    bounded("200 streams", async { tokio::join!(echo, clients) }).await;
    assert_eq!(pair.server_metrics.opened.get(), u64::from(STREAMS));
    assert_eq!(
        pair.server_metrics
            .closed_count(tether_mux::CloseReason::Fin),
        u64::from(STREAMS)
    );
    pair.finish().await;
}

/// Varying chunk sizes so that chunks straddle DATA frames in different places.
fn chunk_len(idx: u32, seq: u32) -> usize {
    8 + ((idx as usize * 131 + seq as usize * 977) % 5000)
}

#[tokio::test]
async fn half_close_keeps_the_other_direction_open() {
    let mut pair = Pair::new();
    // The opener half-closes first.
    let (mut s, mut a) = pair.open().await;
    s.write_all(b"request").await.unwrap();
    s.shutdown().await.unwrap();
    let err = s.write_all(b"more").await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
    let mut got = Vec::new();
    a.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"request");
    // The far side still writes after seeing EOF, in several pieces.
    let reply = Pattern::new(3);
    let (w, r) = tokio::join!(
        write_pattern(&mut a, &reply, 300_000),
        read_pattern(&mut s, &reply)
    );
    w.unwrap();
    assert_eq!(r.unwrap(), 300_000);
    drop((s, a));

    // The acceptor half-closes first while the opener keeps writing.
    let (mut s, mut a) = pair.open().await;
    a.shutdown().await.unwrap();
    let mut none = Vec::new();
    s.read_to_end(&mut none).await.unwrap();
    assert!(none.is_empty());
    let data = Pattern::new(4);
    let (w, r) = tokio::join!(
        write_pattern(&mut s, &data, 500_000),
        read_pattern(&mut a, &data)
    );
    w.unwrap();
    assert_eq!(r.unwrap(), 500_000);
    // Both directions finished: dropping now is a clean close, not a reset.
    drop((s, a));
    wait_until("streams removed", || {
        pair.server.stats().streams == 0 && pair.agent.stats().streams == 0
    })
    .await;
    assert_eq!(
        pair.server_metrics
            .closed_count(tether_mux::CloseReason::Fin),
        2
    );
    assert_eq!(
        pair.agent_metrics
            .closed_count(tether_mux::CloseReason::Fin),
        2
    );
    pair.finish().await;
}

#[tokio::test]
async fn fin_is_ordered_after_a_queued_backlog_of_data() {
    // A window and a write queue large enough that the whole transfer and its FIN are queued
    // before the peer reads a single byte.
    const LEN: u64 = 8 * MIB;
    let config = MuxConfig {
        window: 16 * 1024 * 1024,
        write_queue: 256,
        ..MuxConfig::default()
    };
    let mut pair = Pair::with_pipe(config.clone(), config, 16 * 1024);
    let (mut s, mut a) = pair.open().await;
    let pattern = Pattern::new(11);
    bounded(
        "writes and FIN queued",
        write_pattern(&mut s, &pattern, LEN),
    )
    .await
    .unwrap();
    let read = bounded("read all", read_pattern(&mut a, &pattern))
        .await
        .unwrap();
    assert_eq!(read, LEN);
    drop((s, a));
    pair.finish().await;
}

#[tokio::test]
async fn reset_surfaces_as_connection_reset_never_eof() {
    let mut pair = Pair::new();
    let (mut s, a) = pair.open().await;
    s.write_all(b"some bytes").await.unwrap();
    // A reader already waiting when the reset arrives is woken with the error.
    let reader = tokio::spawn(async move {
        let mut a = a;
        let (err, _) = read_until_error(&mut a).await;
        (err, a)
    });
    s.reset(ResetCode::TargetReset, "target went away");
    let (err, mut a) = bounded("reader", reader).await.unwrap();
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    assert!(err.to_string().contains("target_reset"), "{err}");
    let err = a.write_all(b"x").await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    // The side that reset sees its own reset too.
    let err = s.read(&mut [0u8; 8]).await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    drop((s, a));
    pair.finish().await;
}

#[tokio::test]
async fn reset_by_the_acceptor_reaches_the_opener() {
    let mut pair = Pair::new();
    let (mut s, mut a) = pair.open().await;
    a.reset(ResetCode::Internal, "nope");
    let (err, _) = read_until_error(&mut s).await;
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    drop((s, a));
    pair.finish().await;
}

#[tokio::test]
async fn dropping_an_unfinished_handle_resets_the_peer() {
    let mut pair = Pair::new();
    // Dropped mid-stream.
    let (mut s, mut a) = pair.open().await;
    s.write_all(&[1u8; 1000]).await.unwrap();
    drop(s);
    let (err, _) = read_until_error(&mut a).await;
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    drop(a);
    // Dropped after its own FIN but before the peer's: still a reset (after the data and FIN,
    // so the peer may see EOF first), and the peer's writes then fail.
    let (mut s, mut a) = pair.open().await;
    s.write_all(b"hello").await.unwrap();
    s.shutdown().await.unwrap();
    drop(s);
    let err = bounded("writes fail", async {
        loop {
            if let Err(err) = a.write_all(b"reply").await {
                return err;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    let err = a.read(&mut [0u8; 16]).await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    drop(a);
    pair.finish().await;
}

#[tokio::test]
async fn dropping_a_handle_with_queued_data_resets_after_the_data() {
    // The writes sit in the session's queue when the handle is dropped: the RST must go out
    // after them (and the stream's slot must still be released once they are written).
    let config = MuxConfig {
        window: 4 * 1024 * 1024,
        write_queue: 128,
        ..MuxConfig::default()
    };
    let mut pair = Pair::with_pipe(config.clone(), config, 8 * 1024);
    let (mut s, mut a) = pair.open().await;
    let pattern = Pattern::new(5);
    let mut buf = vec![0u8; 2 * 1024 * 1024];
    pattern.fill(0, &mut buf);
    s.write_all(&buf).await.unwrap();
    drop(s);
    let (err, _) = read_until_error(&mut a).await;
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    drop(a);
    wait_until("server slot released", || pair.server.stats().streams == 0).await;
    pair.finish().await;
}

/// Over a 512-byte pipe almost every inline write finds the transport full and hands over to
/// the writer task, while other handles keep queueing from both worker threads: every byte
/// must still arrive, in order, both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_transport_hands_writes_over_without_losing_any() {
    const STREAMS: u64 = 16;
    const LEN: u64 = 256 * 1024;
    let mut pair = Pair::with_pipe(MuxConfig::default(), MuxConfig::default(), 512);
    let mut transfers = Vec::new();
    for i in 0..STREAMS {
        let (server_side, agent_side) = pair.open().await;
        transfers.push(tokio::spawn(async move {
            let (mut sr, mut sw) = tokio::io::split(server_side);
            let (mut ar, mut aw) = tokio::io::split(agent_side);
            let down = Pattern::new(100 + i);
            let up = Pattern::new(200 + i);
            let (w1, r1, w2, r2) = tokio::join!(
                write_pattern(&mut sw, &down, LEN),
                read_pattern(&mut ar, &down),
                write_pattern(&mut aw, &up, LEN),
                read_pattern(&mut sr, &up),
            );
            w1.unwrap();
            w2.unwrap();
            (r1.unwrap(), r2.unwrap())
        }));
    }
    for transfer in transfers {
        let (down, up) = bounded("transfer", transfer).await.unwrap();
        assert_eq!((down, up), (LEN, LEN));
    }
    pair.finish().await;
}
