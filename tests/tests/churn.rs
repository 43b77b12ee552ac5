//! Churn: 100 agents (10 agent ids, 10 instances each) connect, shut down and die at random for
//! 30 s (`TETHER_CHURN_SECS` to change it) while a load generator dials through every client's
//! forward. No panic; every dial either echoes exactly or fails with a reset (never a clean EOF,
//! a wrong byte or a hang); afterwards the registry, `/v1/clients` and the metrics agree with
//! the agents actually running, and all read zero once they are gone.

#![allow(clippy::unwrap_used)] // test helpers panic on failure by design

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tether_e2e::tether_testkit::{AgentCert, TestPki, echo_server};
use tether_e2e::{ForwardSpec, TestAgent, TestServer, allow_only};
use tether_testkit::eventually;
use tether_testkit::metrics::{metric_or_zero, metric_sum};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::Instant;

const CLIENTS: usize = 10;
const INSTANCES: usize = 10;
const LOAD_WORKERS: usize = 6;
/// A dial that neither echoes nor fails within this counts as a hang.
const DIAL_LIMIT: Duration = Duration::from_secs(10);

#[derive(Default)]
struct Outcomes {
    ok: AtomicU64,
    /// Failed with an error the consumer can see (reset, refused, broken pipe).
    clear_error: AtomicU64,
    /// Clean EOF before the echo, wrong bytes, or a hang: never acceptable.
    bad: AtomicU64,
}

/// One dial through `forward`: 32 random bytes out, the same 32 back.
async fn dial_once(forward: SocketAddr, outcomes: &Outcomes) {
    let payload: Vec<u8> = (0..32).map(|_| fastrand::u8(..)).collect();
    let attempt = async {
        let mut tcp = TcpStream::connect(forward).await?;
        tcp.write_all(&payload).await?;
        let mut back = vec![0u8; payload.len()];
        let mut read = 0;
        while read < back.len() {
            match tcp.read(&mut back[read..]).await? {
                0 => return Ok(false), // clean EOF: a silent failure
                n => read += n,
            }
        }
        Ok::<_, std::io::Error>(back == payload)
    };
    match tokio::time::timeout(DIAL_LIMIT, attempt).await {
        Ok(Ok(true)) => outcomes.ok.fetch_add(1, Ordering::Relaxed),
        Ok(Err(_)) => outcomes.clear_error.fetch_add(1, Ordering::Relaxed),
        Ok(Ok(false)) | Err(_) => outcomes.bad.fetch_add(1, Ordering::Relaxed),
    };
}

struct Fleet<'a> {
    pki: &'a TestPki,
    server: SocketAddr,
    certs: Vec<AgentCert>,
    policy: String,
    /// `slots[client][instance]`
    slots: Vec<Vec<Option<TestAgent>>>,
    stopping: JoinSet<()>,
}

impl Fleet<'_> {
    async fn start(&mut self, client: usize, instance: usize) {
        let agent =
            TestAgent::start(self.pki, &self.certs[client], self.server, &self.policy, "").await;
        self.slots[client][instance] = Some(agent);
    }

    /// Stops (gracefully or abruptly, at random) the agent in the slot, in the background.
    fn stop(&mut self, client: usize, instance: usize) {
        if let Some(agent) = self.slots[client][instance].take() {
            if fastrand::bool() {
                self.stopping
                    .spawn(async move { agent.stop().await.unwrap() });
            } else {
                self.stopping.spawn(agent.kill());
            }
        }
    }

    /// Running agents per agent id.
    fn running(&self) -> BTreeMap<String, usize> {
        self.slots
            .iter()
            .enumerate()
            .map(|(i, slots)| (client_id(i), slots.iter().flatten().count()))
            .collect()
    }

    async fn settle(&mut self) {
        while let Some(done) = self.stopping.join_next().await {
            done.expect("an agent stopped without panicking");
        }
    }
}

fn client_id(i: usize) -> String {
    format!("edge-{i}")
}

/// Registry, listing and metrics all say `expected` (sessions per agent id).
async fn assert_agreement(server: &TestServer, expected: &BTreeMap<String, usize>) {
    let total: usize = expected.values().sum();
    eventually("the registry matches the running agents", || {
        expected
            .iter()
            .all(|(client, n)| server.sessions.sessions(client).len() == *n)
    })
    .await;
    assert_eq!(server.sessions.session_count(), total);
    let listing = server.clients().await;
    let listed: BTreeMap<String, usize> = listing
        .clients
        .iter()
        .map(|c| (c.client.clone(), c.sessions.len()))
        .collect();
    assert_eq!(&listed, expected, "/v1/clients");
    for (client, n) in expected {
        assert_eq!(
            metric_or_zero(&server.registry, "tether_sessions", &[("client", client)]),
            *n as f64,
            "tether_sessions{{client={client}}}"
        );
    }
    assert_eq!(
        metric_sum(&server.registry, "tether_sessions", &[]),
        total as f64
    );
    let connected = expected.values().filter(|n| **n > 0).count();
    assert_eq!(server.agents_connected(), connected as f64);
    eventually(
        "the health checker tracks exactly the live sessions",
        || metric_or_zero(&server.registry, "tether_health_sessions_tracked", &[]) == total as f64,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_agents_churn_under_load() {
    let secs: u64 = std::env::var("TETHER_CHURN_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let pki = TestPki::new();
    let (echo, _echo) = echo_server().await;
    let forwards: Vec<ForwardSpec> = (0..CLIENTS)
        .map(|i| ForwardSpec::new(&client_id(i), echo))
        .collect();
    let server = TestServer::start(
        &pki,
        &forwards,
        "health: { interval: 200ms, timeout: 1s, unhealthy_after: 3 }\n",
    )
    .await;
    let mut fleet = Fleet {
        pki: &pki,
        server: server.tunnel_addr,
        certs: (0..CLIENTS).map(|i| pki.agent(&client_id(i))).collect(),
        policy: allow_only(echo),
        slots: (0..CLIENTS)
            .map(|_| (0..INSTANCES).map(|_| None).collect())
            .collect(),
        stopping: JoinSet::new(),
    };
    // Half the fleet up to begin with.
    for client in 0..CLIENTS {
        for instance in 0..INSTANCES / 2 {
            fleet.start(client, instance).await;
        }
    }

    let outcomes = Arc::new(Outcomes::default());
    let done = Arc::new(AtomicBool::new(false));
    let mut load = JoinSet::new();
    for _ in 0..LOAD_WORKERS {
        let outcomes = outcomes.clone();
        let done = done.clone();
        let forwards = server.forward_addrs.clone();
        load.spawn(async move {
            while !done.load(Ordering::Relaxed) {
                let forward = forwards[fastrand::usize(..forwards.len())];
                dial_once(forward, &outcomes).await;
            }
        });
    }

    // Churn: toggle a random slot every few milliseconds.
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut changes = 0u64;
    while Instant::now() < deadline {
        let (client, instance) = (fastrand::usize(..CLIENTS), fastrand::usize(..INSTANCES));
        if fleet.slots[client][instance].is_some() {
            fleet.stop(client, instance);
        } else {
            fleet.start(client, instance).await;
        }
        changes += 1;
        // Reap finished stops as we go (bounded work in flight).
        while let Some(done) = fleet.stopping.try_join_next() {
            done.expect("an agent stopped without panicking");
        }
        tokio::time::sleep(Duration::from_millis(fastrand::u64(5..40))).await;
    }
    done.store(true, Ordering::Relaxed);
    while let Some(worker) = load.join_next().await {
        worker.expect("a load worker did not panic");
    }
    fleet.settle().await;

    let ok = outcomes.ok.load(Ordering::Relaxed);
    let clear = outcomes.clear_error.load(Ordering::Relaxed);
    let bad = outcomes.bad.load(Ordering::Relaxed);
    eprintln!(
        "churn: {secs}s, {changes} agent starts/stops, dials: {ok} echoed, {clear} failed with \
         a reset, {bad} bad; session events: {} added, {} removed",
        metric_or_zero(
            &server.registry,
            "tether_session_events_total",
            &[("event", "added")]
        ),
        metric_or_zero(
            &server.registry,
            "tether_session_events_total",
            &[("event", "removed")]
        ),
    );
    assert_eq!(
        bad, 0,
        "dials that ended with a clean EOF, wrong data or a hang"
    );
    assert!(ok > 0, "no dial succeeded");
    assert!(changes > 100, "too little churn: {changes}");

    // The registry, the listing and the metrics agree with the agents running now...
    let running = fleet.running();
    assert_agreement(&server, &running).await;

    // ...and read zero once every agent is gone.
    for client in 0..CLIENTS {
        for instance in 0..INSTANCES {
            fleet.stop(client, instance);
        }
    }
    fleet.settle().await;
    let zero: BTreeMap<String, usize> = (0..CLIENTS).map(|i| (client_id(i), 0)).collect();
    assert_agreement(&server, &zero).await;
    assert_eq!(server.agents_connected(), 0.0);
    assert_eq!(
        metric_or_zero(
            &server.registry,
            "tether_session_events_total",
            &[("event", "stale_removed")]
        ),
        0.0,
        "different instances never replace each other"
    );
    server
        .stop()
        .await
        .expect("the server ran and stopped cleanly");
}
