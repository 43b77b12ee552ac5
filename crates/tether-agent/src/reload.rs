//! Agent config reloads (DESIGN.md lesson 2): diff the new effective config against the running
//! one field by field and apply the least disruptive action: nothing, in place (policy, dial
//! timeout, backoff, activation gate, the log filter (applied by the binary), the TLS material:
//! the next handshake presents it, the live session stays), or a reconnect (server URL, TLS
//! name, connection and session settings). An invalid config or bad TLS material is rejected
//! and the old one keeps running.

use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use tether_common::cert_expiry::{CertExpiry, CertRole};
use tether_common::config_diff::{ReloadMetrics, ReloadOutcome, ReloadResult, changed_fields};
use tether_common::config_error::{ConfigErrors, FieldError};
use tether_common::tls;
use tether_common::tls_check;
use tether_mux::MuxConfig;
use tokio::sync::watch;

use crate::cert_watch::CertWatch;
use crate::config::{AgentConfig, DiscoveryConfig, ReconnectConfig};
use crate::connector::Connector;
use crate::gate::GateControl;
use crate::handler::SharedPolicy;
use crate::placement::PlacementSettings;
use crate::policy::Policy;

/// What a session is built from; a new value makes the supervisor reconnect.
pub(crate) struct ConnectSettings {
    pub(crate) connector: Connector,
    pub(crate) mux_config: MuxConfig,
}

/// Keys whose change needs a new session.
const RECONNECT_KEYS: &[&str] = &[
    "server_url",
    "servers",
    "server_name",
    "labels",
    "connect_timeout",
    "session",
    "protocol",
    "headers",
];
/// Keys that are only read at start-up.
const RESTART_KEYS: &[&str] = &["admin_listen", "version"];

/// The running agent's config and its TLS material fingerprint.
struct Running {
    config: AgentConfig,
    material: u64,
}

/// Applies new configs to a running (or not yet running) agent. Cheap to clone.
#[derive(Clone)]
pub struct AgentReloader {
    inner: Arc<Inner>,
}

struct Inner {
    running: Mutex<Running>,
    policy: SharedPolicy,
    dial_timeout: Arc<ArcSwap<Duration>>,
    reconnect: Arc<ArcSwap<ReconnectConfig>>,
    discovery: Arc<ArcSwap<DiscoveryConfig>>,
    placement: watch::Sender<PlacementSettings>,
    gate: GateControl,
    connect: watch::Sender<Arc<ConnectSettings>>,
    metrics: ReloadMetrics,
    instance_id: String,
    cert_expiry: CertExpiry,
    cert_watch: Arc<CertWatch>,
}

impl std::fmt::Debug for AgentReloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentReloader").finish_non_exhaustive()
    }
}

/// The parts of the agent a reload writes to.
pub(crate) struct ReloadTargets {
    pub(crate) policy: SharedPolicy,
    pub(crate) dial_timeout: Arc<ArcSwap<Duration>>,
    pub(crate) reconnect: Arc<ArcSwap<ReconnectConfig>>,
    pub(crate) discovery: Arc<ArcSwap<DiscoveryConfig>>,
    pub(crate) placement: watch::Sender<PlacementSettings>,
    pub(crate) gate: GateControl,
    pub(crate) connect: watch::Sender<Arc<ConnectSettings>>,
    pub(crate) metrics: ReloadMetrics,
    pub(crate) instance_id: String,
    pub(crate) cert_expiry: CertExpiry,
    pub(crate) cert_watch: Arc<CertWatch>,
}

impl AgentReloader {
    /// `config` is the effective config the agent was built from.
    pub(crate) fn new(config: AgentConfig, targets: ReloadTargets) -> AgentReloader {
        let material = material_fingerprint(&config).unwrap_or_default();
        AgentReloader {
            inner: Arc::new(Inner {
                running: Mutex::new(Running { config, material }),
                policy: targets.policy,
                dial_timeout: targets.dial_timeout,
                reconnect: targets.reconnect,
                discovery: targets.discovery,
                placement: targets.placement,
                gate: targets.gate,
                connect: targets.connect,
                metrics: targets.metrics,
                instance_id: targets.instance_id,
                cert_expiry: targets.cert_expiry,
                cert_watch: targets.cert_watch,
            }),
        }
    }

    /// Counts and logs a new config that could not even be loaded (unreadable file, bad YAML);
    /// the running config stays in force.
    pub fn reject(&self, error: &dyn std::fmt::Display) {
        self.inner.metrics.reject(error);
    }

    /// The files to watch besides the config file: the TLS material in force.
    pub fn watched_files(&self) -> Vec<std::path::PathBuf> {
        let files = self.lock().config.tls_files();
        vec![files.cert, files.key, files.server_ca]
    }

    /// The effective config in force.
    pub fn current(&self) -> AgentConfig {
        self.lock().config.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Running> {
        // A panic while holding the lock cannot leave `Running` half-written (it is replaced
        // whole), so a poisoned lock is still usable.
        self.inner
            .running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Reloads with `config` (paths resolved, layers merged). Logs and counts the result.
    pub fn reload(&self, config: AgentConfig) -> Result<ReloadOutcome, ConfigErrors> {
        let outcome = self.try_reload(config);
        self.inner.metrics.report(&outcome);
        outcome
    }

    fn try_reload(&self, config: AgentConfig) -> Result<ReloadOutcome, ConfigErrors> {
        let config = config.effective();
        config.validate()?;
        let material = material_fingerprint(&config).map_err(|e| ConfigErrors(vec![e]))?;
        let mut running = self.lock();
        let mut changed = changed_fields(&running.config, &config);
        if material != running.material && !changed.iter().any(|k| k.starts_with("tls.")) {
            changed.push("tls.material".to_owned());
        }
        if changed.is_empty() {
            return Ok(ReloadOutcome {
                result: ReloadResult::Unchanged,
                changed,
                restart_required: Vec::new(),
            });
        }
        let reconnect = changed.iter().any(|f| is_under(RECONNECT_KEYS, f));
        let restart_required: Vec<String> = changed
            .iter()
            .filter(|f| is_under(RESTART_KEYS, f))
            .cloned()
            .collect();
        // The running config takes the new values (admin_listen included, though it acts only
        // at the next start), so a later reload does not announce the same change again.
        let only_restart = restart_required.len() == changed.len();
        let prepared = self.prepare(&config, &changed, reconnect)?;
        self.apply(&running.config, &config, &changed, prepared);
        *running = Running { config, material };
        Ok(ReloadOutcome {
            result: if reconnect {
                ReloadResult::Reconnected
            } else if only_restart {
                ReloadResult::RestartRequired
            } else {
                ReloadResult::Applied
            },
            changed,
            restart_required,
        })
    }

    /// Builds everything of `config` that can fail, before anything is applied: the policy,
    /// new TLS material (loaded and checked: expired, a leaf as CA, a key for another
    /// certificate...) and, for a `reconnect`, the new connection settings.
    fn prepare(
        &self,
        config: &AgentConfig,
        changed: &[String],
        reconnect: bool,
    ) -> Result<Prepared, ConfigErrors> {
        let policy = config.compiled_policy()?;
        let tls_error =
            |e: tls::TlsError| ConfigErrors(vec![FieldError::new("tls", e.to_string())]);
        let new_tls = if changed.iter().any(|f| f.starts_with("tls.")) {
            Some(tls_check::load_client_tls(&config.tls_files()).map_err(tls_error)?)
        } else {
            None
        };
        let connect = if reconnect {
            let tls = match &new_tls {
                Some(loaded) => loaded.config.clone(),
                None => tls::client_config(&config.tls_files()).map_err(tls_error)?,
            };
            Some(ConnectSettings {
                connector: Connector::new(config, tls, &self.inner.instance_id)?,
                mux_config: config.to_mux_config(),
            })
        } else {
            None
        };
        Ok(Prepared {
            policy,
            new_tls,
            connect,
        })
    }

    /// Hands each changed part of `config` (over `old`) to the running agent.
    fn apply(
        &self,
        old: &AgentConfig,
        config: &AgentConfig,
        changed: &[String],
        prepared: Prepared,
    ) {
        let inner = &self.inner;
        if changed.iter().any(|f| f.starts_with("policy")) {
            inner.policy.store(Arc::new(prepared.policy));
        }
        inner.dial_timeout.store(Arc::new(config.dial_timeout.0));
        if old.reconnect != config.reconnect {
            inner.reconnect.store(Arc::new(config.reconnect.clone()));
        }
        if old.discovery != config.discovery {
            inner.discovery.store(Arc::new(config.discovery.clone()));
        }
        let k = config.placement.replicas_per_agent;
        inner.placement.send_if_modified(|p| {
            let changed = p.replicas_per_agent != k;
            p.replicas_per_agent = k;
            changed
        });
        if old.activation != config.activation {
            inner.gate.set(config.activation.clone());
        }
        if let Some(loaded) = &prepared.new_tls {
            self.apply_tls(loaded, prepared.connect.is_none());
        }
        if let Some(connect) = prepared.connect {
            inner.connect.send_replace(Arc::new(connect));
        }
    }

    /// New TLS material: the expiry watch and series; without a reconnect (`in_place`) the
    /// live session stays and the next handshake presents it.
    fn apply_tls(&self, loaded: &tls_check::LoadedClientTls, in_place: bool) {
        let inner = &self.inner;
        if in_place {
            inner
                .connect
                .borrow()
                .connector
                .set_tls(loaded.config.clone());
        }
        inner.cert_watch.set(&loaded.cert_chain);
        for (role, certs) in [
            (CertRole::Agent, &loaded.cert_chain),
            (CertRole::ServerCa, &loaded.server_cas),
        ] {
            if let Err(err) = inner.cert_expiry.record(role, certs) {
                tracing::warn!(cert = role.label(), error = %err, "cannot read the certificate expiry");
            }
        }
        tracing::info!("TLS material reloaded; the next handshake uses it");
    }
}

/// What a reload built before applying anything.
struct Prepared {
    policy: Policy,
    new_tls: Option<tls_check::LoadedClientTls>,
    connect: Option<ConnectSettings>,
}

/// Whether `field` is one of `keys` or inside one of them (`session` holds `session.window`).
fn is_under(keys: &[&str], field: &str) -> bool {
    keys.iter().any(|k| {
        field
            .strip_prefix(k)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
    })
}

/// A fingerprint of the TLS files' contents, so that replaced certificates at the same paths
/// count as a change. Only compared, never logged.
fn material_fingerprint(config: &AgentConfig) -> Result<u64, FieldError> {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for (key, path) in [
        ("tls.cert", &config.tls.cert),
        ("tls.key", &config.tls.key),
        ("tls.server_ca", &config.tls.server_ca),
    ] {
        let bytes = std::fs::read(path)
            .map_err(|e| FieldError::new(key, format!("cannot read {}: {e}", path.display())))?;
        bytes.hash(&mut hasher);
    }
    Ok(hasher.finish())
}
