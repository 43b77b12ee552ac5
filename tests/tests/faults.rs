//! Fault injection over network namespaces, with the real `tether server` and `tether agent`
//! binaries each in its own namespace (`tether_e2e::netns`): a black-holed link mid-transfer,
//! 50 ms RTT with 1 % loss, closed versus filtered ports, and a partition that heals while
//! consumers keep dialing. Faults are `nft` rules in the agent's namespace; latency comes from
//! a delay relay in the test (`tether_e2e::delay_relay`), because this kernel has no `netem`.
//!
//! Needs root (CI and the dev machine run as root); without `ip netns` each test says why and
//! passes without running. Every wait polls a condition with a deadline; the namespaces and
//! daemons are removed by drop guards, also when an assertion fails.

#![allow(clippy::unwrap_used)] // test helpers panic on failure by design

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tether_e2e::delay_relay::DelayRelay;
use tether_e2e::http::get;
use tether_e2e::netns::{Daemon, Topology, unavailable};
use tether_e2e::tether_testkit::TestPki;
use tether_testkit::metrics::{family_sum, sample};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::{Instant, timeout};

const TUNNEL_PORT: u16 = 7443;
const SERVER_ADMIN: u16 = 9091;
const AGENT_ADMIN: u16 = 9092;
const ECHO_FORWARD: u16 = 8001;
const CLOSED_FORWARD: u16 = 8002;
const FILTERED_FORWARD: u16 = 8003;
/// Both daemons' `session.idle_timeout`, `dial_timeout` and the agent's `connect_timeout`.
const IDLE: Duration = Duration::from_secs(2);
const DIAL: Duration = Duration::from_secs(2);
const CONNECT: Duration = Duration::from_secs(2);
/// The agent's `reconnect.max_delay`: one backoff step at most.
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Scheduling slack on a shared 2-core machine, added to every timing bound.
const SLACK: Duration = Duration::from_millis(1500);
const WAIT: Duration = Duration::from_secs(30);

/// Skips (passes with a message) when namespaces cannot be made here.
macro_rules! require_netns {
    () => {
        if let Some(why) = unavailable() {
            eprintln!("SKIPPED: fault-injection tests need `ip netns` and nft: {why}");
            return;
        }
    };
}

// === the rig ===

/// Targets in the test's namespace, reachable by the agent.
struct Targets {
    echo: SocketAddr,
    /// Nothing listens: the root namespace answers with a RST.
    closed: SocketAddr,
    /// Nothing listens, and the agent's SYNs to it are dropped.
    filtered: SocketAddr,
    _echo: JoinSet<()>,
}

/// An echo server on `addr`: echoes until EOF, then passes the EOF on.
async fn echo_on(addr: SocketAddr) -> (SocketAddr, JoinSet<()>) {
    let listener = TcpListener::bind(addr).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut tasks = JoinSet::new();
    tasks.spawn(async move {
        let mut conns = JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let Ok((mut tcp, _)) = accepted else { continue };
                    conns.spawn(async move {
                        let (mut rd, mut wr) = tcp.split();
                        if tokio::io::copy(&mut rd, &mut wr).await.is_ok() {
                            let _ = wr.shutdown().await;
                        }
                    });
                }
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
    });
    (addr, tasks)
}

/// A port of `ip` that nothing listens on (bound, then released).
async fn free_port(ip: std::net::Ipv4Addr) -> SocketAddr {
    TcpListener::bind((ip, 0))
        .await
        .unwrap()
        .local_addr()
        .unwrap()
}

impl Targets {
    async fn start(topo: &Topology) -> Self {
        let (echo, tasks) = echo_on(topo.root_for_agent(0)).await;
        let closed = free_port(topo.root_agent.a).await;
        let filtered = free_port(topo.root_agent.a).await;
        topo.filter_port(filtered.port()).unwrap();
        Self {
            echo,
            closed,
            filtered,
            _echo: tasks,
        }
    }
}

fn server_yaml(pki: &TestPki, targets: &Targets) -> String {
    let forward = |name: &str, port: u16, target: SocketAddr| {
        format!(
            "  - {{ name: {name}, listen: \"0.0.0.0:{port}\", client: edge-1, target: \"{target}\" }}\n"
        )
    };
    format!(
        "version: 1\n\
         listen: \"0.0.0.0:{TUNNEL_PORT}\"\n\
         admin_listen: \"0.0.0.0:{SERVER_ADMIN}\"\n\
         tls: {{ cert: \"{}\", key: \"{}\", client_ca: \"{}\" }}\n\
         handshake_timeout: 2s\n\
         dial_timeout: {}s\n\
         drain_timeout: 1s\n\
         session: {{ ping_interval: 250ms, idle_timeout: {}s }}\n\
         forwards:\n{}{}{}",
        pki.server_cert_path().display(),
        pki.server_key_path().display(),
        pki.ca_path().display(),
        DIAL.as_secs(),
        IDLE.as_secs(),
        forward("echo", ECHO_FORWARD, targets.echo),
        forward("closed", CLOSED_FORWARD, targets.closed),
        forward("filtered", FILTERED_FORWARD, targets.filtered),
    )
}

fn agent_yaml(pki: &TestPki, server: SocketAddr, admin_port: u16, allow: &str) -> String {
    let cert = pki.agent("edge-1");
    format!(
        "version: 1\n\
         server_url: \"wss://{server}/v1/connect\"\n\
         server_name: localhost\n\
         tls: {{ cert: \"{}\", key: \"{}\", server_ca: \"{}\" }}\n\
         admin_listen: \"0.0.0.0:{admin_port}\"\n\
         connect_timeout: {}s\n\
         dial_timeout: {}s\n\
         reconnect: {{ min_delay: 100ms, max_delay: {}ms }}\n\
         session: {{ ping_interval: 250ms, idle_timeout: {}s }}\n\
         policy:\n  allow:\n    - {{ cidrs: [\"{allow}/32\"] }}\n",
        cert.cert_path.display(),
        cert.key_path.display(),
        pki.ca_path().display(),
        CONNECT.as_secs(),
        DIAL.as_secs(),
        BACKOFF_MAX.as_millis(),
        IDLE.as_secs(),
    )
}

/// Server and agent daemons in their namespaces, and the targets. Field order is drop order:
/// the daemons die before the namespaces go.
struct Rig {
    agent: Daemon,
    server: Daemon,
    _targets: Targets,
    _pki: TestPki,
    topo: Topology,
}

impl Rig {
    /// Starts everything; the agent dials the server directly (`via` = `None`) or through
    /// `via` (a relay), and the rig waits until a byte echoes through the tunnel.
    async fn start(topo: Topology, via: Option<SocketAddr>) -> Self {
        let pki = TestPki::new();
        let targets = Targets::start(&topo).await;
        let server_config = write(&pki, "server.yaml", &server_yaml(&pki, &targets));
        let server = Daemon::start(&topo.server, "server", &server_config).unwrap();
        let tunnel = via.unwrap_or(SocketAddr::from((topo.server_agent.a, TUNNEL_PORT)));
        let agent_config = write(
            &pki,
            "agent.yaml",
            &agent_yaml(&pki, tunnel, AGENT_ADMIN, &topo.root_agent.a.to_string()),
        );
        let agent = Daemon::start(&topo.agent, "agent", &agent_config).unwrap();
        let rig = Self {
            agent,
            server,
            _targets: targets,
            _pki: pki,
            topo,
        };
        rig.until("a byte echoes through the tunnel", WAIT, || async {
            echo_once(rig.forward(ECHO_FORWARD)).await.is_ok()
        })
        .await;
        rig
    }

    fn forward(&self, port: u16) -> SocketAddr {
        self.topo.server_from_root(port)
    }

    async fn server_metric(&self, series: &str) -> Option<f64> {
        scrape(self.topo.server_from_root(SERVER_ADMIN), series).await
    }

    async fn agent_metric(&self, series: &str) -> Option<f64> {
        scrape(self.topo.agent_from_root(AGENT_ADMIN), series).await
    }

    /// Polls `cond` every 50 ms until it holds; fails after `limit` with both daemons' logs.
    async fn until<F, Fut>(&self, what: &str, limit: Duration, mut cond: F) -> Duration
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let start = Instant::now();
        loop {
            if cond().await {
                return start.elapsed();
            }
            if start.elapsed() > limit {
                panic!(
                    "timed out after {limit:?} waiting for {what}\n--- server log\n{}\n--- agent log\n{}",
                    tail(&self.server.log()),
                    tail(&self.agent.log())
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn agent_connected(&self) -> bool {
        self.agent_metric("tether_agent_connected").await == Some(1.0)
    }

    async fn server_agents(&self) -> Option<f64> {
        self.server_metric("tether_agents_connected").await
    }
}

fn write(pki: &TestPki, name: &str, text: &str) -> PathBuf {
    pki.write_file(name, text)
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// One series of a daemon's `/metrics` (a family sum when `series` ends in `{}`).
async fn scrape(admin: SocketAddr, series: &str) -> Option<f64> {
    let response = timeout(Duration::from_secs(2), get(admin, "/metrics"))
        .await
        .ok()?
        .ok()?;
    match series.strip_suffix("{}") {
        Some(family) => Some(family_sum(&response.body, family)),
        None => sample(&response.body, series),
    }
}

/// One byte through a forward and back.
async fn echo_once(forward: SocketAddr) -> std::io::Result<Duration> {
    let start = Instant::now();
    let attempt = async {
        let mut tcp = TcpStream::connect(forward).await?;
        tcp.write_all(b"?").await?;
        let mut byte = [0u8; 1];
        tcp.read_exact(&mut byte).await?;
        Ok::<_, std::io::Error>(start.elapsed())
    };
    timeout(Duration::from_secs(5), attempt)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

/// The byte at `offset` of a transfer: position-dependent, so that a lost, repeated or
/// reordered chunk is caught.
fn pattern(offset: u64) -> u8 {
    let x = offset.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (x >> 56) as u8 ^ (offset as u8)
}

/// Sends `len` pattern bytes through `forward`, half-closes, and checks the echo byte for byte
/// until EOF. Returns the elapsed time.
async fn transfer(forward: SocketAddr, len: u64) -> Duration {
    let start = Instant::now();
    let tcp = TcpStream::connect(forward).await.unwrap();
    let (mut rd, mut wr) = tcp.into_split();
    let writer = tokio::spawn(async move {
        let mut offset = 0u64;
        let mut chunk = Vec::with_capacity(64 * 1024);
        while offset < len {
            chunk.clear();
            let n = (len - offset).min(64 * 1024);
            chunk.extend((offset..offset + n).map(pattern));
            wr.write_all(&chunk).await.unwrap();
            offset += n;
        }
        wr.shutdown().await.unwrap();
    });
    let mut received = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = rd.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        for (i, byte) in buf[..n].iter().enumerate() {
            let offset = received + i as u64;
            assert_eq!(*byte, pattern(offset), "byte {offset} of {len} differs");
        }
        received += n as u64;
    }
    writer.await.unwrap();
    assert_eq!(received, len, "echo length");
    start.elapsed()
}

// === the tests ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blackholed_link_is_detected_by_both_sides_and_the_agent_is_back_after_the_heal() {
    require_netns!();
    let rig = Rig::start(Topology::create().unwrap(), None).await;
    assert_eq!(rig.server_agents().await, Some(1.0));

    // A transfer in flight: the consumer writes and reads the echo. The writer stops (keeping
    // its half open) just before the fault, so that the reader is the only one to meet the
    // socket's error: a reset is reported once, to whichever call comes first.
    let tcp = TcpStream::connect(rig.forward(ECHO_FORWARD)).await.unwrap();
    let (mut rd, mut wr) = tcp.into_split();
    let stop = tokio_util::sync::CancellationToken::new();
    let writer = tokio::spawn({
        let stop = stop.clone();
        async move {
            let chunk = vec![0xA5u8; 16 * 1024];
            while !stop.is_cancelled() {
                wr.write_all(&chunk).await.unwrap();
            }
            wr
        }
    });
    let mut buf = vec![0u8; 64 * 1024];
    let mut echoed = 0usize;
    while echoed < 1 << 20 {
        let n = rd.read(&mut buf).await.unwrap();
        assert!(n > 0, "echo ended before the fault");
        echoed += n;
    }
    stop.cancel();
    let _write_half = writer.await.unwrap();

    let cut = Instant::now();
    rig.topo.blackhole().unwrap();
    // Dead-peer detection within 10 % past the idle timeout (plus polling and scheduling).
    let detect = IDLE + IDLE / 10 + SLACK;
    rig.until("the agent to declare the session dead", detect, || async {
        rig.agent_metric("tether_agent_connected").await == Some(0.0)
    })
    .await;
    let agent_saw = cut.elapsed();
    rig.until(
        "the server to drop the session",
        detect.saturating_sub(agent_saw),
        || async { rig.server_agents().await == Some(0.0) },
    )
    .await;
    let server_saw = cut.elapsed();
    eprintln!("dead session detected: agent after {agent_saw:?}, server after {server_saw:?}");

    // The consumer gets an error, never a clean EOF (its stream was cut, not finished).
    let end = timeout(WAIT, async {
        loop {
            match rd.read(&mut buf).await {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(err) => return Err(err),
            }
        }
    })
    .await
    .expect("the consumer's stream ends in time");
    assert!(end.is_err(), "the consumer saw a clean EOF on a cut stream");

    rig.topo.heal().unwrap();
    // A connect attempt in flight at the heal may need its SYN retransmitted (1 s) or to time
    // out (connect_timeout), then one backoff step.
    let back = rig
        .until(
            "the agent to reconnect after the heal",
            CONNECT + BACKOFF_MAX + SLACK,
            || async { rig.agent_connected().await && rig.server_agents().await == Some(1.0) },
        )
        .await;
    eprintln!("reconnected {back:?} after the heal");
    echo_once(rig.forward(ECHO_FORWARD)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_stay_byte_exact_over_50ms_rtt_with_one_percent_loss() {
    require_netns!();
    let topo = Topology::create().unwrap();
    // The agent reaches the server only through the relay: 25 ms each way.
    let relay = DelayRelay::start(
        topo.root_for_agent(0),
        topo.server_from_root(TUNNEL_PORT),
        Duration::from_millis(25),
    )
    .await
    .unwrap();
    topo.loss_on_root_link(relay.addr().port(), 1).unwrap();
    let rig = Rig::start(topo, Some(relay.addr())).await;

    let rtt = echo_once(rig.forward(ECHO_FORWARD)).await.unwrap();
    assert!(
        rtt >= Duration::from_millis(50),
        "a round trip through the relay took {rtt:?}"
    );
    let sizes: [u64; 7] = [0, 1, 1000, 64 << 10, 1 << 20, 16 << 20, 64 << 20];
    for len in sizes {
        let took = transfer(rig.forward(ECHO_FORWARD), len).await;
        let mib_s = (len as f64 / (1 << 20) as f64) / took.as_secs_f64();
        eprintln!("{len} B echoed byte-exact in {took:?} ({mib_s:.2} MiB/s each way)");
    }
    let dropped = rig.topo.dropped_packets().unwrap();
    eprintln!("nft dropped {dropped} packets of the tunnel");
    assert!(dropped > 0, "the loss rule never dropped a packet");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_server_port_fails_fast_and_a_filtered_one_times_out_both_retried() {
    require_netns!();
    let topo = Topology::create().unwrap();
    let pki = TestPki::new();
    // No server runs: port 7444 answers with a RST, 7445 drops the agent's SYNs.
    topo.filter_port(7445).unwrap();
    let closed = SocketAddr::from((topo.server_agent.a, 7444));
    let filtered = SocketAddr::from((topo.server_agent.a, 7445));
    let allow = topo.root_agent.a.to_string();
    let closed_cfg = write(&pki, "closed.yaml", &agent_yaml(&pki, closed, 9093, &allow));
    let filtered_cfg = write(
        &pki,
        "filtered.yaml",
        &agent_yaml(&pki, filtered, 9094, &allow),
    );
    let started = Instant::now();
    let closed_agent = Daemon::start(&topo.agent, "agent", &closed_cfg).unwrap();
    let filtered_agent = Daemon::start(&topo.agent, "agent", &filtered_cfg).unwrap();
    let failures = |port: u16, reason: &'static str| {
        let admin = topo.agent_from_root(port);
        async move {
            scrape(
                admin,
                &format!("tether_agent_connect_failures_total{{reason=\"{reason}\"}}"),
            )
            .await
            .unwrap_or(0.0)
        }
    };

    // Closed: refused at once, retried with backoff (several refusals within a few steps).
    let deadline = Instant::now() + WAIT;
    while failures(9093, "tcp").await < 3.0 {
        assert!(
            Instant::now() < deadline,
            "no repeated refusals\n{}",
            tail(&closed_agent.log())
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let refused_in = started.elapsed();
    assert_eq!(
        failures(9093, "timeout").await,
        0.0,
        "a RST counted as a timeout"
    );
    eprintln!("3 refusals within {refused_in:?}");

    // Filtered: each attempt waits out connect_timeout, is reported as a timeout, is retried.
    let deadline = Instant::now() + WAIT;
    while failures(9094, "timeout").await < 2.0 {
        assert!(
            Instant::now() < deadline,
            "no repeated timeouts\n{}",
            tail(&filtered_agent.log())
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let timed_out_in = started.elapsed();
    assert!(
        timed_out_in >= CONNECT * 2,
        "2 timeouts after {timed_out_in:?}, under two connect_timeouts"
    );
    assert_eq!(
        failures(9094, "tcp").await,
        0.0,
        "a drop counted as a refusal"
    );
    eprintln!("2 timeouts within {timed_out_in:?}");
    closed_agent.kill().await;
    filtered_agent.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_target_is_refused_fast_and_a_filtered_one_times_out_as_such() {
    require_netns!();
    let rig = Rig::start(Topology::create().unwrap(), None).await;
    let dials = |outcome: &'static str| {
        let rig = &rig;
        async move {
            rig.agent_metric(&format!(
                "tether_agent_dials_total{{outcome=\"{outcome}\"}}"
            ))
            .await
            .unwrap_or(0.0)
        }
    };

    let start = Instant::now();
    assert!(echo_once(rig.forward(CLOSED_FORWARD)).await.is_err());
    let refused_in = start.elapsed();
    assert!(
        refused_in < Duration::from_secs(1) + SLACK,
        "a closed target took {refused_in:?} to fail"
    );
    assert_eq!(dials("refused").await, 1.0);

    let start = Instant::now();
    assert!(echo_once(rig.forward(FILTERED_FORWARD)).await.is_err());
    let timed_out_in = start.elapsed();
    assert!(
        timed_out_in >= DIAL && timed_out_in < DIAL + Duration::from_secs(2) + SLACK,
        "a filtered target failed after {timed_out_in:?} (dial_timeout {DIAL:?})"
    );
    rig.until(
        "the dial counted as timed out",
        Duration::from_secs(2),
        || async { dials("timed_out").await == 1.0 },
    )
    .await;
    eprintln!("closed target refused in {refused_in:?}, filtered timed out in {timed_out_in:?}");
    assert_eq!(
        dials("refused").await,
        1.0,
        "the filtered target counted as refused"
    );
}

/// How one consumer dial ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dial {
    Echoed,
    Failed,
}

/// Dials `forward` every 100 ms until `stop`; each dial must end (echo, error or EOF) within
/// `bound`, or the test fails: nothing hangs.
async fn keep_dialing(
    forward: SocketAddr,
    bound: Duration,
    stop: tokio_util::sync::CancellationToken,
) -> Vec<(Instant, Dial)> {
    let mut dials = JoinSet::new();
    while !stop.is_cancelled() {
        dials.spawn(async move {
            let at = Instant::now();
            let attempt = async {
                let mut tcp = TcpStream::connect(forward).await?;
                tcp.write_all(b"?").await?;
                let mut byte = [0u8; 1];
                tcp.read_exact(&mut byte).await?;
                Ok::<_, std::io::Error>(())
            };
            match timeout(bound, attempt).await {
                Ok(Ok(())) => (at, Dial::Echoed),
                Ok(Err(_)) => (at, Dial::Failed),
                Err(_) => panic!("a dial at {at:?} neither succeeded nor failed within {bound:?}"),
            }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut outcomes = Vec::new();
    while let Some(done) = dials.join_next().await {
        outcomes.push(done.unwrap());
    }
    outcomes.sort_by_key(|(at, _)| *at);
    outcomes
}

/// What the server reports about its streams and resources.
async fn server_rest(rig: &Rig) -> (f64, f64, f64, f64, f64) {
    let m = |s: &'static str| async move { rig.server_metric(s).await.unwrap_or(f64::NAN) };
    (
        m("tether_streams_opened_total").await,
        m("tether_streams_closed_total{}").await,
        m("tether_streams_active").await,
        m("process_open_fds").await,
        m("tether_runtime_alive_tasks").await,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_that_heals_under_dialing_consumers_leaves_nothing_behind() {
    require_netns!();
    let rig = Rig::start(Topology::create().unwrap(), None).await;
    let (_, _, _, fds_before, tasks_before) = server_rest(&rig).await;

    // A dial to a dead session fails by its OPEN deadline (dial_timeout plus the server's
    // grace) at the latest; everything else is immediate.
    let bound = DIAL + Duration::from_secs(5) + SLACK;
    let stop = tokio_util::sync::CancellationToken::new();
    let dialing = tokio::spawn(keep_dialing(rig.forward(ECHO_FORWARD), bound, stop.clone()));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let cut = Instant::now();
    rig.topo.blackhole().unwrap();
    rig.until(
        "the server to drop the session",
        IDLE + SLACK * 2,
        || async { rig.server_agents().await == Some(0.0) },
    )
    .await;
    // Dials while no session exists.
    tokio::time::sleep(Duration::from_secs(1)).await;
    rig.topo.heal().unwrap();
    let healed = Instant::now();
    rig.until(
        "the session to come back",
        CONNECT + BACKOFF_MAX + SLACK,
        || async { rig.server_agents().await == Some(1.0) },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.cancel();
    let outcomes = dialing.await.unwrap();

    let before = outcomes.iter().filter(|(at, _)| *at < cut);
    assert!(
        before.clone().all(|(_, d)| *d == Dial::Echoed) && before.count() > 0,
        "dials before the partition: {outcomes:?}"
    );
    assert!(
        outcomes
            .iter()
            .any(|(at, d)| *at > cut && *at < healed && *d == Dial::Failed),
        "no dial failed during the partition: {outcomes:?}"
    );
    let last = outcomes.last().unwrap();
    assert_eq!(last.1, Dial::Echoed, "dials after the heal: {outcomes:?}");

    // Nothing leaked: every stream closed, fds and tasks back to where they were.
    rig.until(
        "the server's streams and resources at rest",
        WAIT,
        || async {
            let (opened, closed, active, fds, tasks) = server_rest(&rig).await;
            opened == closed && active == 0.0 && fds <= fds_before && tasks <= tasks_before + 5.0
        },
    )
    .await;
    rig.until("the agent's streams at rest", WAIT, || async {
        let opened = rig.agent_metric("tether_streams_opened_total").await;
        let closed = rig.agent_metric("tether_streams_closed_total{}").await;
        let active = rig.agent_metric("tether_streams_active").await;
        opened.is_some() && opened == closed && active == Some(0.0)
    })
    .await;
}
