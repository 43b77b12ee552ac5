//! In-memory multiplexer throughput: one stream and eight streams over a duplex pipe, with the
//! default window and a 1 MiB window. Run with `cargo bench -p tether-mux`; prints MB/s.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use tokio::time::Instant;

use tether_mux::transport::framed;
use tether_mux::{MuxConfig, MuxMetrics, Role, Session};
use tether_proto::TargetAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MIB: u64 = 1024 * 1024;
/// Bytes the in-memory pipe buffers per direction (like a socket buffer).
const PIPE: usize = 256 * 1024;
/// Size of each application write and read.
const IO_CHUNK: usize = 64 * 1024;

struct Case {
    name: &'static str,
    streams: u64,
    total: u64,
    window: u32,
}

/// Moves `total` bytes (split evenly over `streams` streams) from server to agent; returns the
/// time from the first write to the last byte read.
async fn run(case: &Case) -> Duration {
    let config = MuxConfig {
        window: case.window,
        ..MuxConfig::default()
    };
    let (a, b) = tokio::io::duplex(PIPE);
    let (server, _server_in, sd) = Session::new(
        framed(a, config.limits()),
        Role::Server,
        config.clone(),
        MuxMetrics::unregistered(),
    );
    let (agent, mut agent_in, ad) = Session::new(
        framed(b, config.limits()),
        Role::Agent,
        config,
        MuxMetrics::unregistered(),
    );
    let sd = tokio::spawn(sd.run());
    let ad = tokio::spawn(ad.run());
    let target: TargetAddr = "127.0.0.1:9".parse().unwrap();
    let per_stream = case.total / case.streams;

    let mut pairs = Vec::new();
    for _ in 0..case.streams {
        let (opened, accepted) = tokio::join!(server.open(target.clone()), async {
            agent_in.accept().await.expect("session alive").accept()
        });
        pairs.push((opened.unwrap(), accepted.unwrap()));
    }
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (mut tx, mut rx) in pairs {
        tasks.push(tokio::spawn(async move {
            let chunk = vec![0xA5u8; IO_CHUNK];
            let mut left = per_stream;
            while left > 0 {
                let n = left.min(IO_CHUNK as u64) as usize;
                tx.write_all(&chunk[..n]).await.unwrap();
                left -= n as u64;
            }
            tx.shutdown().await.unwrap();
            tx
        }));
        tasks.push(tokio::spawn(async move {
            let mut buf = vec![0u8; IO_CHUNK];
            let mut got = 0u64;
            loop {
                let n = rx.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                got += n as u64;
            }
            assert_eq!(got, per_stream);
            rx
        }));
    }
    let mut handles = Vec::new();
    for task in tasks {
        handles.push(task.await.unwrap());
    }
    let elapsed = started.elapsed();
    drop(handles);
    drop((server, agent, agent_in));
    let _ = sd.await;
    let _ = ad.await;
    elapsed
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs this once, quickly.
    let quick = !std::env::args().any(|a| a == "--bench");
    let scale = if quick { 64 } else { 1 };
    let cases = [
        Case {
            name: "1 stream, window 256 KiB (default)",
            streams: 1,
            total: 1024 * MIB / scale,
            window: MuxConfig::default().window,
        },
        Case {
            name: "8 streams, window 256 KiB (default)",
            streams: 8,
            total: 1024 * MIB / scale,
            window: MuxConfig::default().window,
        },
        Case {
            name: "1 stream, window 1 MiB",
            streams: 1,
            total: 1024 * MIB / scale,
            window: 1024 * 1024,
        },
        Case {
            name: "8 streams, window 1 MiB",
            streams: 8,
            total: 1024 * MIB / scale,
            window: 1024 * 1024,
        },
    ];
    let runs = if quick { 1 } else { 5 };
    for flavor in ["multi_thread(2)", "current_thread"] {
        let rt = match flavor {
            "current_thread" => tokio::runtime::Builder::new_current_thread(),
            _ => {
                let mut b = tokio::runtime::Builder::new_multi_thread();
                b.worker_threads(2);
                b
            }
        }
        .enable_all()
        .build()
        .expect("runtime");
        for case in &cases {
            let mut best = Duration::MAX;
            for _ in 0..runs {
                best = best.min(rt.block_on(run(case)));
            }
            let mbps = case.total as f64 / best.as_secs_f64() / 1e6;
            println!(
                "{flavor:<16} {:<38} {:>5} MiB  best of {runs}: {:>8.1?}  {:>7.0} MB/s",
                case.name,
                case.total / MIB,
                best,
                mbps
            );
        }
    }
}
