//! What `tether-bench placement-kill` watches while a replica dies: dials to random agents
//! through random live replicas' HTTP CONNECT frontends (each checked byte-exact through the
//! agent to an echo target), and the survivors' session counters sampled over time.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::http_get;

/// Bound on one probe dial (CONNECT, answer, echo).
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes echoed per probe.
const PROBE_BYTES: usize = 64;

/// An in-process echo target (every byte read is written back).
pub(crate) struct Echo {
    pub(crate) addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Echo {
    pub(crate) async fn start() -> Result<Echo> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    Ok((mut tcp, _)) = listener.accept() => {
                        conns.spawn(async move {
                            let (mut r, mut w) = tcp.split();
                            let _ = tokio::io::copy(&mut r, &mut w).await;
                        });
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                    else => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
        });
        Ok(Echo { addr, task })
    }

    pub(crate) fn stop(self) {
        self.task.abort();
    }
}

/// One probe dial: when it started, through which replica, and whether the bytes came back.
#[derive(Debug, Clone)]
pub(crate) struct Probe {
    pub(crate) at: Instant,
    pub(crate) proxy: SocketAddr,
    pub(crate) ok: bool,
    pub(crate) error: Option<String>,
}

/// Where probes go: the live replicas' CONNECT frontends (the dead one is taken out when it
/// is killed, as a load balancer would), the agent ids and the echo target.
pub(crate) struct ProbeTargets {
    pub(crate) proxies: Mutex<Vec<SocketAddr>>,
    pub(crate) agents: Vec<String>,
    pub(crate) echo: SocketAddr,
}

/// `workers` dial loops until `stop`; returns every probe.
pub(crate) async fn run_probers(
    targets: Arc<ProbeTargets>,
    workers: usize,
    stop: CancellationToken,
) -> Vec<Probe> {
    let probes = Arc::new(Mutex::new(Vec::new()));
    let mut set = JoinSet::new();
    for _ in 0..workers {
        let (targets, probes, stop) = (targets.clone(), probes.clone(), stop.clone());
        set.spawn(async move {
            while !stop.is_cancelled() {
                let proxy = {
                    let live = targets
                        .proxies
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner);
                    live[fastrand::usize(..live.len())]
                };
                let agent = &targets.agents[fastrand::usize(..targets.agents.len())];
                let at = Instant::now();
                let result = tokio::time::timeout(DIAL_TIMEOUT, dial(proxy, agent, targets.echo))
                    .await
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("timed out")));
                let probe = Probe {
                    at,
                    proxy,
                    ok: result.is_ok(),
                    error: result.err().map(|e| format!("{agent} via {proxy}: {e:#}")),
                };
                probes
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(probe);
            }
        });
    }
    while set.join_next().await.is_some() {}
    std::mem::take(&mut *probes.lock().unwrap_or_else(PoisonError::into_inner))
}

/// CONNECT through `proxy` to `echo` on agent `agent`, then a byte-exact echo.
async fn dial(proxy: SocketAddr, agent: &str, echo: SocketAddr) -> Result<()> {
    let mut tcp = TcpStream::connect(proxy).await.context("connecting")?;
    tcp.set_nodelay(true)?;
    let head =
        format!("CONNECT {echo} HTTP/1.1\r\nHost: {echo}\r\nX-Tether-Client: {agent}\r\n\r\n");
    tcp.write_all(head.as_bytes()).await?;
    let mut answer = Vec::with_capacity(256);
    while !answer.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        if tcp.read(&mut byte).await? == 0 || answer.len() > 4096 {
            bail!("no CONNECT answer: {}", String::from_utf8_lossy(&answer));
        }
        answer.push(byte[0]);
    }
    if !answer.starts_with(b"HTTP/1.1 200") {
        let line = String::from_utf8_lossy(&answer);
        bail!("{}", line.lines().next().unwrap_or(""));
    }
    let sent: Vec<u8> = (0..PROBE_BYTES).map(|_| fastrand::u8(..)).collect();
    tcp.write_all(&sent).await?;
    let mut got = vec![0u8; PROBE_BYTES];
    tcp.read_exact(&mut got).await.context("reading the echo")?;
    if got != sent {
        bail!("the echo differs");
    }
    Ok(())
}

/// One replica's session figures at one moment.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Counters {
    pub(crate) connected: u64,
    pub(crate) added: u64,
    pub(crate) removed: u64,
}

/// Reads a replica's counters off its `/metrics`.
pub(crate) async fn counters(admin: SocketAddr) -> Result<Counters> {
    let text = http_get::get(admin, "/metrics").await?;
    let read = |series: &str| http_get::sample(&text, series).map(|v| v as u64);
    Ok(Counters {
        connected: read("tether_agents_connected").context("tether_agents_connected")?,
        added: read("tether_session_events_total{event=\"added\"}").unwrap_or(0),
        removed: read("tether_session_events_total{event=\"removed\"}").unwrap_or(0),
    })
}

/// Every replica's counters at one moment.
pub(crate) struct Sample {
    pub(crate) at: Instant,
    pub(crate) replicas: Vec<Counters>,
}

/// Samples `admins` every `every` until each one's connected count equals `want` (then
/// returns the samples) or `wait` passes.
pub(crate) async fn sample_until(
    admins: &[SocketAddr],
    want: &[u64],
    every: Duration,
    wait: Duration,
) -> Result<Vec<Sample>> {
    let deadline = Instant::now() + wait;
    let mut samples = Vec::new();
    loop {
        let mut replicas = Vec::with_capacity(admins.len());
        for admin in admins {
            replicas.push(counters(*admin).await.unwrap_or_default());
        }
        let at = Instant::now();
        let done = replicas
            .iter()
            .map(|c| c.connected)
            .eq(want.iter().copied());
        samples.push(Sample { at, replicas });
        if done {
            return Ok(samples);
        }
        if at > deadline {
            let last = &samples[samples.len() - 1].replicas;
            let now: Vec<u64> = last.iter().map(|c| c.connected).collect();
            bail!("not placed after {wait:?}: sessions {now:?}, expected {want:?}");
        }
        tokio::time::sleep(every).await;
    }
}

/// The highest rate of new sessions (per second) over windows of at least `window`: summed
/// over every replica, and at the busiest one.
pub(crate) fn peak_rates(samples: &[Sample], window: Duration) -> (f64, f64) {
    let (mut all, mut one) = (0.0f64, 0.0f64);
    let mut start = 0;
    for end in 1..samples.len() {
        while start + 1 < end && samples[end].at - samples[start + 1].at >= window {
            start += 1;
        }
        let span = (samples[end].at - samples[start].at).as_secs_f64();
        if span < window.as_secs_f64() * 0.5 {
            continue;
        }
        let deltas = samples[end]
            .replicas
            .iter()
            .zip(&samples[start].replicas)
            .map(|(b, a)| b.added.saturating_sub(a.added) as f64);
        let (sum, max) = deltas.fold((0.0, 0.0f64), |(s, m), d| (s + d, m.max(d)));
        all = all.max(sum / span);
        one = one.max(max / span);
    }
    (all, one)
}
