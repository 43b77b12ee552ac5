//! Five server replicas as real processes on 127.0.0.1 to 127.0.0.5 with peering, and an agent
//! placed on two of them (`placement.replicas_per_agent: 2`): a dial through any replica's
//! forward reaches the agent byte-exact, relayed by the replicas that do not hold it (half-close
//! and a target's reset carried through the relay); a killed holder moves the agent to its
//! next replica and relayed dials keep working; certificates of the wrong kind are refused on
//! each listener. A replica's peer certificate renewed on disk is used by its next peer
//! sessions without dropping any, and a bad one is refused once.

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
    let (mut replicas, admins) = start_meshed(&pki, (port, peer_port), echo, resetting).await;
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
    every_replica_reaches_the_agent(&replicas, &admins, holders).await;
    every_listing_shows_the_placement(&admins, holders).await;
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

    let live = replicas.iter().position(Option::is_some).unwrap();
    wrong_certificates_are_refused(&pki, &cert, admins[live], (live as u8 + 1, port, peer_port))
        .await;
}

/// The five replicas, once each has a peer session to every other one; their admin addresses.
async fn start_meshed(
    pki: &TestPki,
    ports: (u16, u16),
    echo: SocketAddr,
    resetting: SocketAddr,
) -> (Vec<Option<ServerProcess>>, Vec<SocketAddr>) {
    let mut replicas: Vec<Option<ServerProcess>> = Vec::new();
    for i in 1..=REPLICAS {
        let config = replica_yaml(pki, i, ports, echo, resetting);
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
    (replicas, admins)
}

/// 256 KiB byte-exact through every replica's echo forward: the `holders` without relaying,
/// the others relaying (counted).
async fn every_replica_reaches_the_agent(
    replicas: &[Option<ServerProcess>],
    admins: &[SocketAddr],
    holders: [usize; 2],
) {
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
}

/// Each replica's `GET /v1/clients` (what `tether status` reads) reports the five members and
/// itself among them, and the agent's sessions are on the first two of its ranking over them.
async fn every_listing_shows_the_placement(admins: &[SocketAddr], holders: [usize; 2]) {
    for (i, admin) in admins.iter().enumerate() {
        // Each replica listens on its own address, so it knows itself among the members at
        // once; the listing is read until it says so (bounded by WAIT) all the same.
        let deadline = tokio::time::Instant::now() + WAIT;
        let (listing, view) = loop {
            let (status, body) = http_get(*admin, "/v1/clients").await;
            assert_eq!(status, 200, "replica {i}: {body}");
            let listing: tether_server::ClientsResponse = serde_json::from_str(&body).unwrap();
            let view = listing
                .placement
                .clone()
                .expect("a replica with peers reports its placement view");
            if !view.this_replica.is_empty() || tokio::time::Instant::now() > deadline {
                break (listing, view);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let mut members = view.members.clone();
        members.sort();
        let expected: Vec<String> = (1..=REPLICAS).map(|r| format!("127.0.0.{r}")).collect();
        assert_eq!(members, expected, "replica {i}");
        let own = format!("127.0.0.{}", i + 1);
        assert_eq!(view.this_replica, std::slice::from_ref(&own), "replica {i}");
        assert_eq!(
            view.linked.len(),
            REPLICAS as usize - 1,
            "replica {i}: {view:?}"
        );
        let top2: Vec<&String> = tether_common::placement::top_k("edge-1", &view.members, 2);
        let holds = listing
            .clients
            .iter()
            .any(|c| c.client == "edge-1" && !c.sessions.is_empty());
        assert_eq!(holds, top2.contains(&&own), "replica {i}: {top2:?}");
        assert_eq!(holds, holders.contains(&i), "replica {i}");
    }
}

/// On live replica `i`: an agent certificate gets no session on the peer listener, and a
/// peer certificate is refused on the agent listener with its reason.
async fn wrong_certificates_are_refused(
    pki: &TestPki,
    cert: &tether_e2e::tether_testkit::AgentCert,
    admin: SocketAddr,
    (i, port, peer_port): (u8, u16, u16),
) {
    // An agent certificate on the peer listener: no peer session.
    let before = sample(admin, "tether_peer_sessions{direction=\"in\"}").await;
    let refused = agent_cert_on_peer_listener(pki, cert, (i, peer_port)).await;
    assert!(refused, "the peer listener closes on an agent certificate");
    assert_eq!(
        sample(admin, "tether_peer_sessions{direction=\"in\"}").await,
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
            i,
            peer.cert_path.display(),
            peer.key_path.display(),
            pki.ca_path().display(),
        ),
        pki,
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

/// server.yaml of replica `i` of the rotation test: members 127.0.0.1 to .3 on `peer_port`
/// (the third is the test's recording listener), a forward for edge-1 to `echo`, and the peer
/// certificate at `peer_files`.
fn rotation_yaml(
    pki: &TestPki,
    i: u8,
    (port, peer_port): (u16, u16),
    echo: SocketAddr,
    peer_files: (&PathBuf, &PathBuf),
) -> PathBuf {
    let members: Vec<String> = (1..=3)
        .map(|m| format!("\"127.0.0.{m}:{peer_port}\""))
        .collect();
    pki.write_file(
        &format!("rotation-replica-{i}.yaml"),
        &format!(
            "version: 1\n\
             server_id: replica-{i}\n\
             listen: \"127.0.0.{i}:{port}\"\n\
             admin_listen: \"127.0.0.{i}:0\"\n\
             tls: {{ cert: \"{}\", key: \"{}\", client_ca: \"{}\" }}\n\
             forwards:\n\
             \x20 - {{ name: echo, listen: \"127.0.0.{i}:0\", client: edge-1, target: \"{echo}\" }}\n\
             peers:\n\
             \x20 listen: \"127.0.0.{i}:{peer_port}\"\n\
             \x20 members: [{}]\n\
             \x20 cert: \"{}\"\n\
             \x20 key: \"{}\"\n\
             \x20 server_ca: \"{}\"\n\
             \x20 server_name: localhost\n\
             \x20 interval: 1s\n",
            pki.server_cert_path().display(),
            pki.server_key_path().display(),
            pki.ca_path().display(),
            members.join(", "),
            peer_files.0.display(),
            peer_files.1.display(),
            pki.ca_path().display(),
        ),
    )
}

/// A member that records the peer certificate every replica dialing it presents (server id,
/// serial) and then closes: each new peer session a replica opens is seen here.
async fn recording_member(
    pki: &TestPki,
    addr: SocketAddr,
) -> (
    tokio::sync::mpsc::Receiver<(String, String)>,
    tokio::task::JoinHandle<()>,
) {
    let tls = tether_common::tls::server_tls(
        &pki.server_files(),
        tether_common::tls::ClientCertPolicy::Required,
    )
    .unwrap();
    let mut config = (*tls.config).clone();
    config.alpn_protocols = vec![b"tether-peer/1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind(addr).await.unwrap();
    let (seen, rx) = tokio::sync::mpsc::channel(256);
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let Ok(tls) = acceptor.accept(tcp).await else {
                continue;
            };
            let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
            let id = tether_common::identity::server_id_from_peer_cert(&leaf).unwrap();
            let serial = tether_common::pki_ops::serial_hex(&leaf).unwrap();
            let _ = seen.try_send((id, serial));
        }
    });
    (rx, task)
}

/// Waits for `replica-2`'s next dial of the recording member; its certificate serial.
async fn next_serial(seen: &mut tokio::sync::mpsc::Receiver<(String, String)>) -> String {
    loop {
        let (id, serial) = tokio::time::timeout(WAIT, seen.recv())
            .await
            .expect("replica-2 dials the third member every interval")
            .unwrap();
        if id == "replica-2" {
            return serial;
        }
    }
}

/// Replaces `path` with `contents` in one rename (as `tether certs renew` does).
fn replace(path: &PathBuf, contents: &str) {
    let next = path.with_extension("next");
    std::fs::write(&next, contents).unwrap();
    std::fs::rename(&next, path).unwrap();
}

/// Five bytes there and back on a held stream.
async fn roundtrip(stream: &mut TcpStream) {
    let mut buf = [0u8; 5];
    stream.write_all(b"hello").await.unwrap();
    stream.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"hello");
}

fn serial_of(pem: &str) -> String {
    use rustls::pki_types::pem::PemObject;
    let der = rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
    tether_common::pki_ops::serial_hex(&der).unwrap()
}

/// Replicas 1 and 2 of the rotation test (replica 2 with its peer certificate at
/// `peer_files`); the servers and replica 2's config file.
async fn start_pair(
    pki: &TestPki,
    ports: (u16, u16),
    echo: SocketAddr,
    peer_files: &(PathBuf, PathBuf),
) -> ([ServerProcess; 2], PathBuf) {
    let first = pki.server_peer("replica-1");
    let one = rotation_yaml(pki, 1, ports, echo, (&first.cert_path, &first.key_path));
    let two = rotation_yaml(pki, 2, ports, echo, (&peer_files.0, &peer_files.1));
    let replicas = [
        ServerProcess::start(&one, 1).await,
        ServerProcess::start(&two, 1).await,
    ];
    (replicas, two)
}

/// edge-1 connected to replica 1 only, allowed to reach `echo`.
fn agent_on_replica_1(pki: &TestPki, port: u16, echo: SocketAddr) -> TestAgent {
    let cert = pki.agent("edge-1");
    TestAgent::from_yaml(
        &format!(
            "version: 1\n\
             server_url: \"wss://127.0.0.1:{port}/v1/connect\"\n\
             server_name: localhost\n\
             tls: {{ cert: \"{}\", key: \"{}\", server_ca: \"{}\" }}\n\
             admin_listen: \"\"\n\
             policy:\n  allow:\n    - {{ cidrs: [\"127.0.0.0/8\"], ports: [\"{}\"] }}\n",
            cert.cert_path.display(),
            cert.key_path.display(),
            pki.ca_path().display(),
            echo.port(),
        ),
        pki,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_peer_certificate_serves_new_peer_sessions_and_drops_none() {
    let pki = TestPki::new();
    let (echo, _echo_task) = echo_server().await;
    let port = common_port_on(3);
    let peer_port = loop {
        let p = common_port_on(3);
        if p != port {
            break p;
        }
    };
    let (mut seen, _member) = recording_member(&pki, ([127, 0, 0, 3], peer_port).into()).await;
    let old = pki.server_peer("replica-2");
    let files = (
        pki.write_file("rotating-peer.pem", &old.cert_pem),
        pki.write_file("rotating-peer-key.pem", &old.key_pem),
    );
    let (replicas, two) = start_pair(&pki, (port, peer_port), echo, &files).await;
    let admins = [replicas[0].admin_addr, replicas[1].admin_addr];
    let agent = agent_on_replica_1(&pki, port, echo);
    // Replica 2 holds no session of edge-1: its forward relays through replica 1.
    let relayed = replicas[1].forward_addrs[0];
    until_within(MESH_WAIT, "a relayed echo through replica 2", || async {
        echo_exact(relayed, 16 * 1024).await.is_ok()
    })
    .await;
    assert_eq!(next_serial(&mut seen).await, serial_of(&old.cert_pem));
    // A relayed stream held open across the rotation proves the peer session stays.
    let mut held = TcpStream::connect(relayed).await.unwrap();
    roundtrip(&mut held).await;
    let inbound = sample(admins[0], "tether_peer_sessions{direction=\"in\"}").await;

    // The renewed peer certificate: new peer sessions present it; nothing is dropped.
    let new = pki.server_peer("replica-2");
    replace(&files.1, &new.key_pem);
    replace(&files.0, &new.cert_pem);
    let new_serial = serial_of(&new.cert_pem);
    let deadline = tokio::time::Instant::now() + WAIT;
    while next_serial(&mut seen).await != new_serial {
        assert!(
            tokio::time::Instant::now() < deadline,
            "replica 2 dials with its new certificate"
        );
    }
    let applied = "tether_peer_tls_reloads_total{result=\"applied\"}";
    assert!(sample(admins[1], applied).await >= Some(1.0));
    roundtrip(&mut held).await;
    echo_exact(relayed, 16 * 1024).await.unwrap();
    assert_eq!(
        sample(admins[0], "tether_peer_sessions{direction=\"in\"}").await,
        inbound,
        "replica 1 keeps its peer sessions"
    );

    // A bad file: refused and counted once, the material in force stays.
    let rejected = "tether_peer_tls_reloads_total{result=\"rejected\"}";
    let refused = sample(admins[1], rejected).await.unwrap() + 1.0;
    replace(
        &files.0,
        "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n",
    );
    until_within(WAIT, "the bad peer certificate is refused", || async {
        sample(admins[1], rejected).await == Some(refused)
    })
    .await;
    // Another reload (the config file changes) does not count the same bad file again.
    let reloads = "tether_config_reloads_total{result=\"applied\"}";
    let before = sample(admins[1], reloads).await;
    let yaml = std::fs::read_to_string(&two).unwrap();
    replace(&two, &format!("{yaml}allowed_agents: [edge-1]\n"));
    until_within(WAIT, "the config reload", || async {
        sample(admins[1], reloads).await > before
    })
    .await;
    assert_eq!(sample(admins[1], rejected).await, Some(refused));
    assert_eq!(next_serial(&mut seen).await, new_serial);
    roundtrip(&mut held).await;
    echo_exact(relayed, 16 * 1024).await.unwrap();
    agent.stop().await.unwrap();
}
