//! The replica set's owner: resolves the server URLs into endpoints (`discovery`), runs one
//! `Supervisor` per placed endpoint on its own cancellation token, re-resolves every
//! `discovery.interval` and whenever a session ends, starts endpoints that appeared or entered
//! the placement and drains those that disappeared or left it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use arc_swap::ArcSwap;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span};

use crate::config::{DiscoveryConfig, ReconnectConfig};
use crate::connector::Endpoint;
use crate::discovery;
use crate::gate::GateState;
use crate::handler::Handler;
use crate::placement::{PlacementSettings, is_down, wanted_endpoints};
use crate::reload::ConnectSettings;
use crate::replica_claims::ReplicaClaims;
use crate::status::{AgentStatus, ReplicaStatus};
use crate::supervisor::Supervisor;

/// Runs the supervisors of every endpoint of the replica set.
pub(crate) struct Fleet {
    pub(crate) connect: watch::Receiver<Arc<ConnectSettings>>,
    pub(crate) handler: Handler,
    pub(crate) reconnect: Arc<ArcSwap<ReconnectConfig>>,
    pub(crate) discovery: Arc<ArcSwap<DiscoveryConfig>>,
    pub(crate) gate: watch::Receiver<GateState>,
    pub(crate) status: watch::Sender<AgentStatus>,
    pub(crate) instance_id: String,
    pub(crate) placement: watch::Receiver<PlacementSettings>,
}

/// One running supervisor; dropping it aborts the task.
struct Running {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Running {
    /// Cancels the supervisor (GOAWAY, close) and waits for it.
    async fn stop(mut self) {
        self.stop.cancel();
        let _ = (&mut self.task).await;
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Fleet {
    /// Until `shutdown`: keeps a supervisor per placed endpoint. On shutdown every supervisor
    /// closes its session with GOAWAY; returns once all have ended.
    pub(crate) async fn run(self, shutdown: CancellationToken) {
        let shared = Shared {
            claims: Arc::new(ReplicaClaims::default()),
            session_ended: Arc::new(Notify::new()),
            sessions: Arc::new(AtomicU64::new(0)),
        };
        let mut connect = self.connect.clone();
        let mut placement = self.placement.clone();
        let mut status_seen = self.status.subscribe();
        let mut running: BTreeMap<Endpoint, Running> = BTreeMap::new();
        let mut endpoints: BTreeSet<Endpoint> = BTreeSet::new();
        let mut resolve = true;
        let mut next_resolve = Instant::now();
        loop {
            if resolve {
                let settings = connect.borrow_and_update().clone();
                let found = discovery::resolve(&settings.connector, &endpoints).await;
                self.forget_removed(&endpoints, &found, &mut running).await;
                endpoints = found;
                resolve = false;
                next_resolve = Instant::now() + self.discovery.load().interval.0;
            }
            let settings = placement.borrow_and_update().clone();
            self.place(&settings, &endpoints, &mut running, &shared, &shutdown)
                .await;
            let min_connected = self.discovery.load().min_connected;
            self.status.send_if_modified(|s| {
                let changed = s.min_connected != min_connected;
                s.min_connected = min_connected;
                changed
            });
            self.handler.metrics.replica_state(&self.status.borrow());
            // Changes this pass made itself are not a reason for another pass.
            status_seen.borrow_and_update();
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep_until(next_resolve) => resolve = true,
                _ = shared.session_ended.notified() => resolve = true,
                changed = connect.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    resolve = true;
                }
                changed = placement.changed() => if changed.is_err() {
                    break;
                },
                // A session came up or an attempt failed: the placement may change.
                changed = status_seen.changed() => if changed.is_err() {
                    break;
                },
            }
        }
        for supervisor in running.values() {
            supervisor.stop.cancel();
        }
        for (_, supervisor) in running {
            supervisor.stop().await;
        }
        self.status.send_modify(|s| {
            s.connected = false;
            s.stopping = true;
        });
    }

    /// Drains the sessions of endpoints that disappeared and forgets them.
    async fn forget_removed(
        &self,
        old: &BTreeSet<Endpoint>,
        found: &BTreeSet<Endpoint>,
        running: &mut BTreeMap<Endpoint, Running>,
    ) {
        let (added, removed) = discovery::diff(old, found);
        for endpoint in removed {
            if let Some(gone) = running.remove(&endpoint) {
                info!(endpoint = %endpoint, "server address gone; draining its session");
                gone.stop().await;
            }
            self.status.send_modify(|s| {
                s.replicas.remove(&endpoint.to_string());
                s.recount();
            });
        }
        for endpoint in added {
            if found.len() > 1 || !old.is_empty() {
                info!(endpoint = %endpoint, "server replica address discovered");
            }
            self.status.send_modify(|s| {
                s.replica_mut(&endpoint.to_string());
            });
        }
    }

    /// Starts a supervisor for every endpoint the placement wants and, once every wanted
    /// endpoint is connected or failing (make before break), stops the others.
    async fn place(
        &self,
        settings: &PlacementSettings,
        endpoints: &BTreeSet<Endpoint>,
        running: &mut BTreeMap<Endpoint, Running>,
        shared: &Shared,
        shutdown: &CancellationToken,
    ) {
        let wanted = {
            let status = self.status.borrow();
            wanted_endpoints(settings, endpoints, &status)
        };
        for endpoint in &wanted {
            if !running.contains_key(endpoint) {
                let task = self.start(endpoint, shared, shutdown);
                running.insert(endpoint.clone(), task);
            }
        }
        let settled = {
            let status = self.status.borrow();
            wanted.iter().all(|e| {
                status
                    .replicas
                    .iter()
                    .find(|(key, _)| e.has_key(key))
                    .is_some_and(|(_, r)| r.connected || is_down(r))
            })
        };
        let unwanted: Vec<Endpoint> = running
            .keys()
            .filter(|e| !wanted.contains(e))
            .cloned()
            .collect();
        if settled {
            self.drain_unwanted(unwanted, running).await;
        }
        self.status.send_if_modified(|s| {
            let mut changed = false;
            for (key, replica) in s.replicas.iter_mut() {
                let placed = running.keys().any(|e| e.has_key(key));
                changed |= replica.placed != placed;
                replica.placed = placed;
            }
            changed
        });
    }

    /// Stops the supervisors of endpoints that left the placement.
    async fn drain_unwanted(
        &self,
        unwanted: Vec<Endpoint>,
        running: &mut BTreeMap<Endpoint, Running>,
    ) {
        for endpoint in unwanted {
            if let Some(moved) = running.remove(&endpoint) {
                info!(endpoint = %endpoint, "replica no longer in this agent's placement; draining its session");
                self.handler.metrics.placement_move();
                moved.stop().await;
                self.status.send_modify(|s| {
                    if let Some(r) = s.replicas.get_mut(&endpoint.to_string()) {
                        *r = ReplicaStatus::default();
                    }
                    s.recount();
                });
            }
        }
    }

    /// Spawns the supervisor of `endpoint`.
    fn start(&self, endpoint: &Endpoint, shared: &Shared, shutdown: &CancellationToken) -> Running {
        let stop = shutdown.child_token();
        let supervisor = Supervisor {
            connect: self.connect.clone(),
            handler: self.handler.clone(),
            reconnect: self.reconnect.clone(),
            gate: self.gate.clone(),
            status: self.status.clone(),
            instance_id: self.instance_id.clone(),
            endpoint: endpoint.clone(),
            claims: shared.claims.clone(),
            session_ended: shared.session_ended.clone(),
            sessions: shared.sessions.clone(),
        };
        let span = info_span!("replica", endpoint = %endpoint);
        let task = tokio::spawn(supervisor.run(stop.clone()).instrument(span));
        Running { stop, task }
    }
}

/// What the supervisors of one fleet share.
struct Shared {
    claims: Arc<ReplicaClaims>,
    session_ended: Arc<Notify>,
    sessions: Arc<AtomicU64>,
}
