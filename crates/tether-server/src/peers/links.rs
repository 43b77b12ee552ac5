//! The sessions this replica dials to the other replicas: the members resolved again every
//! `peers.interval`, one session per address, oneself found (by asking each new session for
//! its server id) and left alone, broken sessions dialed again on the next round.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rustls::pki_types::ServerName;
use tether_mux::transport::framed;
use tether_mux::{MuxConfig, MuxMetrics, MuxStream, Role, Session};
use tether_proto::{Host, TargetAddr};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::config::{MAX_MEMBERS, PeersConfig, split_host_port};
use super::metrics::PeerMetrics;
use super::tls::{ALPN_PEER, PeerTls};
use super::view::PlacementView;
use super::wire::{Answer, Request};

/// Bound on one dial of a peer: TCP, TLS and the server-id question.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest resolution of one member name.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(10);

/// A live session to a peer replica.
#[derive(Debug, Clone)]
pub(crate) struct Link {
    pub(crate) session: Session,
    pub(crate) server_id: String,
}

/// The peer sessions by the peer's IP address (its key in every agent's ranking).
#[derive(Debug, Default)]
pub(crate) struct Links {
    live: Mutex<BTreeMap<IpAddr, Link>>,
    /// Addresses that turned out to be this replica.
    selves: Mutex<BTreeSet<IpAddr>>,
    /// Every member address of the last resolution (oneself included).
    members: Mutex<BTreeSet<IpAddr>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Links {
    /// The links of a replica whose peer listener is bound to `listen`: a specific address
    /// there is known to be this replica without dialing it (with an unspecified one, the
    /// dial loop finds which member addresses are this replica by asking them).
    pub(crate) fn new(listen: SocketAddr) -> Links {
        let links = Links::default();
        if !listen.ip().is_unspecified() {
            lock(&links.selves).insert(listen.ip());
        }
        links
    }

    /// The member addresses and their live links (without oneself), for ranking.
    pub(crate) fn snapshot(&self) -> (Vec<IpAddr>, BTreeMap<IpAddr, Link>) {
        let members = lock(&self.members).iter().copied().collect();
        let live = lock(&self.live)
            .iter()
            .filter(|(_, link)| !link.session.is_closed())
            .map(|(ip, link)| (*ip, link.clone()))
            .collect();
        (members, live)
    }

    /// The membership as this replica sees it, for the admin listing.
    pub(crate) fn view(&self) -> PlacementView {
        let (members, live) = self.snapshot();
        PlacementView {
            members: members.iter().map(IpAddr::to_string).collect(),
            this_replica: lock(&self.selves).iter().map(IpAddr::to_string).collect(),
            linked: live
                .into_iter()
                .map(|(ip, link)| (ip.to_string(), link.server_id))
                .collect(),
        }
    }
}

/// Keeps the dialed peer sessions.
pub(crate) struct Dialer {
    pub(crate) config: PeersConfig,
    pub(crate) tls: PeerTls,
    pub(crate) mux_config: MuxConfig,
    pub(crate) server_id: String,
    pub(crate) links: Arc<Links>,
    pub(crate) metrics: PeerMetrics,
    pub(crate) tracker: TaskTracker,
}

impl Dialer {
    /// Until `stop`: resolves the members and dials, all at once, each one without a live
    /// session (one slow peer does not hold up the others).
    pub(crate) async fn run(self, stop: CancellationToken) {
        let this = Arc::new(self);
        let ended = Arc::new(Notify::new());
        let mut failing: BTreeSet<SocketAddr> = BTreeSet::new();
        loop {
            let addrs = this.resolve().await;
            *lock(&this.links.members) = addrs.iter().map(SocketAddr::ip).collect();
            lock(&this.links.live).retain(|ip, link| {
                let keep = !link.session.is_closed() && addrs.iter().any(|a| a.ip() == *ip);
                if !keep {
                    link.session.close();
                }
                keep
            });
            let mut dials = JoinSet::new();
            for addr in addrs {
                let known = lock(&this.links.live).contains_key(&addr.ip())
                    || lock(&this.links.selves).contains(&addr.ip());
                if !known {
                    let dialer = this.clone();
                    dials.spawn(async move {
                        let result =
                            tokio::time::timeout(CONNECT_TIMEOUT, dialer.connect(addr)).await;
                        (addr, result)
                    });
                }
            }
            loop {
                let joined = tokio::select! {
                    _ = stop.cancelled() => None,
                    joined = dials.join_next() => joined,
                };
                let Some(Ok((addr, result))) = joined else {
                    break;
                };
                match result {
                    Ok(Ok(Some(link))) => {
                        failing.remove(&addr);
                        info!(peer.addr = %addr, peer.id = %link.server_id, "peer session up");
                        this.watch(addr, link.session.clone(), ended.clone());
                        lock(&this.links.live).insert(addr.ip(), link);
                    }
                    Ok(Ok(None)) => {
                        debug!(peer.addr = %addr, "this address is this replica");
                        lock(&this.links.selves).insert(addr.ip());
                    }
                    Ok(Err(reason)) => this.failed(addr, &reason, &mut failing),
                    Err(_) => this.failed(addr, "timed out", &mut failing),
                }
            }
            this.metrics
                .sessions
                .with_label_values(&["out"])
                .set(lock(&this.links.live).len() as i64);
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(this.config.interval.0) => {}
                _ = ended.notified() => {}
            }
        }
        for (_, link) in std::mem::take(&mut *lock(&this.links.live)) {
            link.session.close();
        }
    }

    /// Logs a failed dial once per failing streak.
    fn failed(&self, addr: SocketAddr, reason: &str, failing: &mut BTreeSet<SocketAddr>) {
        if failing.insert(addr) {
            warn!(peer.addr = %addr, reason, "cannot reach peer replica; retrying every interval");
        }
    }

    /// Wakes the loop when `session` ends, so the peer is dialed again.
    fn watch(&self, addr: SocketAddr, session: Session, ended: Arc<Notify>) {
        self.tracker.spawn(async move {
            session.closed().await;
            debug!(peer.addr = %addr, "peer session ended");
            ended.notify_one();
        });
    }

    /// Every address of every member, one family per name (IPv4 when it has any).
    async fn resolve(&self) -> Vec<SocketAddr> {
        let mut out = BTreeSet::new();
        for member in &self.config.members {
            let Ok((host, port)) = split_host_port(member) else {
                continue;
            };
            let addrs: Vec<SocketAddr> = match host.parse::<IpAddr>() {
                Ok(ip) => vec![SocketAddr::new(ip, port)],
                Err(_) => {
                    tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((host, port)))
                        .await
                        .ok()
                        .and_then(Result::ok)
                        .map(Iterator::collect)
                        .unwrap_or_default()
                }
            };
            let any_v4 = addrs.iter().any(SocketAddr::is_ipv4);
            out.extend(
                addrs
                    .into_iter()
                    .filter(|a| a.is_ipv4() == any_v4)
                    .take(MAX_MEMBERS),
            );
        }
        out.into_iter().collect()
    }

    /// Dials `addr`: the session and the peer's server id; `None` when it is this replica.
    async fn connect(&self, addr: SocketAddr) -> Result<Option<Link>, String> {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from(self.config.tls_name())
            .map_err(|e| format!("peers.server_name: {e}"))?;
        let tls = TlsConnector::from(self.tls.client())
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        if tls.get_ref().1.alpn_protocol() != Some(ALPN_PEER) {
            return Err("the address does not speak tether-peer/1".to_owned());
        }
        let transport = framed(tls, self.mux_config.limits());
        let (session, _incoming, driver) = Session::new(
            transport,
            Role::Agent,
            self.mux_config.clone(),
            MuxMetrics::unregistered(),
        );
        self.tracker.spawn(driver.run());
        let mut stream = session
            .open(relay_target())
            .await
            .map_err(|e| format!("opening the server-id question: {e}"))?;
        stream
            .write_all(&Request::Whoami.encode())
            .await
            .map_err(|e| e.to_string())?;
        let server_id = match read_answer(&mut stream).await? {
            Answer::ServerId(id) => id,
            other => return Err(format!("unexpected answer {other:?}")),
        };
        if server_id == self.server_id {
            session.close();
            return Ok(None);
        }
        Ok(Some(Link { session, server_id }))
    }
}

/// The OPEN target of every relay stream (the request inside names the real one).
pub(crate) fn relay_target() -> TargetAddr {
    TargetAddr {
        host: Host::Name("relay.tether.invalid".to_owned()),
        port: 1,
    }
}

/// Reads one answer off `stream`.
pub(crate) async fn read_answer(stream: &mut MuxStream) -> Result<Answer, String> {
    let mut buf = Vec::with_capacity(16);
    loop {
        match Answer::decode(&buf) {
            Ok(Some((answer, used))) if used == buf.len() => return Ok(answer),
            Ok(Some(_)) => return Err("bytes after the answer".to_owned()),
            Ok(None) => {}
            Err(err) => return Err(err.to_string()),
        }
        if buf.len() > 4 + super::wire::MAX_REASON + 255 {
            return Err("answer too long".to_owned());
        }
        let mut byte = [0u8; 1];
        let n = stream.read(&mut byte).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("the peer closed the stream before answering".to_owned());
        }
        buf.push(byte[0]);
    }
}
