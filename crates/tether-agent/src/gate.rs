//! The activation gate (DESIGN.md lesson 1): whether this agent should dial at all, from the
//! role and features the cluster reports (a static value, environment variables or a watched
//! file) against the ones the tunnel requires. Evaluated before any dial and re-evaluated every
//! `poll_interval`; an unreadable source is a reason to stay idle, never a crash.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use prometheus::IntGaugeVec;
use serde::{Deserialize, Serialize};
use tether_common::config_error::ConfigErrors;
use tether_common::duration::HumanDuration;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tracing::info;

/// Longest accepted role or feature name, and the most features a source may list.
const MAX_NAME_LEN: usize = 63;
const MAX_FEATURES: usize = 64;
/// Largest role file read; a bigger one is a reason, not an allocation.
const MAX_FILE_BYTES: u64 = 64 * 1024;

/// `activation:` of agent.yaml. With no requirement the gate is always enabled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ActivationConfig {
    /// The cluster's role must be one of these; empty accepts any role.
    pub require_role: Vec<String>,
    /// The cluster must report every one of these features.
    pub require_features: Vec<String>,
    /// Where the cluster's role and features come from.
    pub source: ClusterSource,
    /// How often the source is read again (a watched file is noticed within this).
    pub poll_interval: HumanDuration,
}

impl Default for ActivationConfig {
    fn default() -> Self {
        Self {
            require_role: Vec::new(),
            require_features: Vec::new(),
            source: ClusterSource::default(),
            poll_interval: HumanDuration::secs(1),
        }
    }
}

/// `activation.source:` where the cluster's role and features come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterSource {
    /// `static` (the `role` and `features` below), `env` (`role_env`, `features_env`) or
    /// `file` (a YAML file with `role:` and `features:`, e.g. a mounted ConfigMap).
    pub from: SourceKind,
    /// `from: static`: the role.
    pub role: String,
    /// `from: static`: the features.
    pub features: Vec<String>,
    /// `from: env`: the variable holding the role.
    pub role_env: String,
    /// `from: env`: the variable holding the features, comma-separated.
    pub features_env: String,
    /// `from: file`: the file; relative to the config file's directory.
    pub file: PathBuf,
}

impl Default for ClusterSource {
    fn default() -> Self {
        Self {
            from: SourceKind::Static,
            role: String::new(),
            features: Vec::new(),
            role_env: "TETHER_CLUSTER_ROLE".to_owned(),
            features_env: "TETHER_CLUSTER_FEATURES".to_owned(),
            file: PathBuf::new(),
        }
    }
}

/// The kinds of [`ClusterSource`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    /// Values in the config.
    Static,
    /// Environment variables.
    Env,
    /// A watched YAML file.
    File,
}

/// The contents of a role file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RoleFile {
    #[serde(default)]
    role: String,
    #[serde(default)]
    features: Vec<String>,
}

/// The gate's decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GateState {
    /// The agent dials the server.
    Enabled,
    /// The agent stays idle, for this reason.
    Disabled(String),
}

impl GateState {
    /// The `state` label of `tether_agent_gate`.
    pub fn label(&self) -> &'static str {
        match self {
            GateState::Enabled => "enabled",
            GateState::Disabled(_) => "disabled",
        }
    }

    /// Whether dialing is allowed.
    pub fn is_enabled(&self) -> bool {
        matches!(self, GateState::Enabled)
    }
}

impl ActivationConfig {
    /// Makes a relative `source.file` relative to `base_dir`.
    pub fn resolve_paths(&mut self, base_dir: &Path) {
        let file = &mut self.source.file;
        if !file.as_os_str().is_empty() && file.is_relative() {
            *file = base_dir.join(&*file);
        }
    }

    /// Checks the section; errors carry their `activation.` key path.
    pub fn validate(&self, errors: &mut ConfigErrors) {
        for (i, name) in self.require_role.iter().enumerate() {
            check_name(&format!("activation.require_role[{i}]"), name, errors);
        }
        for (i, name) in self.require_features.iter().enumerate() {
            check_name(&format!("activation.require_features[{i}]"), name, errors);
        }
        let s = &self.source;
        match s.from {
            SourceKind::Static => {}
            SourceKind::Env => {
                if s.role_env.is_empty() && s.features_env.is_empty() {
                    errors.push(
                        "activation.source.role_env",
                        "`from: env` needs role_env or features_env",
                    );
                }
            }
            SourceKind::File => {
                if s.file.as_os_str().is_empty() {
                    errors.push("activation.source.file", "`from: file` needs a file");
                }
            }
        }
        let poll = self.poll_interval.0;
        if poll < Duration::from_millis(10) || poll > Duration::from_secs(60) {
            errors.push(
                "activation.poll_interval",
                format!("{} is outside 10ms..=60s", self.poll_interval),
            );
        }
    }

    /// Reads the source and decides. `env` looks up environment variables.
    pub fn evaluate(&self, env: &dyn Fn(&str) -> Option<String>) -> GateState {
        if self.require_role.is_empty() && self.require_features.is_empty() {
            return GateState::Enabled;
        }
        let (role, features) = match self.read_source(env) {
            Ok(found) => found,
            Err(reason) => return GateState::Disabled(reason),
        };
        if !self.require_role.is_empty() && !self.require_role.contains(&role) {
            let reason = if role.is_empty() {
                format!(
                    "the cluster reports no role; one of [{}] is required",
                    self.require_role.join(", ")
                )
            } else {
                format!(
                    "cluster role `{role}` is not one of [{}]",
                    self.require_role.join(", ")
                )
            };
            return GateState::Disabled(reason);
        }
        let missing: Vec<&str> = self
            .require_features
            .iter()
            .filter(|f| !features.contains(f))
            .map(String::as_str)
            .collect();
        if !missing.is_empty() {
            return GateState::Disabled(format!(
                "required features missing: [{}]",
                missing.join(", ")
            ));
        }
        GateState::Enabled
    }

    fn read_source(
        &self,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<(String, Vec<String>), String> {
        let s = &self.source;
        let (role, features) = match s.from {
            SourceKind::Static => (s.role.clone(), s.features.clone()),
            SourceKind::Env => {
                let role = lookup(env, &s.role_env).unwrap_or_default();
                let features = lookup(env, &s.features_env)
                    .map(|v| {
                        v.split(',')
                            .map(|f| f.trim().to_owned())
                            .filter(|f| !f.is_empty())
                            .collect()
                    })
                    .unwrap_or_default();
                (role.trim().to_owned(), features)
            }
            SourceKind::File => read_role_file(&s.file)?,
        };
        if features.len() > MAX_FEATURES {
            return Err(format!(
                "the role source lists {} features; at most {MAX_FEATURES} are read",
                features.len()
            ));
        }
        Ok((role, features))
    }
}

fn lookup(env: &dyn Fn(&str) -> Option<String>, var: &str) -> Option<String> {
    if var.is_empty() { None } else { env(var) }
}

fn read_role_file(path: &Path) -> Result<(String, Vec<String>), String> {
    use std::io::Read;
    let file = std::fs::File::open(path)
        .map_err(|e| format!("cannot read role file {}: {e}", path.display()))?;
    let mut text = String::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| format!("cannot read role file {}: {e}", path.display()))?;
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(format!(
            "role file {} is larger than {MAX_FILE_BYTES} bytes",
            path.display()
        ));
    }
    if text.trim().is_empty() {
        return Ok((String::new(), Vec::new()));
    }
    let parsed: RoleFile = serde_yaml_ng::from_str(&text).map_err(|e| {
        format!(
            "role file {} is not `role: <name>` / `features: [..]` YAML: {e}",
            path.display()
        )
    })?;
    Ok((parsed.role.trim().to_owned(), parsed.features))
}

fn check_name(path: &str, name: &str, errors: &mut ConfigErrors) {
    if name.is_empty()
        || name.len() > MAX_NAME_LEN
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        errors.push(
            path,
            format!("`{name}` must be 1..={MAX_NAME_LEN} letters, digits, `-`, `_` or `.`"),
        );
    }
}

/// How the agent reads environment variables (the activation gate's `from: env` source).
pub type EnvLookup = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// The running gate: holds the config (swapped by reloads), publishes the decision on a
/// `watch` channel and in `tether_agent_gate{state}`, and logs each change once at info.
pub(crate) struct Gate {
    config: Arc<ArcSwap<ActivationConfig>>,
    changed: Arc<Notify>,
    state: watch::Sender<GateState>,
    metric: IntGaugeVec,
    env: EnvLookup,
}

/// The handle a reload uses to swap the gate's config; the gate re-evaluates at once.
#[derive(Clone)]
pub(crate) struct GateControl {
    config: Arc<ArcSwap<ActivationConfig>>,
    changed: Arc<Notify>,
}

impl GateControl {
    pub(crate) fn new(config: ActivationConfig) -> GateControl {
        GateControl {
            config: Arc::new(ArcSwap::from_pointee(config)),
            changed: Arc::new(Notify::new()),
        }
    }

    pub(crate) fn set(&self, config: ActivationConfig) {
        self.config.store(Arc::new(config));
        self.changed.notify_one();
    }
}

impl Gate {
    /// A gate evaluated once now (so the first decision is known before any dial), on the
    /// config `control` holds (a reload before `run` may have swapped it).
    pub(crate) fn new(control: GateControl, metric: IntGaugeVec, env: EnvLookup) -> Gate {
        let first = control.config.load().evaluate(env.as_ref());
        let gate = Gate {
            config: control.config,
            changed: control.changed,
            state: watch::channel(first.clone()).0,
            metric,
            env,
        };
        gate.publish_metric(&first);
        log_decision(&first);
        gate
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<GateState> {
        self.state.subscribe()
    }

    fn publish_metric(&self, state: &GateState) {
        for label in ["enabled", "disabled"] {
            self.metric
                .with_label_values(&[label])
                .set(i64::from(label == state.label()));
        }
    }

    /// Re-evaluates every `poll_interval`, or at once after a config swap, until `shutdown`.
    pub(crate) async fn run(self, shutdown: CancellationToken) {
        loop {
            let poll = self.config.load().poll_interval.0;
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                _ = self.changed.notified() => {}
                _ = tokio::time::sleep(poll) => {}
            }
            let next = self.config.load().evaluate(self.env.as_ref());
            if *self.state.borrow() != next {
                log_decision(&next);
                self.publish_metric(&next);
                self.state.send_replace(next);
            }
        }
    }
}

fn log_decision(state: &GateState) {
    match state {
        GateState::Enabled => info!(
            gate = "enabled",
            "activation gate enabled: dialing the server"
        ),
        GateState::Disabled(reason) => info!(
            gate = "disabled",
            %reason,
            "activation gate disabled: staying idle, no connection to the server"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(yaml: &str) -> ActivationConfig {
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn no_requirement_is_enabled() {
        assert_eq!(
            ActivationConfig::default().evaluate(&no_env),
            GateState::Enabled
        );
    }

    #[test]
    fn static_role_and_features() {
        let c = config(
            "require_role: [upstream]\nrequire_features: [mcm]\nsource: {from: static, role: upstream, features: [mcm, x]}\n",
        );
        assert_eq!(c.evaluate(&no_env), GateState::Enabled);
        let c = config(
            "require_role: [upstream]\nrequire_features: [mcm]\nsource: {from: static, role: downstream, features: [mcm]}\n",
        );
        let GateState::Disabled(reason) = c.evaluate(&no_env) else {
            panic!("enabled")
        };
        assert!(
            reason.contains("`downstream` is not one of [upstream]"),
            "{reason}"
        );
        let c = config("require_features: [mcm, b]\nsource: {from: static, features: [b]}\n");
        assert_eq!(
            c.evaluate(&no_env),
            GateState::Disabled("required features missing: [mcm]".into())
        );
    }

    #[test]
    fn env_source() {
        let c = config("require_role: [upstream]\nrequire_features: [mcm]\nsource: {from: env}\n");
        let env = |var: &str| match var {
            "TETHER_CLUSTER_ROLE" => Some("upstream".to_owned()),
            "TETHER_CLUSTER_FEATURES" => Some("a, mcm".to_owned()),
            _ => None,
        };
        assert_eq!(c.evaluate(&env), GateState::Enabled);
        assert!(!c.evaluate(&no_env).is_enabled());
    }

    #[test]
    fn file_source_and_unreadable_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("role.yaml");
        let c = config(&format!(
            "require_role: [upstream]\nsource: {{from: file, file: \"{}\"}}\n",
            path.display()
        ));
        let GateState::Disabled(reason) = c.evaluate(&no_env) else {
            panic!("enabled")
        };
        assert!(reason.starts_with("cannot read role file"), "{reason}");
        std::fs::write(&path, "role: upstream\nfeatures: []\n").unwrap();
        assert_eq!(c.evaluate(&no_env), GateState::Enabled);
        std::fs::write(&path, "role: [oops\n").unwrap();
        assert!(!c.evaluate(&no_env).is_enabled());
    }

    #[test]
    fn validation_names_the_keys() {
        let mut errors = ConfigErrors::new();
        config("require_role: [\"a b\"]\nsource: {from: file}\npoll_interval: 5ms\n")
            .validate(&mut errors);
        let text = errors.to_string();
        for key in [
            "activation.require_role[0]",
            "activation.source.file",
            "activation.poll_interval",
        ] {
            assert!(text.contains(key), "{key}: {text}");
        }
    }
}
