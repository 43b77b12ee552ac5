//! `Server`: builds TLS, metrics and the registry from a `ServerConfig`, runs the tunnel,
//! forward, proxy frontend and admin listeners on one task tracker, and shuts down in order:
//! stop accepting, GOAWAY, drain streams up to `drain_timeout`, close sessions, wait for the
//! tasks (bounded).

use std::collections::HashSet;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use http::HeaderValue;
use rustls::server::danger::ClientCertVerifier;
use tether_common::cert_expiry::CertRole;
use tether_common::config_diff::ReloadMetrics;
use tether_common::config_error::ConfigErrors;
use tether_common::tls::{self, TlsError};
use tether_common::tls_check;
use tether_proto::GoAwayCode;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, info, info_span, warn};

use crate::admin::{self, AdminState, Readiness};
use crate::audit::AuditLog;
use crate::config::ServerConfig;
use crate::connect::{self, ConnectState};
use crate::frontend::{self, Frontend, FrontendControl, Kind};
use crate::health::HealthChecker;
use crate::metrics::ServerMetrics;
use crate::peers::links::{Dialer, Links};
use crate::peers::listener::PeerListener;
use crate::peers::metrics::PeerMetrics;
use crate::peers::relay::Relay;
use crate::peers::serve::Served;
use crate::peers::tls::PeerTls;
use crate::registry::SessionRegistry;
use crate::reload::{ForwardSet, ServerReloader};
use crate::tls_reload::{TlsReloadMetrics, TlsReloader};
use crate::tunnel::{self, Tunnel};
use crate::tunnel_dial::TunnelDialer;
use tether_common::log_throttle::LogThrottle;

/// How long the tasks get to finish once the sessions are closed.
const TASK_GRACE: Duration = Duration::from_secs(5);
/// How often the drain checks whether streams are left.
const DRAIN_POLL: Duration = Duration::from_millis(50);
/// How often a repeated failure of one kind may be logged at warn.
const LOG_WINDOW: Duration = Duration::from_secs(60);

/// Why the server could not be built or run.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The configuration failed validation.
    #[error("invalid configuration:\n{0}")]
    Config(#[from] ConfigErrors),
    /// The TLS material could not be loaded.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The metrics could not be registered (for example, registered twice).
    #[error("cannot register metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// A listener could not be bound.
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        /// Which listener (`listen`, `admin_listen`, `forwards[0].listen`).
        what: String,
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// A frontend listener was given without its `frontends.*_listen` key, or the reverse.
    #[error("frontends.{key} and the listener given do not match: {why}")]
    FrontendListener {
        /// The config key (`http_connect_listen`, `socks5_listen`).
        key: &'static str,
        /// What is missing.
        why: &'static str,
    },
    /// The audit log could not start.
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditError),
    /// Enrollment could not start (its issuer files).
    #[error(transparent)]
    Enrollment(#[from] crate::enrollment::EnrollmentError),
    /// `Listeners::forwards` does not match `ServerConfig::forwards`.
    #[error("{got} forward listeners were given for {expected} configured forwards")]
    ForwardListeners {
        /// Configured forwards.
        expected: usize,
        /// Listeners given.
        got: usize,
    },
}

/// The bound sockets the server runs on (tests bind `127.0.0.1:0`).
#[derive(Debug)]
pub struct Listeners {
    /// The tunnel listener (mutual TLS).
    pub tunnel: TcpListener,
    /// The admin listener (plain HTTP).
    pub admin: TcpListener,
    /// `forwards[i]` serves `config.forwards[i]`.
    pub forwards: Vec<TcpListener>,
    /// The consumer proxy listeners, present exactly when configured.
    pub frontends: FrontendListeners,
}

/// The listeners of the consumer frontends (`frontends.http_connect_listen`,
/// `frontends.socks5_listen`); `None` for a frontend that is off.
#[derive(Debug, Default)]
pub struct FrontendListeners {
    /// The HTTP CONNECT proxy listener.
    pub http_connect: Option<TcpListener>,
    /// The SOCKS5 proxy listener.
    pub socks5: Option<TcpListener>,
}

impl FrontendListeners {
    /// Binds the frontend addresses of `config` that are set.
    pub async fn bind(config: &ServerConfig) -> Result<FrontendListeners, ServerError> {
        let frontends = &config.frontends;
        let mut out = FrontendListeners::default();
        if let Some(addr) = frontends.http_connect_addr().map_err(one)? {
            out.http_connect = Some(bind("frontends.http_connect_listen", addr).await?);
        }
        if let Some(addr) = frontends.socks5_addr().map_err(one)? {
            out.socks5 = Some(bind("frontends.socks5_listen", addr).await?);
        }
        Ok(out)
    }
}

impl Listeners {
    /// Binds every address of `config`.
    pub async fn bind(config: &ServerConfig) -> Result<Listeners, ServerError> {
        let tunnel = bind("listen", config.listen_addr().map_err(one)?).await?;
        let admin = bind("admin_listen", config.admin_addr().map_err(one)?).await?;
        let mut forwards = Vec::with_capacity(config.forwards.len());
        for (i, f) in config.forwards.iter().enumerate() {
            let what = format!("forwards[{i}].listen");
            let addr = f
                .listen_addr()
                .map_err(|m| one(tether_common::config_error::FieldError::new(&what, m)))?;
            forwards.push(bind(&what, addr).await?);
        }
        let frontends = FrontendListeners::bind(config).await?;
        Ok(Listeners {
            tunnel,
            admin,
            forwards,
            frontends,
        })
    }
}

fn one(err: tether_common::config_error::FieldError) -> ServerError {
    ServerError::Config(ConfigErrors(vec![err]))
}

async fn bind(what: &str, addr: SocketAddr) -> Result<TcpListener, ServerError> {
    tether_common::listen::bind(addr).map_err(|source| ServerError::Bind {
        what: what.to_owned(),
        addr,
        source,
    })
}

/// A configured server, ready to [`run`](Server::run).
#[derive(Debug)]
pub struct Server {
    config: ServerConfig,
    allowed: Arc<ArcSwap<HashSet<String>>>,
    agent_slots: Arc<Semaphore>,
    reloader: ServerReloader,
    tls: TlsReloader,
    metrics: ServerMetrics,
    prometheus: prometheus::Registry,
    registry: Arc<SessionRegistry>,
    server_id: String,
    frontends: FrontendControl,
    audit: AuditLog,
    /// The enrollment routes (`enrollment:`).
    enrollment: Option<Arc<crate::enrollment::Enrollment>>,
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
        let peer_tls = match &config.peers {
            Some(peers) => Some(PeerTls::load(peers, &files)?),
            None => None,
        };
        let mut server = Self::build(
            config,
            tls.config,
            Some(tls.verifier),
            fingerprint,
            registry,
        )?;
        server.peer_tls = peer_tls;
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
        let mut metrics = ServerMetrics::register(registry)?;
        metrics.set_server_id(&server_id);
        if config.metrics.remotedialer_compat {
            metrics = metrics.with_remotedialer_compat(registry)?;
        }
        let sessions = Arc::new(SessionRegistry::new(metrics.clone()).with_replica(&server_id));
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
            Some(section) => Some(Arc::new(crate::enrollment::Enrollment::new(
                section,
                config.tls.client_ca.clone(),
                allowed.clone(),
                crate::enrollment::EnrollmentMetrics::register(registry)?,
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
    pub fn metrics(&self) -> &ServerMetrics {
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

    /// With `peers:` set: binds the peer listener and starts it and the peer dialer; returns
    /// the relay for dials this replica holds no session for. `local` is how a relayed dial
    /// is served here (never relayed again).
    async fn start_peering(
        &self,
        local: &TunnelDialer,
        tracker: &TaskTracker,
        shutdown: &CancellationToken,
        hard_stop: &CancellationToken,
    ) -> Result<Option<Relay>, ServerError> {
        let (Some(peers), Some(tls)) = (&self.config.peers, &self.peer_tls) else {
            return Ok(None);
        };
        let addr = crate::config::parse_socket_addr(&peers.listen).map_err(|m| {
            one(tether_common::config_error::FieldError::new(
                "peers.listen",
                m,
            ))
        })?;
        let listener = bind("peers.listen", addr).await?;
        info!(listen = %display_addr(&listener), "peer listener listening");
        let links = Arc::new(Links::default());
        let mux_config = self.config.to_mux_config();
        let dialer = Dialer {
            config: peers.clone(),
            tls: tls.clone(),
            mux_config: mux_config.clone(),
            server_id: self.server_id.clone(),
            links: links.clone(),
            metrics: self.peer_metrics.clone(),
            tracker: tracker.clone(),
        };
        tracker.spawn(
            dialer
                .run(hard_stop.clone())
                .instrument(info_span!("peer_dialer")),
        );
        let peer_listener = Arc::new(PeerListener {
            tls: tls.clone(),
            mux_config,
            served: Served {
                local: local.clone(),
                server_id: self.server_id.clone(),
                metrics: self.peer_metrics.clone(),
                request_timeout: peers.relay_timeout.0,
                tracker: tracker.clone(),
            },
            tracker: tracker.clone(),
            log: LogThrottle::new(LOG_WINDOW),
        });
        tracker.spawn(
            peer_listener
                .run(listener, shutdown.clone(), hard_stop.clone())
                .instrument(info_span!("peer_listener")),
        );
        Ok(Some(Relay::new(
            links,
            self.peer_metrics.clone(),
            peers.relay_timeout.0,
        )))
    }

    /// Serves until `shutdown` is cancelled, then drains and returns.
    pub async fn run(
        self,
        listeners: Listeners,
        shutdown: CancellationToken,
    ) -> Result<(), ServerError> {
        let config = &self.config;
        if listeners.forwards.len() != config.forwards.len() {
            return Err(ServerError::ForwardListeners {
                expected: config.forwards.len(),
                got: listeners.forwards.len(),
            });
        }
        for (i, f) in config.forwards.iter().enumerate() {
            f.target_addr().map_err(|m| {
                one(tether_common::config_error::FieldError::new(
                    format!("forwards[{i}].target"),
                    m,
                ))
            })?;
        }
        let frontend_config = &config.frontends;
        for (key, configured, given) in [
            (
                "http_connect_listen",
                frontend_config.http_connect_addr().map_err(one)?.is_some(),
                listeners.frontends.http_connect.is_some(),
            ),
            (
                "socks5_listen",
                frontend_config.socks5_addr().map_err(one)?.is_some(),
                listeners.frontends.socks5.is_some(),
            ),
        ] {
            if configured != given {
                let why = if configured {
                    "configured but no listener was given"
                } else {
                    "a listener was given but the key is empty"
                };
                return Err(ServerError::FrontendListener { key, why });
            }
        }
        let remotedialer =
            crate::remotedialer_connect::auth_from_config(&config.remotedialer).map_err(one)?;
        let tracker = TaskTracker::new();
        let hard_stop = CancellationToken::new();
        let admin_stop = CancellationToken::new();
        let readiness = Arc::new(Readiness::default());
        let tunnel_addr = display_addr(&listeners.tunnel);
        let admin_addr = display_addr(&listeners.admin);

        // Tunnel listener.
        let connect_state = Arc::new(ConnectState {
            allowed: self.allowed.clone(),
            agent_slots: self.agent_slots.clone(),
            metrics: self.metrics.clone(),
            server_id: HeaderValue::from_str(&self.server_id)
                .unwrap_or(HeaderValue::from_static("unknown")),
            shutdown: shutdown.clone(),
            max_frame: config.session.max_frame as usize,
            log: LogThrottle::new(LOG_WINDOW),
            remotedialer,
            history: self.registry.history().clone(),
            enrollment: self.enrollment.clone(),
            // Capabilities (issue 27).
            caps: config.to_mux_config().offer(),
        });
        let tunnel = Arc::new(Tunnel {
            tls: self.tls.clone(),
            identity: config.identity,
            handshake_timeout: config.handshake_timeout.0,
            pending: Arc::new(Semaphore::new(config.max_pending_handshakes)),
            sources: crate::admission::SlotTable::new(config.max_pending_handshakes_per_source),
            identities: crate::admission::SlotTable::new(tunnel::MAX_PENDING_PER_IDENTITY),
            registry: self.registry.clone(),
            metrics: self.metrics.clone(),
            mux_config: config.to_mux_config(),
            rd_close_linger: config.remotedialer.close_linger.0,
            rd_sync_grace: config.remotedialer.sync_grace.0,
            router: connect::router(connect_state),
            shutdown: shutdown.clone(),
            hard_stop: hard_stop.clone(),
            tracker: tracker.clone(),
            log: LogThrottle::new(LOG_WINDOW),
        });
        tracker.spawn(
            tunnel::accept_loop(tunnel, listeners.tunnel).instrument(info_span!("tunnel_listener")),
        );

        // Replica peering, then the dialer the forwards and frontends share.
        let local_dialer = TunnelDialer {
            registry: self.registry.clone(),
            metrics: self.metrics.clone(),
            dial_timeout: config.dial_timeout.0,
            audit: self.audit.clone(),
            relay: None,
        };
        let relay = self
            .start_peering(&local_dialer, &tracker, &shutdown, &hard_stop)
            .await?;
        let dialer = TunnelDialer {
            relay,
            ..local_dialer
        };

        // Forwards, each stoppable on its own by a reload.
        let mut forward_set = ForwardSet::new(
            dialer.clone(),
            shutdown.clone(),
            hard_stop.clone(),
            tracker.clone(),
        );
        for (f, listener) in config.forwards.iter().zip(listeners.forwards) {
            forward_set.start(f.clone(), listener);
        }
        self.reloader.install_forwards(forward_set);

        // Consumer frontends: HTTP CONNECT and SOCKS5 proxies.
        for (kind, listener) in [
            (Kind::HttpConnect, listeners.frontends.http_connect),
            (Kind::Socks5, listeners.frontends.socks5),
        ] {
            let Some(listener) = listener else { continue };
            info!(frontend = kind.label(), listen = %display_addr(&listener), "frontend listening");
            let frontend = Arc::new(Frontend::new(
                kind,
                dialer.clone(),
                self.frontends.clone(),
                frontend_config.max_connections,
                self.metrics.clone(),
                shutdown.clone(),
                hard_stop.clone(),
                tracker.clone(),
            ));
            tracker.spawn(frontend::accept_loop(frontend, listener));
        }

        // Health checker: pings every session until shutdown starts.
        let health =
            HealthChecker::new(self.registry.clone(), self.metrics.clone(), &config.health);
        tracker.spawn(
            health
                .run(shutdown.clone())
                .instrument(info_span!("health_checker")),
        );

        // Admin listener: stays up while draining so /readyz and /metrics can be watched.
        let admin_router = admin::router(Arc::new(AdminState {
            registry: self.registry.clone(),
            prometheus: self.prometheus.clone(),
            readiness: readiness.clone(),
            server_id: self.server_id.clone(),
            reloader: self.reloader.clone(),
        }));
        tracker.spawn(
            crate::admin_listener::serve(
                listeners.admin,
                admin_router,
                crate::admin_listener::ADMIN_LIMITS,
                admin_stop.clone(),
            )
            .instrument(info_span!("admin_listener")),
        );

        readiness.set_ready();
        #[cfg(unix)]
        self.notify(tether_common::sd_notify::Notifier::ready);
        info!(
            listen = %tunnel_addr,
            admin = %admin_addr,
            server.id = %self.server_id,
            "server running"
        );

        shutdown.cancelled().await;
        readiness.set_draining();
        #[cfg(unix)]
        self.notify(tether_common::sd_notify::Notifier::stopping);
        let drain = config.drain_timeout.0;
        info!(
            sessions = self.registry.session_count(),
            drain_timeout = ?drain,
            "shutting down: GOAWAY to agents, draining streams"
        );
        // `restart`: this replica goes away, the fleet does not; agents keep their sessions to
        // the other replicas and come back here when it is up again.
        self.registry
            .goaway_all(GoAwayCode::Restart, "server shutting down");
        let left = drain_streams(&self.registry, drain).await;
        if left > 0 {
            warn!(
                streams = left,
                "drain timeout passed; resetting the streams left"
            );
        }
        hard_stop.cancel();
        self.registry.close_all();
        admin_stop.cancel();
        tracker.close();
        if tokio::time::timeout(TASK_GRACE, tracker.wait())
            .await
            .is_err()
        {
            warn!(
                tasks = tracker.len(),
                "tasks still running after the shutdown grace period; abandoning them"
            );
        }
        // The connections' last audit lines are queued by now; let the writer catch up.
        self.audit.flush(TASK_GRACE).await;
        info!("server stopped");
        Ok(())
    }
}

fn display_addr(listener: &TcpListener) -> String {
    listener
        .local_addr()
        .map_or_else(|e| format!("unknown ({e})"), |a| a.to_string())
}

/// Waits until no stream is open or `limit` has passed; returns the streams left.
async fn drain_streams(registry: &SessionRegistry, limit: Duration) -> usize {
    let deadline = Instant::now() + limit;
    loop {
        let left = registry.active_streams();
        if left == 0 || Instant::now() >= deadline {
            return left;
        }
        tokio::time::sleep_until(deadline.min(Instant::now() + DRAIN_POLL)).await;
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
