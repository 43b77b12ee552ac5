//! Direct delivery (`tether_mux::direct`): the session's reader writing received bytes into the
//! local socket itself must keep every byte in order when it alternates with the pump, and must
//! stop once the pipe is gone.
#![allow(clippy::unwrap_used)]

mod common;

use std::io;

use common::{Pair, Pattern, bounded, wait_until, write_pattern};
use tether_mux::MuxStream;
use tether_mux::direct::{DirectTcp, pipe_direct};
use tether_mux::pipe::{PipeError, PipeTotals};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

const MIB: u64 = 1024 * 1024;

/// A connected pair of loopback sockets, `(pump side, consumer side)`, whose buffers are
/// `buffer` bytes (so that large payloads only partly fit and the pump must take over).
async fn small_socket_pair(buffer: u32) -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_send_buffer_size(buffer).unwrap();
    let (pump_side, accepted) = tokio::join!(
        socket.connect(listener.local_addr().unwrap()),
        listener.accept()
    );
    let (consumer, _) = accepted.unwrap();
    socket2::SockRef::from(&consumer)
        .set_recv_buffer_size(buffer as usize)
        .unwrap();
    (pump_side.unwrap(), consumer)
}

/// A stream of `pair` whose agent end is pumped with direct delivery to a socket pair with
/// `buffer`-byte buffers, once the pump runs: `(server end, consumer socket, pump task)`.
async fn pumping(
    pair: &mut Pair,
    buffer: u32,
) -> (
    MuxStream,
    TcpStream,
    tokio::task::JoinHandle<Result<PipeTotals, PipeError>>,
) {
    let (mut server_side, mut agent_side) = pair.open().await;
    let (pump_side, mut consumer) = small_socket_pair(buffer).await;
    let pump = tokio::spawn(async move {
        let mut local = DirectTcp::new(pump_side);
        pipe_direct(&mut agent_side, &mut local).await
    });
    pump_is_running(&mut consumer, &mut server_side).await;
    (server_side, consumer, pump)
}

/// Sends `ping` from the consumer to the far end and reads it there: once it arrives, the pump
/// is running and its socket is attached.
async fn pump_is_running(consumer: &mut TcpStream, far: &mut MuxStream) {
    consumer.write_all(b"ping").await.unwrap();
    let mut got = [0u8; 4];
    bounded("ping through the pump", far.read_exact(&mut got))
        .await
        .unwrap();
    assert_eq!(&got, b"ping");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_and_pumped_writes_keep_every_byte_in_order() {
    let mut pair = Pair::new();
    let (mut server_side, mut consumer, pump) = pumping(&mut pair, 32 * 1024).await;

    let len = 8 * MIB;
    let pattern = Pattern::new(11);
    let (sent, received) = bounded("8 MiB through a small socket", async {
        tokio::join!(
            async {
                write_pattern(&mut server_side, &pattern, len).await?;
                server_side.shutdown().await
            },
            async {
                // A slow consumer: small reads, so the socket is often full.
                let mut buf = vec![0u8; 1500];
                let mut expect = vec![0u8; 1500];
                let mut off = 0u64;
                loop {
                    let n = consumer.read(&mut buf).await?;
                    if n == 0 {
                        return Ok::<_, io::Error>(off);
                    }
                    pattern.fill(off, &mut expect[..n]);
                    assert!(buf[..n] == expect[..n], "bytes out of order at {off}");
                    off += n as u64;
                }
            }
        )
    })
    .await;
    sent.unwrap();
    assert_eq!(received.unwrap(), len);
    consumer.shutdown().await.unwrap();
    let mut rest = Vec::new();
    server_side.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());

    let totals = bounded("pump", pump).await.unwrap().unwrap();
    assert_eq!(totals.to_tunnel, 4);
    assert_eq!(totals.to_local, len);
    // Both paths were taken: the reader wrote what fitted, the pump the rest.
    assert!(totals.to_local_direct > 0, "{totals:?}");
    assert!(totals.to_local_direct < len, "{totals:?}");
    drop(server_side);
    pair.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_payload_reaches_an_idle_socket_directly() {
    let mut pair = Pair::new();
    let (mut server_side, mut consumer, pump) = pumping(&mut pair, 64 * 1024).await;
    server_side.write_all(b"pong").await.unwrap();
    server_side.shutdown().await.unwrap();
    let mut got = Vec::new();
    bounded("pong", consumer.read_to_end(&mut got))
        .await
        .unwrap();
    assert_eq!(got, b"pong");
    consumer.shutdown().await.unwrap();
    let totals = bounded("pump", pump).await.unwrap().unwrap();
    assert_eq!(totals.to_local, 4);
    assert_eq!(totals.to_local_direct, 4);
    drop(server_side);
    pair.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_pipe_gets_no_more_direct_writes() {
    let mut pair = Pair::new();
    let (mut server_side, agent_side) = pair.open().await;
    let (pump_side, mut consumer) = small_socket_pair(64 * 1024).await;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let pump = tokio::spawn(async move {
        let mut stream = agent_side;
        let mut local = DirectTcp::new(pump_side);
        tokio::select! {
            _ = pipe_direct(&mut stream, &mut local) => unreachable!("the pipe had no reason to end"),
            _ = stop_rx => {}
        }
        (stream, local)
    });
    pump_is_running(&mut consumer, &mut server_side).await;
    stop_tx.send(()).unwrap();
    let (stream, _local) = bounded("pump stops", pump).await.unwrap();

    server_side.write_all(b"late").await.unwrap();
    // The bytes wait in the stream's buffer for a reader instead of reaching the socket.
    wait_until("the late bytes to be buffered", || {
        stream.debug_buffered() == 4
    })
    .await;
    let mut buf = [0u8; 8];
    let err = consumer.try_read(&mut buf).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
    drop((stream, server_side));
    pair.finish().await;
}
