//! The replica set's owner: resolves the server URLs into endpoints (`discovery`), runs one
//! `Supervisor` per endpoint on its own cancellation token, re-resolves every
//! `discovery.interval` and whenever a session ends, starts endpoints that appeared and drains
//! those that disappeared.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use arc_swap::ArcSwap;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span};

use crate::config::{DiscoveryConfig, ReconnectConfig};
use crate::connector::Endpoint;
use crate::discovery;
use crate::gate::GateState;
use crate::handler::Handler;
use crate::reload::ConnectSettings;
use crate::replica_claims::ReplicaClaims;
use crate::status::AgentStatus;
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
    /// Until `shutdown`: keeps a supervisor per endpoint. On shutdown every supervisor closes
    /// its session with GOAWAY; returns once all have ended.
    pub(crate) async fn run(self, shutdown: CancellationToken) {
        let claims = Arc::new(ReplicaClaims::default());
        let session_ended = Arc::new(Notify::new());
        let sessions = Arc::new(AtomicU64::new(0));
        let mut connect = self.connect.clone();
        let mut running: BTreeMap<Endpoint, Running> = BTreeMap::new();
        let mut endpoints: BTreeSet<Endpoint> = BTreeSet::new();
        loop {
            let settings = connect.borrow_and_update().clone();
            let found = discovery::resolve(&settings.connector, &endpoints).await;
            let (added, removed) = discovery::diff(&endpoints, &found);
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
                if found.len() > 1 || !endpoints.is_empty() {
                    info!(endpoint = %endpoint, "server replica address discovered");
                }
                self.status.send_modify(|s| {
                    s.replica_mut(&endpoint.to_string());
                });
                let stop = shutdown.child_token();
                let supervisor = Supervisor {
                    connect: self.connect.clone(),
                    handler: self.handler.clone(),
                    reconnect: self.reconnect.clone(),
                    gate: self.gate.clone(),
                    status: self.status.clone(),
                    instance_id: self.instance_id.clone(),
                    endpoint: endpoint.clone(),
                    claims: claims.clone(),
                    session_ended: session_ended.clone(),
                    sessions: sessions.clone(),
                };
                let span = info_span!("replica", endpoint = %endpoint);
                let task = tokio::spawn(supervisor.run(stop.clone()).instrument(span));
                running.insert(endpoint, Running { stop, task });
            }
            endpoints = found;
            let min_connected = self.discovery.load().min_connected;
            self.status.send_if_modified(|s| {
                let changed = s.min_connected != min_connected;
                s.min_connected = min_connected;
                changed
            });
            self.handler.metrics.replica_state(&self.status.borrow());
            let interval = self.discovery.load().interval.0;
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(interval) => {}
                _ = session_ended.notified() => {}
                changed = connect.changed() => if changed.is_err() {
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
}
