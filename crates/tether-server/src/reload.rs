//! Server config reloads: diff the new effective config against the running one field by field,
//! apply in place what can be (the allow-list, `max_agents`, the log filter (applied by the
//! binary, which owns the subscriber), forwards: added, removed and changed ones restarted
//! without touching the others, the TLS material (`tls_reload.rs`), after which live sessions
//! that would now be refused are closed), and log and count the keys that need a restart
//! (listener addresses, session settings). One section, one `apply_*` step: the
//! HTTP CONNECT / SOCKS5 frontends' consumers and handshake settings go through
//! `FrontendControl::reload`; their listener keys need a restart.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use tether_common::config_diff::{ReloadMetrics, ReloadOutcome, ReloadResult, changed_fields};
use tether_common::config_error::{ConfigErrors, FieldError};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use crate::agents::registry::SessionRegistry;
use crate::config::{ForwardConfig, ServerConfig};
use crate::consumers::audit::AuditLog;
use crate::consumers::context::ConsumerContext;
use crate::consumers::forward::{self, Forward};
use crate::consumers::proxy_control::FrontendControl;
use crate::peers::tls::PeerTls;
use crate::tls_reload::TlsReloader;
use tether_common::tls::TlsError;

/// Keys applied in place; every other changed key needs a restart (config/server.yaml lists
/// them in its header; a test holds the two together).
pub const IN_PLACE_KEYS: &[&str] = &[
    "allowed_agents",
    "max_agents",
    "forwards",
    "log",
    "frontends.consumers",
    "frontends.anonymous_clients",
    "frontends.handshake_timeout",
];
/// How long a removed forward's accept loop may take to release its listener.
const FORWARD_STOP_GRACE: Duration = Duration::from_secs(5);

/// A forward's accept loop and how to stop it.
struct RunningForward {
    config: ForwardConfig,
    addr: Option<SocketAddr>,
    last_error: Arc<forward::LastError>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

/// What new forwards are built from; installed by `Server::run`.
pub(crate) struct ForwardSet {
    running: BTreeMap<String, RunningForward>,
    /// What every forward shares (dialer, audit log, lifecycle).
    ctx: ConsumerContext,
}

impl ForwardSet {
    pub(crate) fn new(ctx: ConsumerContext) -> ForwardSet {
        ForwardSet {
            running: BTreeMap::new(),
            ctx,
        }
    }

    /// Starts the accept loop of `config` on `listener`. Its connections outlive a later stop
    /// of the loop (they end with the server's drain).
    pub(crate) fn start(&mut self, config: ForwardConfig, listener: TcpListener) {
        let Ok(target) = config.target_addr() else {
            // Validated configs have parsable targets.
            warn!(forward = %config.name, "forward target does not parse; not started");
            return;
        };
        let bound = listener.local_addr().ok();
        let shown = bound.map_or_else(|| "unknown".to_owned(), |a| a.to_string());
        info!(
            forward = %config.name,
            listen = %shown,
            agent.id = %config.client,
            %target,
            "forward listening"
        );
        let stop = self.ctx.shutdown.child_token();
        let forward = Arc::new(Forward::new(
            config.name.clone(),
            config.client.clone(),
            target,
            ConsumerContext {
                shutdown: stop.clone(),
                ..self.ctx.clone()
            },
        ));
        let last_error = forward.last_error.clone();
        let span = info_span!("forward", forward = %config.name);
        let task = self
            .ctx
            .tracker
            .spawn(forward::accept_loop(forward, listener).instrument(span));
        self.running.insert(
            config.name.clone(),
            RunningForward {
                config,
                addr: bound,
                last_error,
                stop,
                task,
            },
        );
    }
}

/// Applies new configs to a running server. Cheap to clone.
#[derive(Clone)]
pub struct ServerReloader {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ServerReloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerReloader").finish_non_exhaustive()
    }
}

struct Inner {
    running: Mutex<ServerConfig>,
    /// The last accepted config as given, restart-only keys included: reloads are compared
    /// with it, so that a restart-only change is announced once, not by every later reload.
    accepted: Mutex<ServerConfig>,
    /// One reload at a time (held while old forwards release their listeners).
    serial: tokio::sync::Mutex<()>,
    allowed: Arc<ArcSwap<HashSet<String>>>,
    agent_slots: Arc<Semaphore>,
    forwards: Mutex<Option<ForwardSet>>,
    frontends: FrontendControl,
    registry: Arc<SessionRegistry>,
    metrics: ReloadMetrics,
    /// Reopened by every reload attempt (SIGHUP after logrotate moved the file).
    audit: AuditLog,
    /// The TLS material in force; installed by `Server::new`.
    tls: Mutex<Option<TlsReloader>>,
    /// The peering's TLS material (with `peers:`), reloaded with the server's.
    peer_tls: Mutex<Option<PeerTls>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Values behind these locks are replaced whole, so a poisoned lock is still consistent.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl ServerReloader {
    pub(crate) fn new(
        config: ServerConfig,
        allowed: Arc<ArcSwap<HashSet<String>>>,
        agent_slots: Arc<Semaphore>,
        frontends: FrontendControl,
        registry: Arc<SessionRegistry>,
        metrics: ReloadMetrics,
        audit: AuditLog,
    ) -> ServerReloader {
        ServerReloader {
            inner: Arc::new(Inner {
                accepted: Mutex::new(config.clone()),
                running: Mutex::new(config),
                serial: tokio::sync::Mutex::new(()),
                allowed,
                agent_slots,
                forwards: Mutex::new(None),
                frontends,
                registry,
                metrics,
                audit,
                tls: Mutex::new(None),
                peer_tls: Mutex::new(None),
            }),
        }
    }

    pub(crate) fn install_tls(&self, tls: TlsReloader) {
        *lock(&self.inner.tls) = Some(tls);
    }

    pub(crate) fn install_peer_tls(&self, tls: PeerTls) {
        *lock(&self.inner.peer_tls) = Some(tls);
    }

    /// Reloads the peer TLS material (its own files and the listener's `server` files);
    /// whether new material was applied.
    fn reload_peer_tls(&self, server: &tether_common::tls::ServerTlsFiles) -> bool {
        let peer_tls = lock(&self.inner.peer_tls).clone();
        peer_tls.is_some_and(|tls| tls.reload(server))
    }

    /// The files to watch besides the config file: the TLS material in force (empty when it
    /// was given in memory), and the peer TLS material.
    pub fn watched_files(&self) -> Vec<std::path::PathBuf> {
        let file_backed = lock(&self.inner.tls)
            .as_ref()
            .is_some_and(TlsReloader::file_backed);
        if !file_backed {
            return Vec::new();
        }
        let files = self.current().tls_files();
        let mut paths = vec![files.cert, files.key, files.client_ca];
        paths.extend(files.crls);
        paths.extend(
            lock(&self.inner.peer_tls)
                .iter()
                .flat_map(PeerTls::watched_files),
        );
        paths
    }

    pub(crate) fn install_forwards(&self, set: ForwardSet) {
        *lock(&self.inner.forwards) = Some(set);
    }

    /// The bound address of every running forward, by name.
    pub fn forward_addrs(&self) -> BTreeMap<String, SocketAddr> {
        lock(&self.inner.forwards)
            .as_ref()
            .map(|set| {
                set.running
                    .iter()
                    .filter_map(|(name, f)| Some((name.clone(), f.addr?)))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The last failed dial of every running forward that had one, by name.
    pub fn forward_errors(&self) -> BTreeMap<String, crate::admin::ForwardError> {
        lock(&self.inner.forwards)
            .as_ref()
            .map(|set| {
                set.running
                    .iter()
                    .filter_map(|(name, f)| Some((name.clone(), f.last_error.get()?)))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Counts and logs a new config that could not even be loaded (unreadable file, bad YAML);
    /// the running config stays in force. The audit log is reopened all the same.
    pub fn reject(&self, error: &dyn std::fmt::Display) {
        self.inner.audit.reopen();
        self.inner.metrics.reject(error);
    }

    /// Reloads only the TLS material, from the files the config in force names (used when the
    /// config file itself cannot be loaded: a CRL update still applies, and a TLS file that
    /// went bad is refused and reported as such).
    pub async fn reload_tls(&self) -> Result<bool, TlsError> {
        let _serial = self.inner.serial.lock().await;
        let Some(tls) = lock(&self.inner.tls)
            .clone()
            .filter(TlsReloader::file_backed)
        else {
            return Ok(false);
        };
        let running = self.current();
        let prepared = tls.prepare(&running.tls_files(), running.client_cert_policy())?;
        let peers_applied = self.reload_peer_tls(&running.tls_files());
        match prepared {
            Some(prepared) => {
                tls.commit(prepared);
                tls.sweep();
                Ok(true)
            }
            None => Ok(peers_applied),
        }
    }

    /// The config in force.
    pub fn current(&self) -> ServerConfig {
        lock(&self.inner.running).clone()
    }

    /// Reloads with `config` (paths resolved, layers merged). Logs and counts the result.
    /// Every call reopens the audit log file first, so SIGHUP after logrotate works.
    pub async fn reload(&self, config: ServerConfig) -> Result<ReloadOutcome, ConfigErrors> {
        let _serial = self.inner.serial.lock().await;
        self.inner.audit.reopen();
        let outcome = self.try_reload(config).await;
        self.inner.metrics.report(&outcome);
        outcome
    }

    async fn try_reload(&self, config: ServerConfig) -> Result<ReloadOutcome, ConfigErrors> {
        let tls_handle = lock(&self.inner.tls).clone();
        let tls = tls_handle.clone().filter(TlsReloader::file_backed);
        let mut config = validated(config, tls.as_ref())?;
        let old = self.current();
        // The TLS files are read and checked before anything is applied; bad material rejects
        // the whole reload. The client-certificate policy follows `remotedialer`, which needs a
        // restart, so the running one is kept.
        let prepared = match &tls {
            Some(tls) => tls
                .prepare(&config.tls_files(), old.client_cert_policy())
                .map_err(|e| ConfigErrors(vec![FieldError::new("tls", e.to_string())]))?,
            None => None,
        };
        let accepted = lock(&self.inner.accepted).clone();
        let mut changed = changed_fields(&accepted, &config);
        if prepared.is_some() && !changed.iter().any(|k| k.starts_with("tls.")) {
            changed.push("tls.material".to_owned());
        }
        // The peer material reloads on its own: bad files are refused (logged, counted)
        // without rejecting the rest of the reload.
        if self.reload_peer_tls(&config.tls_files()) {
            changed.push("peers.material".to_owned());
        }
        if changed.is_empty() {
            return Ok(ReloadOutcome {
                result: ReloadResult::Unchanged,
                changed,
                restart_required: Vec::new(),
            });
        }
        let tls_in_place = tls.is_some();
        let in_place = |field: &str| {
            IN_PLACE_KEYS
                .iter()
                .chain(tls_in_place.then_some(&"tls"))
                .any(|k| field == *k || field.starts_with(&format!("{k}.")))
        };
        // Restart-only keys that changed now and differ from what runs (a key set back to its
        // running value needs nothing).
        let pending = changed_fields(&old, &config);
        let restart_required: Vec<String> = changed
            .iter()
            .filter(|f| !in_place(f) && pending.contains(f))
            .cloned()
            .collect();
        let only_restart = changed.iter().all(|f| !in_place(f));
        let given = config.clone();
        if old.forwards != config.forwards {
            self.apply_forwards(&old.forwards, &config.forwards).await?;
        }
        if old.frontends != config.frontends {
            // Consumers and handshake settings apply to the next consumer connection; the
            // listener keys are reported below as needing a restart.
            self.inner.frontends.reload(&config.frontends)?;
        }
        self.apply_allowed(&config);
        self.apply_max_agents(old.max_agents, config.max_agents);
        let tls_changed = prepared.is_some();
        if let (Some(tls), Some(prepared)) = (&tls, prepared) {
            tls.commit(prepared);
        }
        if tls_changed || old.allowed_agents != config.allowed_agents {
            // Live sessions that the new material or allow-list would refuse are closed.
            if let Some(tls) = &tls_handle {
                tls.sweep();
            }
        }
        // Keys that need a restart keep their running values, so that the next reload still
        // sees (and reports) the difference.
        for key in pending.iter().filter(|f| !in_place(f)) {
            restore_key(&mut config, &old, key);
        }
        *lock(&self.inner.running) = config;
        *lock(&self.inner.accepted) = given;
        Ok(ReloadOutcome {
            result: if only_restart && !restart_required.is_empty() {
                ReloadResult::RestartRequired
            } else {
                ReloadResult::Applied
            },
            changed,
            restart_required,
        })
    }

    fn apply_allowed(&self, config: &ServerConfig) {
        let allowed: HashSet<String> = config.allowed_agents.iter().cloned().collect();
        for client in config
            .allowed_agents
            .iter()
            .chain(config.forwards.iter().map(|f| &f.client))
        {
            self.inner.registry.declare_client(client);
        }
        self.inner.allowed.store(Arc::new(allowed));
    }

    fn apply_max_agents(&self, old: usize, new: usize) {
        let slots = &self.inner.agent_slots;
        if new > old {
            slots.add_permits(new - old);
        } else if new < old {
            // Free slots go at once; sessions above the new cap are not closed, so the cap is
            // reached as they end.
            let forgotten = slots.forget_permits(old - new);
            if forgotten < old - new {
                warn!(
                    max_agents = new,
                    over = old - new - forgotten,
                    "max_agents lowered below the live sessions; they are kept"
                );
            }
        }
    }

    /// Stops removed and changed forwards and starts added and changed ones; untouched
    /// forwards keep running. New listeners on free addresses are bound before anything is
    /// stopped, so a bind failure leaves the running forwards as they were.
    async fn apply_forwards(
        &self,
        old: &[ForwardConfig],
        new: &[ForwardConfig],
    ) -> Result<(), ConfigErrors> {
        let old_by_name: BTreeMap<&str, &ForwardConfig> =
            old.iter().map(|f| (f.name.as_str(), f)).collect();
        let new_by_name: BTreeMap<&str, &ForwardConfig> =
            new.iter().map(|f| (f.name.as_str(), f)).collect();
        let to_stop: Vec<&ForwardConfig> = old
            .iter()
            .filter(|f| new_by_name.get(f.name.as_str()) != Some(f))
            .collect();
        let to_start: Vec<(usize, &ForwardConfig)> = new
            .iter()
            .enumerate()
            .filter(|(_, f)| old_by_name.get(f.name.as_str()) != Some(f))
            .collect();
        let freed: HashSet<String> = to_stop.iter().map(|f| f.listen.clone()).collect();

        // 1. Bind what does not wait for a stopped forward.
        let mut bound = Vec::new();
        let mut errors = ConfigErrors::new();
        for (i, f) in &to_start {
            if freed.contains(&f.listen) {
                continue;
            }
            match bind(f) {
                Ok(listener) => bound.push(((*f).clone(), listener)),
                Err(message) => errors.push(format!("forwards[{i}].listen"), message),
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        // 2. Stop removed and changed forwards; wait until their listeners are closed.
        let stopped: Vec<RunningForward> = {
            let mut guard = lock(&self.inner.forwards);
            let Some(set) = guard.as_mut() else {
                return Err(ConfigErrors(vec![FieldError::new(
                    "forwards",
                    "the server is not running yet; forwards cannot be reloaded",
                )]));
            };
            to_stop
                .iter()
                .filter_map(|f| set.running.remove(&f.name))
                .collect()
        };
        for forward in stopped {
            info!(forward = %forward.config.name, "forward stopped by reload");
            forward.stop.cancel();
            if tokio::time::timeout(FORWARD_STOP_GRACE, forward.task)
                .await
                .is_err()
            {
                warn!(forward = %forward.config.name, "forward did not stop in time");
            }
        }
        // 3. Bind the rest and start everything new.
        for (i, f) in &to_start {
            if freed.contains(&f.listen) {
                match bind(f) {
                    Ok(listener) => bound.push(((*f).clone(), listener)),
                    Err(message) => errors.push(format!("forwards[{i}].listen"), message),
                }
            }
        }
        let mut guard = lock(&self.inner.forwards);
        if let Some(set) = guard.as_mut() {
            for (config, listener) in bound {
                set.start(config, listener);
            }
        }
        errors.into_result(())
    }
}

fn bind(forward: &ForwardConfig) -> Result<TcpListener, String> {
    let addr: SocketAddr = forward.listen_addr()?;
    tether_common::listen::bind(addr).map_err(|e| format!("cannot listen on {addr}: {e}"))
}

/// Puts the running value of the top-level key of `path` back into `config`.
fn restore_key(config: &mut ServerConfig, running: &ServerConfig, path: &str) {
    let top = path.split('.').next().unwrap_or(path);
    match path {
        "frontends.http_connect_listen" => {
            config.frontends.http_connect_listen = running.frontends.http_connect_listen.clone();
            return;
        }
        "frontends.socks5_listen" => {
            config.frontends.socks5_listen = running.frontends.socks5_listen.clone();
            return;
        }
        "frontends.max_connections" => {
            config.frontends.max_connections = running.frontends.max_connections;
            return;
        }
        _ => {}
    }
    match top {
        "version" => config.version = running.version,
        "listen" => config.listen = running.listen.clone(),
        "admin_listen" => config.admin_listen = running.admin_listen.clone(),
        "tls" => config.tls = running.tls.clone(),
        "identity" => config.identity = running.identity,
        "handshake_timeout" => config.handshake_timeout = running.handshake_timeout,
        "max_pending_handshakes" => config.max_pending_handshakes = running.max_pending_handshakes,
        "max_pending_handshakes_per_source" => {
            config.max_pending_handshakes_per_source = running.max_pending_handshakes_per_source
        }
        "dial_timeout" => config.dial_timeout = running.dial_timeout,
        "drain_timeout" => config.drain_timeout = running.drain_timeout,
        "session" => config.session = running.session.clone(),
        "health" => config.health = running.health.clone(),
        "metrics" => config.metrics = running.metrics.clone(),
        "remotedialer" => config.remotedialer = running.remotedialer.clone(),
        "audit_log" => config.audit_log = running.audit_log.clone(),
        // Also keeps the handshake's client-certificate policy, which follows it.
        "enrollment" => config.enrollment = running.enrollment.clone(),
        _ => {}
    }
}

/// `config` validated and with its defaults filled in; a TLS file that is missing or not a
/// file is reported to `tls` as refused material too.
fn validated(
    config: ServerConfig,
    tls: Option<&TlsReloader>,
) -> Result<ServerConfig, ConfigErrors> {
    if let Err(errors) = config.validate() {
        if let Some(tls) = tls
            && let Some(bad) = errors.0.iter().find(|e| e.path.starts_with("tls."))
        {
            tls.reject(&format!("{}: {}", bad.path, bad.message));
        }
        return Err(errors);
    }
    Ok(config.effective())
}
