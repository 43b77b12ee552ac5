//! Five server replicas as real processes on 127.0.0.1 to 127.0.0.5 with peering, and an agent
//! placed on two of them (`placement.replicas_per_agent: 2`): a dial through any replica's
//! forward reaches the agent byte-exact, relayed by the replicas that do not hold it (half-close
//! and a target's reset carried through the relay); a killed holder moves the agent to its
//! next replica and relayed dials keep working; certificates of the wrong kind are refused on
//! each listener.

#![allow(clippy::unwrap_used)] // test helpers panic on failure by design

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tether_e2e::process::ServerProcess;
use tether_e2e::tether_testkit::{TestPki, echo::echo_server};
use tether_e2e::{TestAgent, WAIT, echo_exact, ends_with_error};
use tether_testkit::{common_port_on, http_get};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const REPLICAS: u8 = 5;

/// server.yaml of replica `i`: agents on `127.0.0.i:port`, peers on `127.0.0.i:peer_port`,
/// forwards for edge-1 to the echo target and to the resetting target.
fn replica_yaml(
    pki: &TestPki,
    i: u8,
    ports: (u16, u16),
    echo: SocketAddr,
    resetting: SocketAddr,
) -> PathBuf {
    let (port, peer_port) = ports;
    let peer = pki.server_peer(&format!("replica-{i}"));
    let members: Vec<String> = (1..=REPLICAS)
        .map(|m| format!("\"127.0.0.{m}:{peer_port}\""))
        .collect();
    pki.write_file(
        &format!("relay-replica-{i}.yaml"),
        &format!(
            "version: 1\n\
             server_id: replica-{i}\n\
             listen: \"127.0.0.{i}:{port}\"\n\
             admin_listen: \"127.0.0.{i}:0\"\n\
             drain_timeout: 2s\n\
             tls: {{ cert: \"{}\", key: \"{}\", client_ca: \"{}\" }}\n\
             forwards:\n\
             \x20 - {{ name: echo, listen: \"127.0.0.{i}:0\", client: edge-1, target: \"{echo}\" }}\n\
             \x20 - {{ name: rst, listen: \"127.0.0.{i}:0\", client: edge-1, target: \"{resetting}\" }}\n\
             peers:\n\
             \x20 listen: \"127.0.0.{i}:{peer_port}\"\n\
             \x20 members: [{}]\n\
             \x20 cert: \"{}\"\n\
             \x20 key: \"{}\"\n\
             \x20 server_ca: \"{}\"\n\
             \x20 server_name: localhost\n\
             \x20 interval: 1s\n\
             \x20 relay_timeout: 5s\n",
            pki.server_cert_path().display(),
            pki.server_key_path().display(),
            pki.ca_path().display(),
            members.join(", "),
            peer.cert_path.display(),
            peer.key_path.display(),
            pki.ca_path().display(),
        ),
    )
}

/// The agent: every replica in `servers:`, placed on two.
fn agent(
    pki: &TestPki,
    port: u16,
    cert: (&PathBuf, &PathBuf),
    echo: SocketAddr,
    resetting: SocketAddr,
) -> TestAgent {
    let urls: Vec<String> = (1..=REPLICAS)
        .map(|i| format!("\"wss://127.0.0.{i}:{port}/v1/connect\""))
        .collect();
    TestAgent::from_yaml(
        &format!(
            "version: 1\n\
             servers: [{}]\n\
             server_name: localhost\n\
             tls: {{ cert: \"{}\", key: \"{}\", server_ca: \"{}\" }}\n\
             admin_listen: \"\"\n\
             connect_timeout: 2s\n\
             reconnect: {{ min_delay: 50ms, max_delay: 500ms }}\n\
             discovery: {{ interval: 1s }}\n\
             placement: {{ replicas_per_agent: 2 }}\n\
             policy:\n  allow:\n    - {{ cidrs: [\"127.0.0.0/8\"], ports: [\"{}\", \"{}\"] }}\n",
            urls.join(", "),
            cert.0.display(),
            cert.1.display(),
            pki.ca_path().display(),
            echo.port(),
            resetting.port(),
        ),
        pki,
    )
}

/// A target that reads a little, then resets the connection.
async fn resetting_server() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 16];
                let _ = stream.read(&mut buf).await;
                let _ = stream.set_zero_linger();
                drop(stream);
            });
        }
    });
    (addr, task)
}

/// A sample of a replica's `/metrics`.
async fn sample(admin: SocketAddr, series: &str) -> Option<f64> {
    let (_, body) = http_get(admin, "/metrics").await;
    tether_testkit::metrics::sample(&body, series)
}

/// How long five replicas (debug builds, 20 mutual-TLS handshakes) may take to link up on a
/// loaded CI machine.
const MESH_WAIT: Duration = Duration::from_secs(60);

/// Polls `check` until it holds, at most `wait`.
async fn until_within<F, Fut>(wait: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + wait;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The indices of the replicas in edge-1's ranking (their IP addresses are the keys).
fn ranking() -> Vec<usize> {
    let keys: Vec<String> = (1..=REPLICAS).map(|i| format!("127.0.0.{i}")).collect();
    tether_common::placement::rank("edge-1", &keys)
        .into_iter()
        .map(|k| keys.iter().position(|x| x == k).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_replica_reaches_an_agent_placed_on_two_of_five() {
    let pki = TestPki::new();
    let (echo, _echo_task) = echo_server().await;
    let (resetting, _reset_task) = resetting_server().await;
    let port = common_port_on(REPLICAS);
    let peer_port = loop {
        let p = common_port_on(REPLICAS);
        if p != port {
            break p;
        }
    };
    let mut replicas: Vec<Option<ServerProcess>> = Vec::new();
    for i in 1..=REPLICAS {
        let config = replica_yaml(&pki, i, (port, peer_port), echo, resetting);
        replicas.push(Some(ServerProcess::start(&config, 2).await));
    }
    let admins: Vec<SocketAddr> = replicas
        .iter()
        .map(|r| r.as_ref().unwrap().admin_addr)
        .collect();
    for admin in &admins {
        until_within(
            MESH_WAIT,
            "every replica has a peer session to each other one",
            || async {
                sample(*admin, "tether_peer_sessions{direction=\"out\"}").await == Some(4.0)
            },
        )
        .await;
    }
    let cert = pki.agent("edge-1");
    let agent = agent(
        &pki,
        port,
        (&cert.cert_path, &cert.key_path),
        echo,
        resetting,
    );
    let ranked = ranking();
    let mut status = agent.status.clone();
    let placed = tokio::time::timeout(WAIT, status.wait_for(|s| s.connected_replicas() == 2))
        .await
        // Not the borrow: holding it would block the agent's next status update.
        .map(|r| r.map(drop));
    assert!(matches!(placed, Ok(Ok(()))), "the agent holds two sessions");
    // Through every replica, the holders directly and the others by relay.
    let holders = [ranked[0], ranked[1]];
    for (i, replica) in replicas.iter().enumerate() {
        let forward = replica.as_ref().unwrap().forward_addrs[0];
        let deadline = tokio::time::Instant::now() + WAIT;
        // The holders' registries see the sessions a moment after the agent does.
        while let Err(err) = echo_exact(forward, 256 * 1024).await {
            assert!(tokio::time::Instant::now() < deadline, "replica {i}: {err}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let relayed = sample(admins[i], "tether_relay_streams_total{outcome=\"opened\"}").await;
        if holders.contains(&i) {
            assert_eq!(relayed, Some(0.0), "replica {i} holds the agent: no relay");
        } else {
            assert!(relayed >= Some(1.0), "replica {i} relayed: {relayed:?}");
        }
    }
    // A target's reset reaches the consumer through a relay as an error, never a clean EOF.
    let relaying = (0..REPLICAS as usize)
        .find(|i| !holders.contains(i))
        .unwrap();
    let mut stream = TcpStream::connect(replicas[relaying].as_ref().unwrap().forward_addrs[1])
        .await
        .unwrap();
    stream.write_all(b"hello").await.unwrap();
    assert!(
        ends_with_error(&mut stream).await,
        "the reset crossed the relay"
    );

    // The first holder dies: the agent takes its third replica, relayed dials keep working.
    replicas[ranked[0]].take().unwrap().kill().await;
    let mut status = agent.status.clone();
    let moved = tokio::time::timeout(
        WAIT,
        status.wait_for(|s| {
            s.replicas
                .iter()
                .filter(|(_, r)| r.connected)
                .any(|(key, _)| key.contains(&format!("127.0.0.{}:", ranked[2] + 1)))
                && s.connected_replicas() == 2
        }),
    )
    .await
    .map(|r| r.map(drop));
    assert!(
        matches!(moved, Ok(Ok(()))),
        "the agent moved to its third replica"
    );
    for (i, replica) in replicas.iter().enumerate() {
        let Some(replica) = replica else { continue };
        let forward = replica.forward_addrs[0];
        let deadline = tokio::time::Instant::now() + WAIT;
        while let Err(err) = echo_exact(forward, 64 * 1024).await {
            assert!(
                tokio::time::Instant::now() < deadline,
                "replica {i} after the kill: {err}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    agent.stop().await.unwrap();

    // An agent certificate on the peer listener: no peer session.
    let live = replicas.iter().position(Option::is_some).unwrap();
    let before = sample(admins[live], "tether_peer_sessions{direction=\"in\"}").await;
    let refused = agent_cert_on_peer_listener(&pki, &cert, (live as u8 + 1, peer_port)).await;
    assert!(refused, "the peer listener closes on an agent certificate");
    assert_eq!(
        sample(admins[live], "tether_peer_sessions{direction=\"in\"}").await,
        before
    );

    // A peer certificate on the agent listener: refused with its reason.
    let peer = pki.server_peer("replica-9");
    let impostor = TestAgent::from_yaml(
        &format!(
            "version: 1\n\
             server_url: \"wss://127.0.0.{}:{port}/v1/connect\"\n\
             server_name: localhost\n\
             tls: {{ cert: \"{}\", key: \"{}\", server_ca: \"{}\" }}\n\
             admin_listen: \"\"\n\
             reconnect: {{ min_delay: 50ms, max_delay: 500ms }}\n",
            live + 1,
            peer.cert_path.display(),
            peer.key_path.display(),
            pki.ca_path().display(),
        ),
        &pki,
    );
    let mut status = impostor.status.clone();
    let refused = tokio::time::timeout(
        WAIT,
        status.wait_for(|s| {
            s.last_error
                .as_deref()
                .is_some_and(|e| e.contains("server peer certificate"))
        }),
    )
    .await
    .map(|r| r.map(drop));
    assert!(
        matches!(refused, Ok(Ok(()))),
        "refused as a peer certificate: {:?}",
        impostor.status.borrow().last_error
    );
    assert!(!impostor.status.borrow().connected);
    impostor.stop().await.unwrap();
}

/// Connects to replica `i`'s peer listener with an agent certificate: true when the
/// connection ends (TLS alert, or closed right after the handshake) without a session.
async fn agent_cert_on_peer_listener(
    pki: &TestPki,
    cert: &tether_e2e::tether_testkit::AgentCert,
    (i, peer_port): (u8, u16),
) -> bool {
    let mut config = (*tether_common::tls::client_config_from_pem(
        &cert.cert_pem,
        &cert.key_pem,
        &std::fs::read_to_string(pki.ca_path()).unwrap(),
    )
    .unwrap())
    .clone();
    config.alpn_protocols = vec![b"tether-peer/1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect((std::net::Ipv4Addr::new(127, 0, 0, i), peer_port))
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let Ok(mut tls) = connector.connect(name, tcp).await else {
        return true;
    };
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(WAIT, tls.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}
