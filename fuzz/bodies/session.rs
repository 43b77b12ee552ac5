//! The body of fuzz target `fuzz_session` (see fuzz/README.md), shared by path with the stable
//! test `crates/tether-mux/tests/fuzz_session_body.rs`.

use std::time::Duration;

use tether_mux::transport::framed;
use tether_mux::{Incoming, MuxConfig, MuxMetrics, Role, Session};
use tether_proto::TargetAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::task::JoinSet;

/// Virtual time the session gets to end after the peer's input ended.
const END_WITHIN: Duration = Duration::from_secs(120);

fn config(selector: u8) -> MuxConfig {
    if selector & 2 == 0 {
        return MuxConfig::default();
    }
    // Tiny settings, so that limits and credit are reached by short inputs.
    MuxConfig {
        window: 64,
        max_data: 16,
        max_streams: 4,
        accept_backlog: 2,
        write_queue: 2,
        max_control_queue: 8,
        ..MuxConfig::default()
    }
}

/// Accepts the peer's streams: reads a little, answers, drops.
async fn serve(mut incoming: Incoming, tasks: &mut JoinSet<()>) {
    while let Some(pending) = incoming.accept().await {
        let Ok(mut stream) = pending.accept() else {
            continue;
        };
        tasks.spawn(async move {
            let mut buf = [0u8; 64];
            let _ = stream.read(&mut buf).await;
            let _ = stream.write_all(b"answer").await;
            let _ = stream.shutdown().await;
        });
    }
}

/// Writes the input as the peer, then ends its side; returns the bytes the session wrote.
async fn peer(mut io: DuplexStream, input: Vec<u8>) -> usize {
    let (mut rd, mut wr) = tokio::io::split(&mut io);
    let reader = async {
        let mut total = 0usize;
        let mut buf = vec![0u8; 16 * 1024];
        while let Ok(n) = rd.read(&mut buf).await {
            if n == 0 {
                break;
            }
            total += n;
        }
        total
    };
    let writer = async {
        let _ = wr.write_all(&input).await;
        let _ = wr.shutdown().await;
    };
    let (total, ()) = tokio::join!(reader, writer);
    total
}

async fn run(selector: u8, input: Vec<u8>) {
    let role = if selector & 1 == 0 {
        Role::Server
    } else {
        Role::Agent
    };
    let config = config(selector);
    let metrics = MuxMetrics::unregistered();
    let (ours, theirs) = tokio::io::duplex(64 * 1024);
    let input_len = input.len();
    let (session, incoming, driver) =
        Session::new(framed(ours, config.limits()), role, config, metrics.clone());
    let driver = tokio::spawn(driver.run());
    let mut tasks = JoinSet::new();
    for _ in 0..2 {
        let session = session.clone();
        tasks.spawn(async move {
            let target: TargetAddr = "127.0.0.1:9".parse().expect("target");
            if let Ok(mut stream) = session.open(target).await {
                let _ = stream.write_all(b"hello").await;
                let mut buf = [0u8; 64];
                let _ = stream.read(&mut buf).await;
            }
        });
    }
    let peer = tokio::spawn(peer(theirs, input));
    let mut accepted = JoinSet::new();
    let serving = serve(incoming, &mut accepted);
    let ended = tokio::time::timeout(END_WITHIN, async {
        tokio::join!(serving, async { driver.await.expect("driver panicked") }).1
    })
    .await;
    assert!(
        ended.is_ok(),
        "the session did not end after its peer's input ended"
    );
    while let Some(done) = tasks.join_next().await {
        done.expect("opener task panicked");
    }
    while let Some(done) = accepted.join_next().await {
        done.expect("stream task panicked");
    }
    let written = peer.await.expect("peer task panicked");
    // Output is bounded by the input: answers, credit and keepalive, never a flood.
    assert!(
        written <= 64 * 1024 + 64 * input_len,
        "{written} bytes out for {input_len} in"
    );
    drop(session);
    assert_eq!(metrics.active.get(), 0, "streams still counted active");
    assert_eq!(
        metrics.opened.get(),
        metrics.closed_total(),
        "opened != closed"
    );
}

/// The fuzz target's body: panics on a finding.
pub(crate) fn check(data: &[u8]) {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("runtime");
    runtime.block_on(run(selector, rest.to_vec()));
}
