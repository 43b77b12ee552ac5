//! The start steps of [`Server::run`], one per side: the agents' listener, peering and the
//! consumers' dialer, the forwards, the proxies, the health checker and the admin listener.
//! Each spawns its tasks on the run's tracker and returns.

use std::sync::Arc;

use http::HeaderValue;
use tether_common::config_error::FieldError;
use tether_common::log_throttle::LogThrottle;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{Instrument, info, info_span};

use crate::admin::{self, AdminState, Readiness};
use crate::admission::SlotTable;
use crate::agents::health::HealthChecker;
use crate::agents::listener;
use crate::agents::listener_context::{ListenerContext, MAX_PENDING_PER_IDENTITY};
use crate::agents::upgrade::remotedialer_auth::RdAuth;
use crate::agents::upgrade::{self, context::UpgradeContext};
use crate::consumers::context::ConsumerContext;
use crate::consumers::dial::AgentDialer;
use crate::consumers::proxy::{Frontend, Kind};
use crate::consumers::proxy_listener;
use crate::peers::links::{Dialer, Links};
use crate::peers::listener::PeerListener;
use crate::peers::relay::Relay;
use crate::peers::serve::Served;
use crate::reload::ForwardSet;
use crate::server::error::{ServerError, one};
use crate::server::lifecycle::Lifecycle;
use crate::server::listeners::{FrontendListeners, bind, display_addr};
use crate::server::{LOG_WINDOW, Server};

impl Server {
    /// The agents' listener: TLS, the upgrade routes and the sessions they run.
    pub(crate) fn start_agents(
        &self,
        listener: TcpListener,
        remotedialer: Option<(String, RdAuth)>,
        life: &Lifecycle,
    ) {
        let config = &self.config;
        let upgrade_context = Arc::new(UpgradeContext {
            allowed: self.allowed.clone(),
            agent_slots: self.agent_slots.clone(),
            metrics: self.metrics.agents.clone(),
            server_id: HeaderValue::from_str(&self.server_id)
                .unwrap_or(HeaderValue::from_static("unknown")),
            shutdown: life.shutdown.clone(),
            max_frame: config.session.max_frame as usize,
            log: LogThrottle::new(LOG_WINDOW),
            remotedialer,
            history: self.registry.history().clone(),
            enrollment: self.enrollment.clone(),
            caps: config.to_mux_config().offer(),
        });
        let agents = Arc::new(ListenerContext {
            tls: self.tls.clone(),
            identity: config.identity,
            handshake_timeout: config.handshake_timeout.0,
            pending: Arc::new(Semaphore::new(config.max_pending_handshakes)),
            sources: SlotTable::new(config.max_pending_handshakes_per_source),
            identities: SlotTable::new(MAX_PENDING_PER_IDENTITY),
            registry: self.registry.clone(),
            metrics: self.metrics.agents.clone(),
            mux_config: config.to_mux_config(),
            rd_close_linger: config.remotedialer.close_linger.0,
            rd_sync_grace: config.remotedialer.sync_grace.0,
            router: upgrade::router(upgrade_context),
            shutdown: life.shutdown.clone(),
            hard_stop: life.hard_stop.clone(),
            tracker: life.tracker.clone(),
            log: LogThrottle::new(LOG_WINDOW),
        });
        life.tracker.spawn(
            listener::accept_loop(agents, listener).instrument(info_span!("tunnel_listener")),
        );
    }

    /// Replica peering, then what every consumer listener shares: the dialer (relaying
    /// through peers when `peers:` is set), the audit log and the lifecycle.
    pub(crate) async fn consumer_context(
        &self,
        life: &Lifecycle,
    ) -> Result<ConsumerContext, ServerError> {
        let local = AgentDialer {
            registry: self.registry.clone(),
            metrics: self.metrics.dial.clone(),
            health: self.metrics.health.clone(),
            dial_timeout: self.config.dial_timeout.0,
            relay: None,
        };
        let relay = self.start_peering(&local, life).await?;
        Ok(ConsumerContext {
            dialer: AgentDialer { relay, ..local },
            audit: self.audit.clone(),
            shutdown: life.shutdown.clone(),
            hard_stop: life.hard_stop.clone(),
            tracker: life.tracker.clone(),
        })
    }

    /// With `peers:` set: binds the peer listener and starts it and the peer dialer; returns
    /// the relay for dials this replica holds no session for. `local` is how a relayed dial
    /// is served here (never relayed again).
    async fn start_peering(
        &self,
        local: &AgentDialer,
        life: &Lifecycle,
    ) -> Result<Option<Relay>, ServerError> {
        let (Some(peers), Some(tls)) = (&self.config.peers, &self.peer_tls) else {
            return Ok(None);
        };
        let addr = crate::config::parse_socket_addr(&peers.listen)
            .map_err(|m| one(FieldError::new("peers.listen", m)))?;
        let listener = bind("peers.listen", addr).await?;
        info!(listen = %display_addr(&listener), "peer listener listening");
        let links = Arc::new(Links::new(addr));
        let mux_config = self.config.to_mux_config();
        let tracker = &life.tracker;
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
                .run(life.hard_stop.clone())
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
                .run(listener, life.shutdown.clone(), life.hard_stop.clone())
                .instrument(info_span!("peer_listener")),
        );
        Ok(Some(Relay::new(
            links,
            self.peer_metrics.clone(),
            peers.relay_timeout.0,
        )))
    }

    /// The forwards, each stoppable on its own by a reload.
    pub(crate) fn start_forwards(&self, ctx: &ConsumerContext, listeners: Vec<TcpListener>) {
        let mut forward_set = ForwardSet::new(ctx.clone());
        for (f, listener) in self.config.forwards.iter().zip(listeners) {
            forward_set.start(f.clone(), listener);
        }
        self.reloader.install_forwards(forward_set);
    }

    /// The consumer proxies that are configured: HTTP CONNECT and SOCKS5.
    pub(crate) fn start_proxies(&self, ctx: &ConsumerContext, listeners: FrontendListeners) {
        for (kind, listener) in [
            (Kind::HttpConnect, listeners.http_connect),
            (Kind::Socks5, listeners.socks5),
        ] {
            let Some(listener) = listener else { continue };
            info!(frontend = kind.label(), listen = %display_addr(&listener), "frontend listening");
            let frontend = Arc::new(Frontend::new(
                kind,
                ctx.clone(),
                self.frontends.clone(),
                self.config.frontends.max_connections,
                self.metrics.proxies.clone(),
            ));
            ctx.tracker
                .spawn(proxy_listener::accept_loop(frontend, listener));
        }
    }

    /// The health checker: pings every session until shutdown starts.
    pub(crate) fn start_health(&self, life: &Lifecycle) {
        let health = HealthChecker::new(
            self.registry.clone(),
            self.metrics.health.clone(),
            &self.config.health,
        );
        life.tracker.spawn(
            health
                .run(life.shutdown.clone())
                .instrument(info_span!("health_checker")),
        );
    }

    /// The admin listener: stays up while draining so `/readyz` and `/metrics` can be watched.
    pub(crate) fn start_admin(
        &self,
        listener: TcpListener,
        readiness: Arc<Readiness>,
        peers: Option<Arc<Links>>,
        life: &Lifecycle,
    ) {
        let router = admin::router(Arc::new(AdminState {
            registry: self.registry.clone(),
            prometheus: self.prometheus.clone(),
            readiness,
            server_id: self.server_id.clone(),
            reloader: self.reloader.clone(),
            peers,
        }));
        life.tracker.spawn(
            admin::listener::serve(
                listener,
                router,
                admin::listener::ADMIN_LIMITS,
                life.admin_stop.clone(),
            )
            .instrument(info_span!("admin_listener")),
        );
    }
}
