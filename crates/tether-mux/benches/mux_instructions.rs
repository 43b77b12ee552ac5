//! A fixed amount of work for instruction counting: 64 MiB through one stream and 64 MiB over
//! eight streams of an in-memory session pair, on a current-thread runtime (one thread, so the
//! count is stable). Run under `valgrind --tool=callgrind` (see docs/BENCHMARKS.md); it also
//! runs once, quickly, with `cargo test --benches`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use tether_mux::transport::framed;
use tether_mux::{MuxConfig, MuxMetrics, Role, Session};
use tether_proto::TargetAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MIB: u64 = 1024 * 1024;
/// Bytes the in-memory pipe buffers per direction (like a socket buffer).
const PIPE: usize = 256 * 1024;
/// Size of each application write and read.
const IO_CHUNK: usize = 64 * 1024;

/// Moves `total` bytes split over `streams` streams from server to agent.
async fn run(streams: u64, total: u64) {
    let config = MuxConfig::default();
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
    let per_stream = total / streams;
    let mut tasks = Vec::new();
    for _ in 0..streams {
        let (opened, accepted) = tokio::join!(server.open(target.clone()), async {
            agent_in.accept().await.expect("session alive").accept()
        });
        let (mut tx, mut rx) = (opened.unwrap(), accepted.unwrap());
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
    drop(handles);
    drop((server, agent, agent_in));
    let _ = sd.await;
    let _ = ad.await;
}

fn main() {
    let quick = !std::env::args().any(|a| a == "--bench");
    let total = if quick { 4 * MIB } else { 64 * MIB };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run(1, total));
    rt.block_on(run(8, total));
    println!("moved {} MiB on 1 stream and on 8 streams", total / MIB);
}
