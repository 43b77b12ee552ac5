//! Smoke test: one stream echoes through an in-memory session pair.

use tether_mux::transport::framed;
use tether_mux::{MuxConfig, MuxMetrics, Role, Session};
use tether_proto::TargetAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn echo_one_stream() {
    let config = MuxConfig::default();
    let (a, b) = tokio::io::duplex(256 * 1024);
    let metrics = MuxMetrics::unregistered();
    let (server, _server_in, server_driver) = Session::new(
        framed(a, config.limits()),
        Role::Server,
        config.clone(),
        metrics.clone(),
    );
    let (agent, mut agent_in, agent_driver) = Session::new(
        framed(b, config.limits()),
        Role::Agent,
        config.clone(),
        metrics.clone(),
    );
    let sd = tokio::spawn(server_driver.run());
    let ad = tokio::spawn(agent_driver.run());
    let echo = tokio::spawn(async move {
        let pending = agent_in.accept().await.unwrap();
        let mut stream = pending.accept().unwrap();
        let mut buf = Vec::new();
        stream.read_to_end(&mut buf).await.unwrap();
        stream.write_all(&buf).await.unwrap();
        stream.shutdown().await.unwrap();
        buf.len()
    });
    let mut stream = server
        .open("127.0.0.1:9".parse::<TargetAddr>().unwrap())
        .await
        .unwrap();
    let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let (mut r, mut w) = tokio::io::split(stream);
    let p2 = payload.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&p2).await.unwrap();
        w.shutdown().await.unwrap();
        w
    });
    let mut got = Vec::new();
    r.read_to_end(&mut got).await.unwrap();
    let w = writer.await.unwrap();
    assert_eq!(got.len(), payload.len());
    assert!(got == payload);
    assert_eq!(echo.await.unwrap(), payload.len());
    stream = r.unsplit(w);
    drop(stream);
    drop(server);
    drop(agent);
    sd.await.unwrap();
    ad.await.unwrap();
    assert_eq!(metrics.active.get(), 0);
    assert_eq!(metrics.opened.get(), 2);
    assert_eq!(metrics.closed_total(), 2);
}
