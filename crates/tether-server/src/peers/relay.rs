//! The replica without the agent: a dial for a client it holds no session of goes to the peer
//! replicas in the client's rendezvous order (its placed replicas first, then the others once),
//! each attempt bounded, the replica that answered remembered briefly.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tether_common::placement;
use tether_mux::{MuxStream, OpenError};
use tether_proto::TargetAddr;
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;
use tracing::debug;

use super::links::{Link, Links, read_answer, relay_target};
use super::metrics::PeerMetrics;
use super::wire::{Answer, Request};

/// How long the replica that held a client is tried first for it.
const CACHE_TTL: Duration = Duration::from_secs(10);
/// Most clients remembered.
const CACHE_MAX: usize = 16_384;

/// A relayed stream and the replica that holds the agent.
#[derive(Debug)]
pub(crate) struct Relayed {
    pub(crate) stream: MuxStream,
    pub(crate) via: String,
}

/// Why a relay found no stream.
#[derive(Debug)]
pub(crate) enum RelayError {
    /// No peer replica holds a session of the client (or none answered in time).
    NoSession,
    /// The replica that holds the agent could not open the target: its refusal.
    Open(OpenError),
}

/// Relays dials to peer replicas. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Relay {
    pub(crate) links: Arc<Links>,
    pub(crate) metrics: PeerMetrics,
    /// Bound on the whole relay (every attempt).
    pub(crate) timeout: Duration,
    pub(crate) cache: Arc<Mutex<HashMap<String, (IpAddr, Instant)>>>,
}

/// One attempt's result.
enum Attempt {
    Opened(MuxStream),
    NoSession,
    Refused(OpenError),
    Failed(String),
}

impl Relay {
    /// A relay over `links`.
    pub(crate) fn new(links: Arc<Links>, metrics: PeerMetrics, timeout: Duration) -> Relay {
        Relay {
            links,
            metrics,
            timeout,
            cache: Arc::default(),
        }
    }

    /// Opens `target` through a peer replica that holds a session of `client`.
    pub(crate) async fn open(
        &self,
        client: &str,
        target: &TargetAddr,
    ) -> Result<Relayed, RelayError> {
        let started = Instant::now();
        let deadline = started + self.timeout;
        for (ip, link) in self.order(client) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let attempt = tokio::time::timeout(left, attempt(&link, client, target))
                .await
                .unwrap_or_else(|_| Attempt::Failed("timed out".to_owned()));
            match attempt {
                Attempt::Opened(stream) => {
                    self.remember(client, ip);
                    self.count("opened");
                    self.metrics
                        .open_seconds
                        .observe(started.elapsed().as_secs_f64());
                    return Ok(Relayed {
                        stream,
                        via: link.server_id,
                    });
                }
                Attempt::NoSession => {}
                Attempt::Refused(err) => {
                    self.remember(client, ip);
                    self.count("refused");
                    return Err(RelayError::Open(err));
                }
                Attempt::Failed(reason) => {
                    debug!(peer.id = %link.server_id, agent.id = client, reason, "relay attempt failed");
                    self.count("failed");
                }
            }
        }
        self.count("no_session");
        Err(RelayError::NoSession)
    }

    /// The linked peers in the order to ask: the remembered one, then the client's ranking
    /// over every member (so its placed replicas come first).
    fn order(&self, client: &str) -> Vec<(IpAddr, Link)> {
        let (members, live) = self.links.snapshot();
        let keys: Vec<String> = members.iter().map(IpAddr::to_string).collect();
        let mut order: Vec<IpAddr> = placement::rank(client, &keys)
            .into_iter()
            .filter_map(|k| k.parse().ok())
            .collect();
        if let Some(cached) = self.cached(client) {
            order.retain(|ip| *ip != cached);
            order.insert(0, cached);
        }
        order
            .into_iter()
            .filter_map(|ip| live.get(&ip).map(|link| (ip, link.clone())))
            .collect()
    }

    fn cached(&self, client: &str) -> Option<IpAddr> {
        let cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        cache
            .get(client)
            .filter(|(_, at)| at.elapsed() < CACHE_TTL)
            .map(|(ip, _)| *ip)
    }

    fn remember(&self, client: &str, ip: IpAddr) {
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        if cache.len() >= CACHE_MAX && !cache.contains_key(client) {
            cache.retain(|_, (_, at)| at.elapsed() < CACHE_TTL);
            if cache.len() >= CACHE_MAX {
                return;
            }
        }
        cache.insert(client.to_owned(), (ip, Instant::now()));
    }

    fn count(&self, outcome: &str) {
        self.metrics.relayed.with_label_values(&[outcome]).inc();
    }
}

/// Asks one peer to dial `target` through its session of `client`.
async fn attempt(link: &Link, client: &str, target: &TargetAddr) -> Attempt {
    let mut stream = match link.session.open(relay_target()).await {
        Ok(stream) => stream,
        Err(err) => return Attempt::Failed(format!("opening a relay stream: {err}")),
    };
    let request = Request::Dial {
        client: client.to_owned(),
        target: target.clone(),
    };
    if let Err(err) = stream.write_all(&request.encode()).await {
        return Attempt::Failed(err.to_string());
    }
    match read_answer(&mut stream).await {
        Ok(Answer::Opened) => Attempt::Opened(stream),
        Ok(Answer::NoSession) => Attempt::NoSession,
        Ok(Answer::Refused { code, reason }) => Attempt::Refused(OpenError::Refused {
            code,
            message: reason,
        }),
        Ok(other) => Attempt::Failed(format!("unexpected answer {other:?}")),
        Err(reason) => Attempt::Failed(reason),
    }
}
