//! Server replicas as real processes on 127.0.0.1, 127.0.0.2 and 127.0.0.3 (one port), an
//! agent with the static `servers:` list: a session to every replica, dials through each,
//! `kill -9` of one replica mid-transfer (only its streams fail; the agent keeps the other
//! sessions and is back on the killed replica soon after it restarts), and two addresses of
//! one replica (a direct address and a relay in front of it) yielding one session.

#![allow(clippy::unwrap_used)] // test helpers panic on failure by design

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use tether_e2e::process::ServerProcess;
use tether_e2e::tether_testkit::{TestPki, echo::echo_server};
use tether_e2e::{TestAgent, WAIT, allow_only};
use tether_testkit::metrics::metric;
use tether_testkit::{common_port_on, http_get};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A port free on 127.0.0.1, 127.0.0.2 and 127.0.0.3 (checked by binding all three).
fn common_port() -> u16 {
    common_port_on(3)
}

fn loopback(i: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, i))
}

/// server.yaml of replica `i` on `127.0.0.i:port`, with a forward to `target` for `edge-1`.
fn replica_yaml(pki: &TestPki, i: u8, port: u16, target: SocketAddr) -> PathBuf {
    pki.write_file(
        &format!("replica-{i}.yaml"),
        &format!(
            "version: 1\n\
             server_id: replica-{i}\n\
             listen: \"127.0.0.{i}:{port}\"\n\
             admin_listen: \"127.0.0.{i}:0\"\n\
             drain_timeout: 2s\n\
             tls: {{ cert: \"{}\", key: \"{}\", client_ca: \"{}\" }}\n\
             forwards:\n  - {{ name: echo, listen: \"127.0.0.{i}:0\", client: edge-1, target: \"{target}\" }}\n",
            pki.server_cert_path().display(),
            pki.server_key_path().display(),
            pki.ca_path().display(),
        ),
    )
}

/// An agent with `servers:` listing `urls`, short backoff and discovery.
fn agent_with_servers(pki: &TestPki, urls: &[String], target: SocketAddr) -> TestAgent {
    agent_with_servers_and(pki, urls, target, "")
}

/// [`agent_with_servers`] with `extra` top-level YAML keys.
fn agent_with_servers_and(
    pki: &TestPki,
    urls: &[String],
    target: SocketAddr,
    extra: &str,
) -> TestAgent {
    let cert = pki.agent("edge-1");
    let list: Vec<String> = urls.iter().map(|u| format!("\"{u}\"")).collect();
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
             {extra}\
             policy:\n{}",
            list.join(", "),
            cert.cert_path.display(),
            cert.key_path.display(),
            pki.ca_path().display(),
            allow_only(target),
        ),
        pki,
    )
}

async fn wait_replicas(agent: &mut TestAgent, connected: usize) {
    let mut status = agent.status.clone();
    let reached = tokio::time::timeout(
        WAIT,
        status.wait_for(|s| s.connected_replicas() == connected),
    )
    .await
    // Not the borrow: holding it would block the agent's next status update.
    .map(|reached| reached.map(drop));
    assert!(
        matches!(reached, Ok(Ok(_))),
        "{connected} replicas connected in time; status: {:#?}",
        agent.status.borrow().replicas
    );
}

/// Sends `len` bytes of a sequence through `addr` and checks the echo byte for byte.
async fn echo_exact(addr: SocketAddr, len: usize) {
    if let Err(err) = tether_e2e::echo_exact(addr, len).await {
        panic!("echo through {addr}: {err}");
    }
}

/// `tether status --admin A --admin B ...`: exit success and standard output.
fn status_of(admins: &[SocketAddr]) -> (bool, String) {
    let mut command = std::process::Command::new(tether_e2e::process::tether_binary());
    command.arg("status");
    for admin in admins {
        command.args(["--admin", &format!("http://{admin}")]);
    }
    let output = command.env_remove("TETHER_ADMIN").output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

/// Session ids of `edge-1` on a replica's `/v1/clients`.
async fn sessions_on(admin: SocketAddr) -> (String, Vec<u64>) {
    let (status, body) = http_get(admin, "/v1/clients").await;
    assert_eq!(status, 200, "{body}");
    let listing: tether_server::ClientsResponse = serde_json::from_str(&body).unwrap();
    let ids = listing
        .clients
        .iter()
        .filter(|c| c.client == "edge-1")
        .flat_map(|c| c.sessions.iter().map(|s| s.session_id))
        .collect();
    (listing.server_id, ids)
}

/// A sequence-checked echo stream kept moving in steps.
struct LiveStream {
    stream: TcpStream,
    sent: u64,
}

impl LiveStream {
    async fn open(addr: SocketAddr) -> LiveStream {
        LiveStream {
            stream: TcpStream::connect(addr).await.unwrap(),
            sent: 0,
        }
    }

    /// Sends and reads back 64 KiB; `Err` when the stream fails (or ends early).
    async fn step(&mut self) -> std::io::Result<()> {
        let chunk: Vec<u8> = (self.sent..self.sent + 65536)
            .map(|i| (i % 253) as u8)
            .collect();
        let mut back = vec![0u8; chunk.len()];
        let (mut read, mut write) = self.stream.split();
        let (written, received) = tokio::join!(write.write_all(&chunk), read.read_exact(&mut back));
        written?;
        received?;
        assert!(back == chunk, "sequence differs after {} bytes", self.sent);
        self.sent += chunk.len() as u64;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_keeps_a_session_to_every_replica_and_survives_a_kill() {
    let pki = TestPki::new();
    let (target, _echo) = echo_server().await;
    let port = common_port();
    let configs: Vec<PathBuf> = (1..=3)
        .map(|i| replica_yaml(&pki, i, port, target))
        .collect();
    let mut replicas = Vec::new();
    for config in &configs {
        replicas.push(ServerProcess::start(config, 1).await);
    }
    let urls: Vec<String> = (1..=3)
        .map(|i| format!("wss://127.0.0.{i}:{port}/v1/connect"))
        .collect();
    let mut agent = agent_with_servers(&pki, &urls, target);
    wait_replicas(&mut agent, 3).await;
    let ids: std::collections::BTreeSet<String> = agent
        .status
        .borrow()
        .replicas
        .values()
        .filter_map(|r| r.server_id.clone())
        .collect();
    assert_eq!(
        ids,
        ["replica-1", "replica-2", "replica-3"]
            .map(String::from)
            .into(),
        "one session per replica, each announcing its server_id"
    );
    tether_testkit::eventually("tether_agent_replicas{state=connected} 3", || {
        metric(
            &agent.registry,
            "tether_agent_replicas",
            &[("state", "connected")],
        ) == Some(3.0)
            && metric(
                &agent.registry,
                "tether_agent_replicas",
                &[("state", "discovered")],
            ) == Some(3.0)
    })
    .await;
    for replica in &replicas {
        echo_exact(replica.forward_addrs[0], 256 * 1024).await;
        let (server_id, sessions) = sessions_on(replica.admin_addr).await;
        assert_eq!(
            sessions.len(),
            1,
            "{server_id}: exactly one session of edge-1"
        );
    }
    let admins: Vec<SocketAddr> = replicas.iter().map(|r| r.admin_addr).collect();
    let (ok, text) = status_of(&admins);
    assert!(ok, "{text}");
    let header: Vec<&str> = text.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "CLIENT",
            "replica-1",
            "replica-2",
            "replica-3",
            "MISSING",
            "ON"
        ],
        "{text}"
    );
    let row = text.lines().find(|l| l.starts_with("edge-1")).unwrap();
    assert_eq!(
        row.split_whitespace().collect::<Vec<_>>(),
        ["edge-1", "1", "1", "1", "-"],
        "{text}"
    );

    // Streams through every replica, then kill -9 of replica 2 mid-transfer.
    let mut streams = Vec::new();
    for replica in &replicas {
        let mut stream = LiveStream::open(replica.forward_addrs[0]).await;
        stream.step().await.unwrap();
        streams.push(stream);
    }
    let before: Vec<Vec<u64>> = vec![
        sessions_on(replicas[0].admin_addr).await.1,
        sessions_on(replicas[2].admin_addr).await.1,
    ];
    let killed = replicas.remove(1);
    let mut killed_stream = streams.remove(1);
    killed.kill().await;
    // The stream through the dead replica fails with an error, never a clean end.
    let failed = tokio::time::timeout(WAIT, async {
        loop {
            if killed_stream.step().await.is_err() {
                return;
            }
        }
    })
    .await;
    assert!(
        failed.is_ok(),
        "the stream through the killed replica fails"
    );
    // The others keep moving, byte-exact, on the same sessions.
    for stream in &mut streams {
        for _ in 0..8 {
            stream.step().await.unwrap();
        }
    }
    wait_replicas(&mut agent, 2).await;
    // `tether status` over the three: the dead one is named, and the command fails.
    let (ok, text) = status_of(&admins);
    assert!(!ok, "{text}");
    assert!(
        text.contains(&format!("replica http://{}", admins[1])),
        "{text}"
    );
    assert!(text.contains("2 replicas answered of 3"), "{text}");
    let after: Vec<Vec<u64>> = vec![
        sessions_on(replicas[0].admin_addr).await.1,
        sessions_on(replicas[1].admin_addr).await.1,
    ];
    assert_eq!(before, after, "the sessions to the live replicas were kept");

    // Replica 2 comes back on the same address: the agent is back within a backoff step.
    let restarted = ServerProcess::start(&configs[1], 1).await;
    let up = tokio::time::Instant::now();
    wait_replicas(&mut agent, 3).await;
    let took = up.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "back on the restarted replica after {took:?} (max_delay 500ms)"
    );
    echo_exact(restarted.forward_addrs[0], 64 * 1024).await;
    for stream in &mut streams {
        stream.step().await.unwrap();
    }
    agent.stop().await.unwrap();
}

/// A TCP relay from `listener` to `upstream`: a second address of one replica, as a load
/// balancer in front of it would be.
async fn relay(listener: TcpListener, upstream: SocketAddr) {
    loop {
        let Ok((mut inbound, _)) = listener.accept().await else {
            return;
        };
        tokio::spawn(async move {
            if let Ok(mut outbound) = TcpStream::connect(upstream).await {
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            }
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_addresses_of_one_replica_keep_one_session() {
    let pki = TestPki::new();
    let (target, _echo) = echo_server().await;
    let port = common_port();
    let config = replica_yaml(&pki, 1, port, target);
    let replica = ServerProcess::start(&config, 1).await;
    let front = TcpListener::bind((loopback(2), 0)).await.unwrap();
    let front_port = front.local_addr().unwrap().port();
    let relay_task = tokio::spawn(relay(front, replica.tunnel_addr));
    let urls = vec![
        format!("wss://127.0.0.1:{port}/v1/connect"),
        format!("wss://127.0.0.2:{front_port}/v1/connect"),
    ];
    let mut agent = agent_with_servers(&pki, &urls, target);
    wait_replicas(&mut agent, 1).await;
    // The second address is found to reach the same replica and stays idle.
    let mut status = agent.status.clone();
    let reached = tokio::time::timeout(
        WAIT,
        status.wait_for(|s| s.replicas.values().any(|r| r.duplicate_of.is_some())),
    )
    .await
    .map(|reached| reached.map(drop));
    assert!(
        matches!(reached, Ok(Ok(_))),
        "a duplicate; {:#?}",
        agent.status.borrow().replicas
    );
    let first = sessions_on(replica.admin_addr).await.1;
    let deadline = tokio::time::Instant::now() + WAIT;
    let kept = loop {
        let (_, sessions) = sessions_on(replica.admin_addr).await;
        if sessions.len() == 1 {
            break sessions;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "one session on the replica in time: {sessions:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        first.contains(&kept[0]),
        "the first session was kept: {first:?} -> {kept:?}"
    );
    // Across three discovery rounds (1 s each) nothing flaps: still that one session, and it
    // carries traffic. (An observation window: "nothing happens" has no event to wait for.)
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(sessions_on(replica.admin_addr).await.1, kept);
    }
    assert_eq!(agent.status.borrow().connected_replicas(), 1);
    echo_exact(replica.forward_addrs[0], 64 * 1024).await;
    agent.stop().await.unwrap();
    relay_task.abort();
}

/// Whether this process may make mount namespaces (root, with `unshare` on PATH).
fn can_unshare() -> bool {
    let root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    root && std::process::Command::new("unshare")
        .args(["--mount", "true"])
        .status()
        .is_ok_and(|s| s.success())
}

/// `tether agent --config config` in a mount namespace of its own where `hosts` is bind-mounted
/// over /etc/hosts, so the system resolver answers from the test's file.
async fn agent_with_hosts_file(
    hosts: &std::path::Path,
    config: &std::path::Path,
) -> tether_e2e::process::AgentProcess {
    let mut command = tokio::process::Command::new("unshare");
    command
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(
            "mount --bind \"$0\" /etc/hosts && \
             exec \"$1\" --log-format json --log info agent --config \"$2\"",
        )
        .arg(hosts)
        .arg(tether_e2e::process::tether_binary())
        .arg(config);
    tether_e2e::process::AgentProcess::spawn(command).await
}

/// `tether_agent_replicas{state}` on an agent's `/metrics`.
async fn agent_replicas(admin: SocketAddr, state: &str) -> Option<f64> {
    let (_, body) = http_get(admin, "/metrics").await;
    tether_testkit::metrics::sample(
        &body,
        &format!("tether_agent_replicas{{state=\"{state}\"}}"),
    )
}

/// Waits until the agent reports `discovered` and `connected` replicas.
async fn wait_agent_replicas(admin: SocketAddr, discovered: f64, connected: f64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let now = (
            agent_replicas(admin, "discovered").await,
            agent_replicas(admin, "connected").await,
        );
        if now == (Some(discovered), Some(connected)) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "agent replicas (discovered, connected) = {now:?}, want ({discovered}, {connected})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The system resolver, reading a hosts file of the test's own (bind-mounted over /etc/hosts
/// in a mount namespace made for the agent alone), gives `replicas.test` the addresses of
/// the replicas: the agent connects to each; an address removed from the file is drained at
/// the next resolution, one added back is dialed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_with_several_addresses_is_a_replica_set() {
    if !can_unshare() {
        eprintln!("skipped: needs root and unshare(1) for a private /etc/hosts");
        return;
    }
    let pki = TestPki::new();
    let (target, _echo) = echo_server().await;
    let port = common_port();
    let mut replicas = Vec::new();
    for i in 1..=3 {
        replicas.push(ServerProcess::start(&replica_yaml(&pki, i, port, target), 1).await);
    }
    let hosts_for = |addrs: &[u8]| {
        let mut text = String::from("127.0.0.1 localhost\n");
        for i in addrs {
            text.push_str(&format!("127.0.0.{i} replicas.test\n"));
        }
        text
    };
    let hosts = pki.write_file("hosts", &hosts_for(&[1, 2, 3]));
    let cert = pki.agent("edge-1");
    let config = pki.write_file(
        "agent-dns.yaml",
        &format!(
            "version: 1\n\
             server_url: \"wss://replicas.test:{port}/v1/connect\"\n\
             server_name: localhost\n\
             tls: {{ cert: \"{}\", key: \"{}\", server_ca: \"{}\" }}\n\
             admin_listen: \"127.0.0.1:0\"\n\
             connect_timeout: 2s\n\
             reconnect: {{ min_delay: 50ms, max_delay: 500ms }}\n\
             discovery: {{ interval: 1s }}\n\
             policy:\n{}",
            cert.cert_path.display(),
            cert.key_path.display(),
            pki.ca_path().display(),
            allow_only(target),
        ),
    );
    let agent = agent_with_hosts_file(&hosts, &config).await;
    wait_agent_replicas(agent.admin_addr, 3.0, 3.0).await;
    for replica in &replicas {
        echo_exact(replica.forward_addrs[0], 64 * 1024).await;
    }

    // 127.0.0.3 leaves the name (written in place: the bind mount follows the inode).
    std::fs::write(&hosts, hosts_for(&[1, 2])).unwrap();
    wait_agent_replicas(agent.admin_addr, 2.0, 2.0).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while !sessions_on(replicas[2].admin_addr).await.1.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the session to the removed address is drained"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    echo_exact(replicas[0].forward_addrs[0], 64 * 1024).await;

    // It comes back: dialed after the next resolution.
    std::fs::write(&hosts, hosts_for(&[1, 2, 3])).unwrap();
    wait_agent_replicas(agent.admin_addr, 3.0, 3.0).await;
    echo_exact(replicas[2].forward_addrs[0], 64 * 1024).await;
    agent.kill().await;
}

/// server.yaml of replica `i` with its forward on a fixed port (consumers come back to the
/// same address after a restart).
fn replica_yaml_fixed(
    pki: &TestPki,
    i: u8,
    port: u16,
    forward_port: u16,
    target: SocketAddr,
) -> PathBuf {
    let path = replica_yaml(pki, i, port, target);
    let text = std::fs::read_to_string(&path).unwrap().replace(
        &format!("listen: \"127.0.0.{i}:0\", client"),
        &format!("listen: \"127.0.0.{i}:{forward_port}\", client"),
    );
    pki.write_file(&format!("replica-{i}-fixed.yaml"), &text)
}

/// What the load generator saw.
#[derive(Debug, Default)]
struct Load {
    completed: usize,
    refused_connects: usize,
    failures: Vec<String>,
    per_replica: [usize; 3],
}

/// Keeps sequence-checked streams going through the replicas marked ready, as a client of a
/// DNS round-robin name would: a refused connect tries the next replica.
async fn load_generator(
    worker: usize,
    forwards: [SocketAddr; 3],
    ready: std::sync::Arc<[std::sync::atomic::AtomicBool; 3]>,
    stop: tokio_util::sync::CancellationToken,
) -> Load {
    use std::sync::atomic::Ordering;
    let mut load = Load::default();
    let mut next = worker;
    while !stop.is_cancelled() {
        next = (next + 1) % 3;
        if !ready[next].load(Ordering::SeqCst) {
            continue;
        }
        let Ok(stream) = TcpStream::connect(forwards[next]).await else {
            load.refused_connects += 1;
            continue;
        };
        let mut live = LiveStream { stream, sent: 0 };
        let mut ok = true;
        // A stream lives about 400 ms (8 steps, 50 ms apart), so SIGTERM always finds some
        // in flight on the replica it stops: they must finish within its drain.
        for step in 0..8 {
            if step > 0 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            if let Err(err) = tokio::time::timeout(WAIT, live.step())
                .await
                .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
            {
                load.failures
                    .push(format!("replica {} step {step}: {err}", next + 1));
                ok = false;
                break;
            }
        }
        if ok {
            load.completed += 1;
            load.per_replica[next] += 1;
        }
    }
    load
}

/// A rolling restart of all three replicas (SIGTERM, wait for the exit, start, wait for the
/// agent to be back on it, next) while streams keep going: no stream loses or corrupts a
/// byte, and each replica exits well within its drain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_loses_nothing() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let pki = TestPki::new();
    let (target, _echo) = echo_server().await;
    let port = common_port();
    let forward_port = common_port();
    let configs: Vec<PathBuf> = (1..=3)
        .map(|i| replica_yaml_fixed(&pki, i, port, forward_port, target))
        .collect();
    let mut replicas = Vec::new();
    for config in &configs {
        replicas.push(Some(ServerProcess::start(config, 1).await));
    }
    let forwards: [SocketAddr; 3] =
        std::array::from_fn(|i| SocketAddr::new(loopback(i as u8 + 1), forward_port));
    let urls: Vec<String> = (1..=3)
        .map(|i| format!("wss://127.0.0.{i}:{port}/v1/connect"))
        .collect();
    let mut agent = agent_with_servers(&pki, &urls, target);
    wait_replicas(&mut agent, 3).await;

    let ready = Arc::new([
        AtomicBool::new(true),
        AtomicBool::new(true),
        AtomicBool::new(true),
    ]);
    let stop = tokio_util::sync::CancellationToken::new();
    let workers: Vec<_> = (0..4)
        .map(|w| tokio::spawn(load_generator(w, forwards, ready.clone(), stop.clone())))
        .collect();
    for i in 0..3 {
        // A load balancer takes the replica out first; streams already on it must finish.
        ready[i].store(false, Ordering::SeqCst);
        let replica = replicas[i].take().unwrap();
        let status = replica.terminate(Duration::from_secs(10)).await;
        assert!(status.success(), "replica {} exited with {status}", i + 1);
        replicas[i] = Some(ServerProcess::start(&configs[i], 1).await);
        wait_replicas(&mut agent, 3).await;
        ready[i].store(true, Ordering::SeqCst);
    }
    stop.cancel();
    let mut total = Load::default();
    for worker in workers {
        let load = worker.await.unwrap();
        total.completed += load.completed;
        total.refused_connects += load.refused_connects;
        total.failures.extend(load.failures);
        for r in 0..3 {
            total.per_replica[r] += load.per_replica[r];
        }
    }
    eprintln!("rolling restart load: {total:?}");
    assert!(total.failures.is_empty(), "streams failed: {total:#?}");
    assert!(
        total.per_replica.iter().all(|n| *n > 0),
        "every replica carried streams: {total:?}"
    );
    agent.stop().await.unwrap();
}

/// An agent with `placement.replicas_per_agent: 2` among four replicas: sessions to exactly
/// its two top-ranked replicas (the ranking every replica computes too); a kill of its first
/// replica brings in the third-ranked within a backoff step; the first one's return takes the
/// agent back, and the stand-in is drained only once the returning session is up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_with_k_of_n_placement_holds_its_top_ranked_replicas() {
    let pki = TestPki::new();
    let (target, _echo) = echo_server().await;
    let port = common_port_on(4);
    let configs: Vec<PathBuf> = (1..=4)
        .map(|i| replica_yaml(&pki, i, port, target))
        .collect();
    let mut replicas = Vec::new();
    for config in &configs {
        replicas.push(Some(ServerProcess::start(config, 1).await));
    }
    let members: Vec<String> = (1..=4).map(|i| format!("127.0.0.{i}:{port}")).collect();
    let ranked = ranking("edge-1", 4);
    let urls: Vec<String> = members
        .iter()
        .map(|m| format!("wss://{m}/v1/connect"))
        .collect();
    let agent = agent_with_servers_and(
        &pki,
        &urls,
        target,
        "placement: { replicas_per_agent: 2 }\n",
    );
    wait_connected_to(&agent, &members, [ranked[0], ranked[1]]).await;
    for (i, replica) in replicas.iter().enumerate() {
        let replica = replica.as_ref().unwrap();
        let (_, sessions) = sessions_on(replica.admin_addr).await;
        let placed = i == ranked[0] || i == ranked[1];
        assert_eq!(sessions.len(), usize::from(placed), "replica {i}");
        if placed {
            echo_exact(replica.forward_addrs[0], 64 * 1024).await;
        }
    }
    tether_testkit::eventually("tether_agent_replicas{state=placed} 2", || {
        metric(
            &agent.registry,
            "tether_agent_replicas",
            &[("state", "placed")],
        ) == Some(2.0)
    })
    .await;

    // Its first replica dies: the third-ranked stands in, the second keeps its session.
    let (_, kept_before) = sessions_on(replicas[ranked[1]].as_ref().unwrap().admin_addr).await;
    replicas[ranked[0]].take().unwrap().kill().await;
    let died = tokio::time::Instant::now();
    wait_connected_to(&agent, &members, [ranked[1], ranked[2]]).await;
    let took = died.elapsed();
    assert!(took < Duration::from_secs(5), "stand-in after {took:?}");
    let (_, kept_after) = sessions_on(replicas[ranked[1]].as_ref().unwrap().admin_addr).await;
    assert_eq!(
        kept_before, kept_after,
        "the second replica's session was kept"
    );
    echo_exact(
        replicas[ranked[2]].as_ref().unwrap().forward_addrs[0],
        64 * 1024,
    )
    .await;
    assert_eq!(
        metric(&agent.registry, "tether_agent_placement_moves_total", &[]),
        Some(0.0)
    );

    // It returns: the agent goes back to it, then drains the stand-in.
    replicas[ranked[0]] = Some(ServerProcess::start(&configs[ranked[0]], 1).await);
    wait_connected_to(&agent, &members, [ranked[0], ranked[1]]).await;
    tether_testkit::eventually("one placement move", || {
        metric(&agent.registry, "tether_agent_placement_moves_total", &[]) == Some(1.0)
    })
    .await;
    let stand_in = replicas[ranked[2]].as_ref().unwrap().admin_addr;
    let deadline = tokio::time::Instant::now() + WAIT;
    while !sessions_on(stand_in).await.1.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stand-in drained its session"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    agent.stop().await.unwrap();
}

/// Which of `members` the agent has a session to (their indices).
fn connected_indices(
    status: &tether_agent::AgentStatus,
    members: &[String],
) -> std::collections::BTreeSet<usize> {
    status
        .replicas
        .iter()
        .filter(|(_, r)| r.connected)
        .filter_map(|(key, _)| members.iter().position(|m| key.contains(m.as_str())))
        .collect()
}

/// Waits until the agent's sessions go to exactly the members `want`.
async fn wait_connected_to(agent: &TestAgent, members: &[String], want: [usize; 2]) {
    let want: std::collections::BTreeSet<usize> = want.into();
    let mut status = agent.status.clone();
    let reached = tokio::time::timeout(
        WAIT,
        status.wait_for(|s| connected_indices(s, members) == want),
    )
    .await
    .map(|reached| reached.map(drop));
    assert!(
        matches!(reached, Ok(Ok(_))),
        "sessions to exactly {want:?}; now {:?}",
        connected_indices(&agent.status.borrow(), members)
    );
}

/// Which of `members` an agent's `/v1/status` lists as (connected, placed).
async fn placement_of(admin: SocketAddr, members: &[String]) -> (Vec<bool>, Vec<bool>) {
    let (status, body) = http_get(admin, "/v1/status").await;
    assert_eq!(status, 200, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    let replicas = json["replicas"].as_object().unwrap();
    let flag = |member: &String, name: &str| {
        replicas
            .iter()
            .any(|(key, r)| key.contains(&format!("({member})")) && r[name] == true)
    };
    (
        members.iter().map(|m| flag(m, "connected")).collect(),
        members.iter().map(|m| flag(m, "placed")).collect(),
    )
}

/// Polls the agent's status until `check(connected, placed)` holds.
async fn wait_placement(
    admin: SocketAddr,
    members: &[String],
    what: &str,
    check: impl Fn(&[bool], &[bool]) -> bool,
) -> (Vec<bool>, Vec<bool>) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (connected, placed) = placement_of(admin, members).await;
        if check(&connected, &placed) {
            return (connected, placed);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: connected {connected:?}, placed {placed:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A replica joins the name (hosts file in the agent's own mount namespace) and ranks first
/// for the agent (k = 2): the agent dials it, and keeps the session it is about to give up
/// until the new one is up (make before break). The new replica sits behind a relay that
/// holds connections until the test lets them through, so "placed but not yet connected"
/// is a state the test can observe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joining_replica_takes_over_only_once_its_session_is_up() {
    if !can_unshare() {
        eprintln!("skipped: needs root and unshare(1) for a private /etc/hosts");
        return;
    }
    let pki = TestPki::new();
    let (target, _echo) = echo_server().await;
    let port = common_port_on(5);
    let members: Vec<String> = (1..=4).map(|i| format!("127.0.0.{i}:{port}")).collect();
    let ranked = ranking("edge-1", 4);
    let joiner = ranked[0];
    let mut replicas = std::collections::BTreeMap::new();
    for i in (0..4).filter(|i| *i != joiner) {
        let n = u8::try_from(i + 1).unwrap();
        let process = ServerProcess::start(&replica_yaml(&pki, n, port, target), 1).await;
        replicas.insert(i, process);
    }
    let hosts_for = |indices: &[usize]| {
        let mut text = String::from("127.0.0.1 localhost\n");
        for i in indices {
            text.push_str(&format!("127.0.0.{} replicas.test\n", i + 1));
        }
        text
    };
    let others: Vec<usize> = (0..4).filter(|i| *i != joiner).collect();
    let hosts = pki.write_file("hosts", &hosts_for(&others));
    let cert = pki.agent("edge-1");
    let config = pki.write_file(
        "agent-join.yaml",
        &format!(
            "version: 1\n\
             server_url: \"wss://replicas.test:{port}/v1/connect\"\n\
             server_name: localhost\n\
             tls: {{ cert: \"{}\", key: \"{}\", server_ca: \"{}\" }}\n\
             admin_listen: \"127.0.0.1:0\"\n\
             connect_timeout: 10s\n\
             reconnect: {{ min_delay: 50ms, max_delay: 500ms }}\n\
             discovery: {{ interval: 1s }}\n\
             placement: {{ replicas_per_agent: 2 }}\n\
             policy:\n{}",
            cert.cert_path.display(),
            cert.key_path.display(),
            pki.ca_path().display(),
            allow_only(target),
        ),
    );
    let agent = agent_with_hosts_file(&hosts, &config).await;
    let (stand_in, second) = (ranked[2], ranked[1]);
    wait_placement(
        agent.admin_addr,
        &members,
        "on the top two of three",
        |c, _| c[stand_in] && c[second] && c.iter().filter(|x| **x).count() == 2,
    )
    .await;

    // The joiner: replica 5 behind a relay on the joining address that holds connections.
    let upstream = ServerProcess::start(&replica_yaml(&pki, 5, port, target), 1).await;
    let front = TcpListener::bind(&members[joiner]).await.unwrap();
    let (open, gate) = tokio::sync::watch::channel(false);
    let upstream_addr = upstream.tunnel_addr;
    let relay_task = tokio::spawn(async move {
        let mut held = tokio::task::JoinSet::new();
        while let Ok((mut inbound, _)) = front.accept().await {
            let mut gate = gate.clone();
            held.spawn(async move {
                if gate.wait_for(|open| *open).await.is_ok() {
                    if let Ok(mut outbound) = TcpStream::connect(upstream_addr).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                }
            });
        }
    });
    std::fs::write(&hosts, hosts_for(&[0, 1, 2, 3])).unwrap();
    let (connected, _) = wait_placement(
        agent.admin_addr,
        &members,
        "the joiner is placed",
        |_, p| p[joiner],
    )
    .await;
    assert!(
        connected[stand_in] && connected[second] && !connected[joiner],
        "the stand-in keeps its session while the joiner's is not up: {connected:?}"
    );
    assert_eq!(
        sessions_on(replicas[&stand_in].admin_addr).await.1.len(),
        1,
        "the stand-in replica still holds the agent"
    );

    // Let the joiner's handshake through: the agent moves, then drains the stand-in.
    open.send(true).unwrap();
    wait_placement(
        agent.admin_addr,
        &members,
        "on the joiner and the second",
        |c, p| c[joiner] && c[second] && !c[stand_in] && !p[stand_in],
    )
    .await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while !sessions_on(replicas[&stand_in].admin_addr)
        .await
        .1
        .is_empty()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stand-in drained"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    echo_exact(upstream.forward_addrs[0], 64 * 1024).await;
    agent.kill().await;
    relay_task.abort();
}

/// The indices of 127.0.0.1 to 127.0.0.`n` in `agent`'s placement ranking (the replicas' IP
/// addresses are the keys).
fn ranking(agent: &str, n: u8) -> Vec<usize> {
    let keys: Vec<String> = (1..=n).map(|i| format!("127.0.0.{i}")).collect();
    tether_common::placement::rank(agent, &keys)
        .into_iter()
        .map(|k| keys.iter().position(|x| x == k).unwrap())
        .collect()
}
