//! Smoke test: one stream echoes through an in-memory session pair.
#![allow(clippy::unwrap_used)]

mod common;

use common::Pair;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn echo_one_stream() {
    let mut pair = Pair::new();
    let (stream, mut echo_side) = pair.open().await;
    let echo = tokio::spawn(async move {
        let mut buf = Vec::new();
        echo_side.read_to_end(&mut buf).await.unwrap();
        echo_side.write_all(&buf).await.unwrap();
        echo_side.shutdown().await.unwrap();
        buf.len()
    });
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
    drop(r.unsplit(w));
    pair.finish().await;
    // finish() checked: opened == closed, nothing active, drivers done, no task left.
}
