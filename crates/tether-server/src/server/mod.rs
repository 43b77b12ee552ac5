//! `Server`: builds TLS, metrics and the registry from a `ServerConfig`, then runs the agents'
//! listener, the consumers' forwards and proxies, peering, health and admin on one task
//! tracker (`start.rs`), and shuts down in order (`drain.rs`): stop accepting, GOAWAY, drain
//! streams up to `drain_timeout`, close sessions, wait for the tasks (bounded).

mod drain;
mod error;
mod lifecycle;
mod listeners;
pub mod metrics;
mod start;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::server::danger::ClientCertVerifier;
use tether_common::cert_expiry::CertRole;
use tether_common::config_diff::ReloadMetrics;
use tether_common::tls;
use tether_common::tls_check;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use self::error::ServerError;
pub use self::listeners::{FrontendListeners, Listeners};

use crate::admin::Readiness;
use crate::agents::registry::SessionRegistry;
use crate::agents::upgrade::remotedialer_auth::auth_from_config;
use crate::config::ServerConfig;
use crate::consumers::audit::AuditLog;
use crate::consumers::proxy_control::FrontendControl;
use crate::enrollment::{Enrollment, EnrollmentMetrics};
use crate::peers::metrics::PeerMetrics;
use crate::peers::tls::PeerTls;
use crate::reload::ServerReloader;
use crate::server::error::one;
use crate::server::lifecycle::Lifecycle;
use crate::server::listeners::display_addr;
use crate::server::metrics::Metrics;
use crate::tls_reload::{TlsReloadMetrics, TlsReloader};

/// How often a repeated failure of one kind may be logged at warn.
const LOG_WINDOW: Duration = Duration::from_secs(60);

/// A configured server, ready to [`run`](Server::run).
#[derive(Debug)]
pub struct Server {
    config: ServerConfig,
    allowed: Arc<ArcSwap<HashSet<String>>>,
    agent_slots: Arc<Semaphore>,
    reloader: ServerReloader,
    tls: TlsReloader,
    metrics: Metrics,
    prometheus: prometheus::Registry,
    registry: Arc<SessionRegistry>,
    server_id: String,
    frontends: FrontendControl,
    audit: AuditLog,
    /// The enrollment routes (`enrollment:`).
    enrollment: Option<Arc<Enrollment>>,
    /// The peering's TLS (when `peers:` is set) and metrics (always registered).
    peer_tls: Option<PeerTls>,
    peer_metrics: PeerMetrics,
    /// systemd notifications: READY once every listener serves, STOPPING when the drain starts.
    #[cfg(unix)]
    notifier: tether_common::sd_notify::Notifier,
}

impl Server {
    /// Validates `config`, loads its TLS files and registers the metrics in `registry`.
    pub fn new(
        config: ServerConfig,
        registry: &prometheus::Registry,
    ) -> Result<Server, ServerError> {
        config.validate()?;
        let files = config.tls_files();
        let policy = config.client_cert_policy();
        // Fingerprinted before loading: a file replaced in between then shows as changed at
        // the next reload rather than being missed.
        let fingerprint = tls_check::server_files_fingerprint(&files).map(|f| (f, policy));
        let tls = tls::server_tls(&files, policy)?;
        let mut server = Self::build(
            config,
            tls.config,
            Some(tls.verifier),
            fingerprint,
            registry,
        )?;
        if let Some(peers) = &server.config.peers {
            let peer_tls = PeerTls::load(peers, &files, server.peer_metrics.clone())?;
            server.reloader.install_peer_tls(peer_tls.clone());
            server.peer_tls = Some(peer_tls);
        }
        for (role, path) in [
            (CertRole::Server, &files.cert),
            (CertRole::ClientCa, &files.client_ca),
        ] {
            // The files just loaded; a certificate x509-parser cannot read only costs the series.
            if let Err(err) = server.metrics.cert_expiry.record_file(role, path) {
                warn!(cert = role.label(), error = %err, "cannot read the certificate expiry");
            }
        }
        Ok(server)
    }

    /// [`new`](Self::new) with a ready rustls config (PEM held in memory, `tether demo`); the
    /// `tls` section of `config` is not read.
    pub fn with_tls_config(
        config: ServerConfig,
        tls: Arc<rustls::ServerConfig>,
        registry: &prometheus::Registry,
    ) -> Result<Server, ServerError> {
        Self::build(config, tls, None, None, registry)
    }

    fn build(
        config: ServerConfig,
        tls: Arc<rustls::ServerConfig>,
        verifier: Option<Arc<dyn ClientCertVerifier>>,
        fingerprint: Option<(u64, tls::ClientCertPolicy)>,
        registry: &prometheus::Registry,
    ) -> Result<Server, ServerError> {
        config.validate()?;
        let config = config.effective();
        let server_id = config.server_id.clone();
        let metrics = Metrics::register(registry, config.metrics.remotedialer_compat)?;
        metrics.set_server_id(&server_id);
        let sessions =
            Arc::new(SessionRegistry::new(metrics.registry.clone()).with_replica(&server_id));
        for client in config
            .allowed_agents
            .iter()
            .chain(config.forwards.iter().map(|f| &f.client))
        {
            sessions.declare_client(client);
        }
        let frontends = FrontendControl::new(&config.frontends);
        let audit = AuditLog::start(&config.audit_log, registry)?;
        let peer_metrics = PeerMetrics::register(registry)?;
        let allowed = Arc::new(ArcSwap::from_pointee(
            config
                .allowed_agents
                .iter()
                .cloned()
                .collect::<HashSet<_>>(),
        ));
        let agent_slots = Arc::new(Semaphore::new(config.max_agents));
        let reloader = ServerReloader::new(
            config.clone(),
            allowed.clone(),
            agent_slots.clone(),
            frontends.clone(),
            sessions.clone(),
            ReloadMetrics::register(registry)?,
            audit.clone(),
        );
        let tls = TlsReloader::new(
            tls,
            verifier,
            fingerprint,
            TlsReloadMetrics::register(registry)?,
            metrics.cert_expiry.clone(),
            sessions.clone(),
            allowed.clone(),
        );
        reloader.install_tls(tls.clone());
        let enrollment = match &config.enrollment {
            None => None,
            Some(section) => Some(Arc::new(Enrollment::new(
                section,
                config.tls.client_ca.clone(),
                allowed.clone(),
                EnrollmentMetrics::register(registry)?,
            )?)),
        };
        Ok(Server {
            enrollment,
            frontends,
            audit,
            peer_tls: None,
            peer_metrics,
            config,
            allowed,
            agent_slots,
            reloader,
            tls,
            metrics,
            prometheus: registry.clone(),
            registry: sessions,
            server_id,
            #[cfg(unix)]
            notifier: tether_common::sd_notify::Notifier::disabled(),
        })
    }

    /// Sends systemd's READY=1 / STOPPING=1 through `notifier` (`tether server` under
    /// `Type=notify`).
    #[cfg(unix)]
    pub fn with_notifier(mut self, notifier: tether_common::sd_notify::Notifier) -> Server {
        self.notifier = notifier;
        self
    }

    #[cfg(unix)]
    fn notify(
        &self,
        state: fn(
            &tether_common::sd_notify::Notifier,
        ) -> Result<(), tether_common::sd_notify::NotifyError>,
    ) {
        if let Err(err) = state(&self.notifier) {
            warn!(error = %err, "systemd notification failed");
        }
    }

    /// The session registry (for tests and embedding).
    pub fn registry(&self) -> Arc<SessionRegistry> {
        self.registry.clone()
    }

    /// This process's server id (`X-Tether-Server`).
    pub fn server_id(&self) -> &str {
        &self.server_id
    }

    /// The handle that applies new configs to this server while it runs
    /// ([`ServerReloader::reload`]).
    pub fn reloader(&self) -> ServerReloader {
        self.reloader.clone()
    }

    /// The handle on the TLS material in force (reloaded through [`reloader`](Self::reloader)).
    pub fn tls_reloader(&self) -> TlsReloader {
        self.tls.clone()
    }

    /// The metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The audit log (reopen it on SIGHUP so logrotate works).
    pub fn audit_log(&self) -> AuditLog {
        self.audit.clone()
    }

    /// The handle that reloads the frontends' consumers and settings in place (take it before
    /// [`run`](Self::run)).
    pub fn frontend_control(&self) -> FrontendControl {
        self.frontends.clone()
    }

    /// Serves until `shutdown` is cancelled, then drains and returns.
    pub async fn run(
        self,
        listeners: Listeners,
        shutdown: CancellationToken,
    ) -> Result<(), ServerError> {
        listeners.check(&self.config)?;
        let remotedialer = auth_from_config(&self.config.remotedialer).map_err(one)?;
        let life = Lifecycle::new(shutdown);
        let readiness = Arc::new(Readiness::default());
        let tunnel_addr = display_addr(&listeners.tunnel);
        let admin_addr = display_addr(&listeners.admin);

        self.start_agents(listeners.tunnel, remotedialer, &life);
        let consumers = self.consumer_context(&life).await?;
        self.start_forwards(&consumers, listeners.forwards);
        self.start_proxies(&consumers, listeners.frontends);
        self.start_health(&life);
        let peers = consumers.dialer.relay.as_ref().map(|r| r.links.clone());
        self.start_admin(listeners.admin, readiness.clone(), peers, &life);

        readiness.set_ready();
        #[cfg(unix)]
        self.notify(tether_common::sd_notify::Notifier::ready);
        info!(
            listen = %tunnel_addr,
            admin = %admin_addr,
            server.id = %self.server_id,
            "server running"
        );

        life.shutdown.cancelled().await;
        readiness.set_draining();
        #[cfg(unix)]
        self.notify(tether_common::sd_notify::Notifier::stopping);
        self.drain(life).await;
        info!("server stopped");
        Ok(())
    }
}

/// Builds a [`Server`] and runs it until `shutdown` (the daemon's library entry point).
pub async fn run(
    config: ServerConfig,
    listeners: Listeners,
    registry: &prometheus::Registry,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
    Server::new(config, registry)?
        .run(listeners, shutdown)
        .await
}
