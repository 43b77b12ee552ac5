//! Killing the server process (SIGKILL) mid-transfer: the consumer gets an error, not EOF; the
//! agent notices, reconnects to the restarted server on the same port, and traffic flows again.

#![allow(clippy::unwrap_used)] // test helpers panic on failure by design

use std::time::Duration;

use tether_e2e::process::ServerProcess;
use tether_e2e::tether_testkit::{TestPki, echo_server};
use tether_e2e::{TestAgent, WAIT, allow_only, wait_forward_echo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn server_yaml(pki: &TestPki, listen: &str, target: std::net::SocketAddr) -> String {
    format!(
        "version: 1\n\
         listen: \"{listen}\"\n\
         admin_listen: \"127.0.0.1:0\"\n\
         tls: {{ cert: \"{}\", key: \"{}\", client_ca: \"{}\" }}\n\
         forwards:\n  - {{ name: echo, listen: \"127.0.0.1:0\", client: edge-1, target: \"{target}\" }}\n",
        pki.server_cert_path().display(),
        pki.server_key_path().display(),
        pki.ca_path().display(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_server_mid_transfer_then_reconnect() {
    let pki = TestPki::new();
    let (target, _echo) = echo_server().await;
    let first_config = pki.write_file("server-1.yaml", &server_yaml(&pki, "127.0.0.1:0", target));
    let server = ServerProcess::start(&first_config, 1).await;
    let tunnel = server.tunnel_addr;
    let mut agent = TestAgent::start(
        &pki,
        &pki.agent("edge-1"),
        tunnel,
        &allow_only(target),
        "session: { ping_interval: 200ms, idle_timeout: 1s }\n",
    )
    .await;
    agent.wait_connected().await;
    wait_forward_echo(server.forward_addrs[0]).await;

    // A long transfer: the consumer keeps writing while it reads the echo.
    let consumer = TcpStream::connect(server.forward_addrs[0]).await.unwrap();
    let (mut read, mut write) = consumer.into_split();
    // Returns whether a write failed (the transfer was cut) before the writer ran out of data.
    let writer = tokio::spawn(async move {
        let chunk = vec![0x5au8; 64 * 1024];
        for _ in 0..(4096 * 16) {
            if write.write_all(&chunk).await.is_err() {
                return true;
            }
        }
        false
    });
    let mut buf = vec![0u8; 64 * 1024];
    let mut received = 0usize;
    while received < 4 << 20 {
        let n = read
            .read(&mut buf)
            .await
            .expect("echo flows before the kill");
        assert!(n > 0, "echo ended early");
        received += n;
    }
    server.kill().await;

    let outcome = tokio::time::timeout(WAIT, async {
        loop {
            match read.read(&mut buf).await {
                Ok(0) => return Ok(()),
                Ok(_) => continue,
                Err(err) => return Err(err),
            }
        }
    })
    .await
    .expect("the consumer learns of the death in time");
    // The process died: its sockets get FIN if nothing was unread, RST otherwise. Either way the
    // consumer, which is still sending, must see an error on one of its directions; a transfer
    // that looks complete (clean EOF and every write accepted) would be silent data loss.
    let read_failed = outcome.is_err();
    let write_failed = tokio::time::timeout(WAIT, writer)
        .await
        .expect("the consumer's writes fail in time")
        .unwrap();
    assert!(
        read_failed || write_failed,
        "a killed server must not look like a clean end of the transfer"
    );

    // The agent notices (idle timeout or TCP reset) ...
    tokio::time::timeout(WAIT, agent.status.wait_for(|s| !s.connected))
        .await
        .expect("agent notices the dead server")
        .unwrap();
    // ... and reconnects to a new server process on the same port.
    let second_config = pki.write_file(
        "server-2.yaml",
        &server_yaml(&pki, &tunnel.to_string(), target),
    );
    let server = ServerProcess::start(&second_config, 1).await;
    assert_eq!(server.tunnel_addr, tunnel);
    tokio::time::timeout(
        WAIT,
        agent.status.wait_for(|s| s.connected && s.sessions >= 2),
    )
    .await
    .expect("agent reconnects in time")
    .unwrap();

    let mut stream = TcpStream::connect(server.forward_addrs[0]).await.unwrap();
    let payload: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 241) as u8).collect();
    stream.write_all(&payload).await.unwrap();
    stream.shutdown().await.unwrap();
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut back))
        .await
        .expect("echo after reconnect in time")
        .unwrap();
    assert!(back == payload, "transfer after reconnect is byte-exact");
    agent.stop().await.unwrap();
    server.kill().await;
}
