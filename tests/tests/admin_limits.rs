//! The server's admin listener under idle connections: beyond its cap they are closed at
//! once, the rest when they send no request in time, and it keeps answering afterwards.

#![allow(clippy::unwrap_used)] // test helpers panic on failure by design

use std::time::Duration;

use tether_e2e::http::get;
use tether_e2e::tether_testkit::TestPki;
use tether_e2e::{TestServer, WAIT};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::task::JoinSet;

/// Idle connections opened against the admin listener (its cap is 128).
const IDLE: usize = 300;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_admin_connections_are_capped_and_timed_out() {
    let pki = TestPki::new();
    let server = TestServer::start(&pki, &[], "").await;
    let mut idle = JoinSet::new();
    for _ in 0..IDLE {
        let mut tcp = TcpStream::connect(server.admin_addr).await.unwrap();
        idle.spawn(async move {
            let started = tokio::time::Instant::now();
            let mut buf = [0u8; 16];
            // Silent until the server closes (EOF or reset).
            while let Ok(n) = tcp.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
            started.elapsed()
        });
    }
    let mut closed = Vec::new();
    let all = tokio::time::timeout(WAIT, async {
        while let Some(took) = idle.join_next().await {
            closed.push(took.unwrap());
        }
    })
    .await;
    assert!(
        all.is_ok(),
        "the server closed only {} of {IDLE} idle admin connections",
        closed.len()
    );
    let at_once = closed
        .iter()
        .filter(|took| **took < Duration::from_secs(2))
        .count();
    assert!(
        at_once >= IDLE - 128,
        "{at_once} connections closed at once; the cap is 128"
    );
    let health = get(server.admin_addr, "/healthz").await.unwrap();
    assert_eq!(health.status, 200);
    server.stop().await.unwrap();
}
