//! tether agent library: dials out to the server, keeps a tunnel session up, and dials targets
//! the server asks for under a deny-by-default policy.
//!
//! Follow a byte: [`connector`] (TCP, TLS, WebSocket) -> [`ws_transport`] -> the mux session ->
//! [`handler`] (policy check, [`dial`], pump) -> the target socket. [`Agent::run`] owns the
//! activation gate ([`gate`]), the reconnect loop (`supervisor`) and the admin listener
//! ([`admin`]); [`Agent::reloader`] applies new configs while it runs ([`reload`]).

pub mod admin;
pub mod cert_watch;
pub mod config;
pub mod connector;
pub mod dial;
mod discovery;
pub mod enroll;
mod enroll_http;
mod enroll_tls;
mod fleet;
pub mod gate;
pub mod handler;
pub mod index_page;
pub mod metrics;
mod placement;
pub mod policy;
pub mod reload;
pub mod remotedialer_ws;
pub mod renew;
mod replica_claims;
mod retry_policy;
pub mod status;
mod supervisor;
pub mod ws_transport;

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tether_common::cert_expiry::CertRole;
use tether_common::config_error::ConfigErrors;
use tether_common::log_throttle::LogThrottle;
use tether_common::tls::{self, TlsError};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, info, info_span, warn};

pub use config::{
    AgentConfig, AgentProtocol, AgentTlsConfig, DiscoveryConfig, PlacementConfig, ReconnectConfig,
};
pub use connector::{ConnectError, Connector, Endpoint};
pub use gate::{ActivationConfig, EnvLookup, GateState};
pub use handler::SharedPolicy;
pub use metrics::{AgentMetrics, DialOutcome};
pub use reload::AgentReloader;
pub use status::{AgentStatus, ReplicaStatus};
pub use tether_common::config_diff::ReloadOutcome;

use crate::cert_watch::CertWatch;
use crate::dial::{Resolver, SystemResolver};
use crate::fleet::Fleet;
use crate::gate::{Gate, GateControl};
use crate::handler::Handler;
use crate::placement::PlacementSettings;
use crate::reload::{ConnectSettings, ReloadTargets};

/// One info line per this window for repeated policy refusals (the rest go to debug).
const DENIAL_LOG_WINDOW: Duration = Duration::from_secs(60);

/// How long `run` waits for its tasks (stream handlers, admin) after shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Listeners bound by the caller (`main`, or a test on `127.0.0.1:0`).
#[derive(Debug, Default)]
pub struct AgentListeners {
    /// The admin listener (`/healthz`, `/readyz`, `/metrics`); `None` serves no admin endpoint.
    pub admin: Option<TcpListener>,
}

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The configuration is invalid.
    #[error("invalid agent configuration:\n{0}")]
    Config(#[from] ConfigErrors),
    /// The TLS material could not be loaded.
    #[error("agent TLS: {0}")]
    Tls(#[from] TlsError),
    /// The metrics could not be registered (a name already taken in the registry).
    #[error("registering agent metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// A configured agent, ready to [`run`](Agent::run).
pub struct Agent {
    connect: watch::Sender<Arc<ConnectSettings>>,
    reconnect: Arc<ArcSwap<ReconnectConfig>>,
    discovery: Arc<ArcSwap<config::DiscoveryConfig>>,
    placement: watch::Sender<PlacementSettings>,
    dial_timeout: Arc<ArcSwap<Duration>>,
    gate: GateControl,
    env: EnvLookup,
    reloader: AgentReloader,
    policy: SharedPolicy,
    resolver: Arc<dyn Resolver>,
    metrics: AgentMetrics,
    registry: prometheus::Registry,
    status: watch::Sender<AgentStatus>,
    instance_id: String,
    /// The agent certificate's lifetime (expiry warning, `/readyz`).
    cert_watch: Arc<CertWatch>,
    /// Renews the certificate with the server (`enroll:`); `None` without enrollment.
    renewer: Option<renew::Renewer>,
    /// systemd notifications: READY once the connector starts, STOPPING when shutdown begins.
    #[cfg(unix)]
    notifier: tether_common::sd_notify::Notifier,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("instance_id", &self.instance_id)
            .field("connector", &self.connect.borrow().connector)
            .finish_non_exhaustive()
    }
}

impl Agent {
    /// Validates `config`, loads the TLS material, compiles the policy and registers the
    /// metrics into `registry`. Paths must already be resolved (`AgentConfig::resolve_paths`).
    /// The agent runs on the effective config (`AgentConfig::effective`).
    pub fn new(config: AgentConfig, registry: &prometheus::Registry) -> Result<Agent, AgentError> {
        let config = config.effective();
        config.validate()?;
        let policy = config.compiled_policy()?;
        let files = config.tls_files();
        let tls = tls::client_config(&files)?;
        let cert_watch = CertWatch::new();
        cert_watch.set(&tls::load_certs(&files.cert)?);
        let instance_id = connector::new_instance_id();
        let connector = Connector::new(&config, tls, &instance_id)?;
        let metrics = AgentMetrics::register(registry)?;
        record_cert_expiry(&metrics, &files);
        let (status, _) = watch::channel(AgentStatus {
            instance_id: instance_id.clone(),
            min_connected: config.discovery.min_connected,
            ..AgentStatus::default()
        });
        let connect = watch::channel(Arc::new(ConnectSettings {
            connector,
            mux_config: config.to_mux_config(),
        }))
        .0;
        let reconnect = Arc::new(ArcSwap::from_pointee(config.reconnect.clone()));
        let discovery = Arc::new(ArcSwap::from_pointee(config.discovery.clone()));
        let placement = watch::channel(PlacementSettings {
            replicas_per_agent: config.placement.replicas_per_agent,
            agent_key: placement::agent_key(&tls::load_certs(&files.cert)?, &instance_id),
        })
        .0;
        let dial_timeout = Arc::new(ArcSwap::from_pointee(config.dial_timeout.0));
        let policy: SharedPolicy = Arc::new(ArcSwap::from_pointee(policy));
        let gate = GateControl::new(config.activation.clone());
        let reloader = AgentReloader::new(
            config.clone(),
            ReloadTargets {
                policy: policy.clone(),
                dial_timeout: dial_timeout.clone(),
                reconnect: reconnect.clone(),
                discovery: discovery.clone(),
                placement: placement.clone(),
                gate: gate.clone(),
                connect: connect.clone(),
                metrics: metrics.reloads.clone(),
                instance_id: instance_id.clone(),
                cert_expiry: metrics.cert_expiry.clone(),
                cert_watch: cert_watch.clone(),
            },
        );
        let renewer = match &config.enroll {
            None => None,
            Some(_) => Some(renew::Renewer {
                reloader: reloader.clone(),
                metrics: renew::RenewalMetrics::register(registry)?,
            }),
        };
        Ok(Agent {
            renewer,
            connect,
            reconnect,
            discovery,
            placement,
            dial_timeout,
            gate,
            env: Arc::new(|var| std::env::var(var).ok()),
            reloader,
            cert_watch,
            policy,
            resolver: Arc::new(SystemResolver),
            metrics,
            registry: registry.clone(),
            status,
            instance_id,
            #[cfg(unix)]
            notifier: tether_common::sd_notify::Notifier::disabled(),
        })
    }

    /// Sends systemd's READY=1 / STOPPING=1 through `notifier` (`tether agent` under
    /// `Type=notify`).
    #[cfg(unix)]
    pub fn with_notifier(mut self, notifier: tether_common::sd_notify::Notifier) -> Agent {
        self.notifier = notifier;
        self
    }

    /// Uses `resolver` for target names instead of the system resolver (tests, static setups).
    pub fn with_resolver(mut self, resolver: Arc<dyn Resolver>) -> Agent {
        self.resolver = resolver;
        self
    }

    /// Reads environment variables through `env` instead of the process environment (tests).
    pub fn with_env(mut self, env: EnvLookup) -> Agent {
        self.env = env;
        self
    }

    /// The handle that applies new configs to this agent while it runs
    /// ([`AgentReloader::reload`]).
    pub fn reloader(&self) -> AgentReloader {
        self.reloader.clone()
    }

    /// The connection state, updated as it changes.
    pub fn status(&self) -> watch::Receiver<AgentStatus> {
        self.status.subscribe()
    }

    /// The dial policy in effect; storing a new one applies it to the next OPEN.
    pub fn policy(&self) -> SharedPolicy {
        self.policy.clone()
    }

    /// The agent's metrics.
    pub fn metrics(&self) -> &AgentMetrics {
        &self.metrics
    }

    /// This process's instance id (`X-Tether-Instance`).
    pub fn instance_id(&self) -> &str {
        &self.instance_id
    }

    /// Keeps a session to the server until `shutdown` fires, reconnecting with backoff, and
    /// serves the admin endpoints on `listeners.admin`. On shutdown: GOAWAY and close the
    /// session, wait (bounded) for stream handlers and the admin server, return `Ok`.
    pub async fn run(
        self,
        listeners: AgentListeners,
        shutdown: CancellationToken,
    ) -> Result<(), AgentError> {
        let span = info_span!("agent", agent.instance = %self.instance_id);
        async move {
            let tracker = TaskTracker::new();
            if let Some(listener) = listeners.admin {
                self.spawn_admin(&tracker, listener, shutdown.clone());
            }
            info!(
                server_url = self.connect.borrow().connector.url(),
                "agent starting"
            );
            // The gate decides (and logs) before the supervisor may dial.
            let gate = Gate::new(self.gate, self.metrics.gate.clone(), self.env);
            let gate_state = gate.subscribe();
            tracker.spawn(gate.run(shutdown.clone()).in_current_span());
            tracker.spawn(
                self.cert_watch
                    .clone()
                    .run(shutdown.clone())
                    .in_current_span(),
            );
            if let Some(renewer) = self.renewer {
                tracker.spawn(renewer.run(shutdown.clone()).in_current_span());
            }
            let fleet = Fleet {
                connect: self.connect.subscribe(),
                handler: Handler {
                    policy: self.policy,
                    resolver: self.resolver,
                    dial_timeout: self.dial_timeout,
                    metrics: self.metrics,
                    tracker: tracker.clone(),
                    denials: Arc::new(LogThrottle::new(DENIAL_LOG_WINDOW)),
                },
                reconnect: self.reconnect,
                discovery: self.discovery,
                placement: self.placement.subscribe(),
                gate: gate_state,
                status: self.status,
                instance_id: self.instance_id,
            };
            #[cfg(unix)]
            let notifier = self.notifier;
            #[cfg(unix)]
            if let Err(err) = notifier.ready() {
                warn!(error = %err, "systemd notification failed");
            }
            let supervised = fleet.run(shutdown.clone());
            tokio::pin!(supervised);
            let finished = tokio::select! {
                () = shutdown.cancelled() => false,
                () = &mut supervised => true,
            };
            // Checked after the select: the supervisor may see the cancellation first and end.
            #[cfg(unix)]
            if shutdown.is_cancelled() {
                if let Err(err) = notifier.stopping() {
                    warn!(error = %err, "systemd notification failed");
                }
            }
            if !finished {
                supervised.await;
            }
            drain(&tracker).await;
            info!("agent stopped");
            Ok(())
        }
        .instrument(span)
        .await
    }

    /// Serves the admin endpoints on `listener` until `stop`, as a task of `tracker`.
    fn spawn_admin(&self, tracker: &TaskTracker, listener: TcpListener, stop: CancellationToken) {
        let addr = listener
            .local_addr()
            .map(|addr| addr.to_string())
            .unwrap_or_default();
        let router = admin::router_with_cert(
            self.status.subscribe(),
            self.registry.clone(),
            self.cert_watch.clone(),
        );
        tracker.spawn(
            async move {
                info!(addr = %addr, "admin listener serving");
                let served = axum::serve(listener, router)
                    .with_graceful_shutdown(stop.cancelled_owned())
                    .await;
                if let Err(err) = served {
                    warn!(error = %err, "admin listener failed");
                }
            }
            .in_current_span(),
        );
    }
}

/// The expiry series of the agent certificate and the server CA in `files`.
fn record_cert_expiry(metrics: &AgentMetrics, files: &tls::ClientTlsFiles) {
    for (role, path) in [
        (CertRole::Agent, &files.cert),
        (CertRole::ServerCa, &files.server_ca),
    ] {
        // The files just loaded; a certificate x509-parser cannot read only costs the series.
        if let Err(err) = metrics.cert_expiry.record_file(role, path) {
            warn!(cert = role.label(), error = %err, "cannot read the certificate expiry");
        }
    }
}

/// Closes `tracker` and waits (up to the grace period) for its tasks.
async fn drain(tracker: &TaskTracker) {
    tracker.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait())
        .await
        .is_err()
    {
        warn!(
            tasks = tracker.len(),
            grace = ?SHUTDOWN_GRACE,
            "tasks still running after the shutdown grace period"
        );
    }
}
