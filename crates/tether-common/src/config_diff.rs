//! Field-by-field comparison of two effective configs, the closed set of reload results and
//! the `tether_config_reloads_total{result}` counter both daemons export.

use prometheus::{IntCounter, IntCounterVec, Opts, Registry};
use serde::Serialize;
use serde_yaml_ng::Value;
use tracing::{info, warn};

use crate::config_error::ConfigErrors;

/// The key paths (`a.b.c`) whose values differ between `old` and `new`.
///
/// Maps are compared key by key; any other value (a list, a scalar) is compared whole and
/// reported under its own path. Compare *effective* configs (fallbacks already resolved), so
/// that a value spelled differently but meaning the same thing is not a change. Values are never
/// returned, only names: the caller may log them without leaking secrets.
pub fn changed_fields<T: Serialize>(old: &T, new: &T) -> Vec<String> {
    let (old, new) = match (serde_yaml_ng::to_value(old), serde_yaml_ng::to_value(new)) {
        (Ok(old), Ok(new)) => (old, new),
        // A config that cannot be represented as YAML cannot be compared: report it all.
        _ => return vec!["<config>".to_owned()],
    };
    let mut changed = Vec::new();
    diff_value("", &old, &new, &mut changed);
    changed
}

fn diff_value(path: &str, old: &Value, new: &Value, changed: &mut Vec<String>) {
    match (old, new) {
        (Value::Mapping(old), Value::Mapping(new)) => {
            let mut keys: Vec<&Value> = old.keys().chain(new.keys()).collect();
            keys.sort_by_key(|k| key_name(k));
            keys.dedup();
            for key in keys {
                let name = key_name(key);
                let sub = if path.is_empty() {
                    name
                } else {
                    format!("{path}.{name}")
                };
                match (old.get(key), new.get(key)) {
                    (Some(a), Some(b)) => diff_value(&sub, a, b, changed),
                    _ => changed.push(sub),
                }
            }
        }
        (old, new) if old == new => {}
        _ => changed.push(if path.is_empty() {
            "<config>".to_owned()
        } else {
            path.to_owned()
        }),
    }
}

fn key_name(key: &Value) -> String {
    match key {
        Value::String(s) => s.clone(),
        other => serde_yaml_ng::to_string(other)
            .map(|s| s.trim_end().to_owned())
            .unwrap_or_default(),
    }
}

/// What a reload did, the `result` label of `tether_config_reloads_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadResult {
    /// The effective config is the same: nothing was touched.
    Unchanged,
    /// Changes were applied in place; sessions and untouched listeners stayed up.
    Applied,
    /// Connection parameters changed: the session was re-established.
    Reconnected,
    /// Only keys that take effect at the next start changed: nothing was applied.
    RestartRequired,
    /// The new config was rejected; the old one keeps running.
    Invalid,
}

impl ReloadResult {
    /// Every result, in label order.
    pub const ALL: [ReloadResult; 5] = [
        ReloadResult::Unchanged,
        ReloadResult::Applied,
        ReloadResult::Reconnected,
        ReloadResult::RestartRequired,
        ReloadResult::Invalid,
    ];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            ReloadResult::Unchanged => "unchanged",
            ReloadResult::Applied => "applied",
            ReloadResult::Reconnected => "reconnected",
            ReloadResult::RestartRequired => "restart_required",
            ReloadResult::Invalid => "invalid",
        }
    }
}

/// What a reload did (a refused config is an `Err` instead).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadOutcome {
    /// `unchanged`, `applied`, `reconnected` (never on the server) or `restart_required`.
    pub result: ReloadResult,
    /// The key paths that changed since the previous accepted config (names only, never
    /// values).
    pub changed: Vec<String>,
    /// Keys of `changed` that only take effect at the next start. A key announced once is not
    /// announced again by later reloads that leave it as it is.
    pub restart_required: Vec<String>,
}

/// `tether_config_reloads_total{result}`. Cheap to clone; clones share the series.
#[derive(Debug, Clone)]
pub struct ReloadMetrics {
    /// The counter, every `result` series present from the start.
    pub reloads: IntCounterVec,
    /// `tether_config_restart_required_total`: reloads that changed keys which only take
    /// effect after a restart (e.g. a listener address).
    pub restart_required: IntCounter,
}

impl ReloadMetrics {
    /// Creates the counter and registers it into `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<ReloadMetrics> {
        let metrics = Self::unregistered()?;
        registry.register(Box::new(metrics.reloads.clone()))?;
        registry.register(Box::new(metrics.restart_required.clone()))?;
        Ok(metrics)
    }

    /// Creates the counter without registering it (a placeholder until `register`).
    pub fn unregistered() -> prometheus::Result<ReloadMetrics> {
        let reloads = IntCounterVec::new(
            Opts::new(
                "tether_config_reloads_total",
                "Config reloads (SIGHUP, file change or API), by result",
            ),
            &["result"],
        )?;
        for result in ReloadResult::ALL {
            reloads.with_label_values(&[result.label()]);
        }
        let restart_required = IntCounter::new(
            "tether_config_restart_required_total",
            "Config reloads that changed keys which only take effect after a restart",
        )?;
        Ok(ReloadMetrics {
            reloads,
            restart_required,
        })
    }

    /// Counts one reload.
    pub fn count(&self, result: ReloadResult) {
        self.reloads.with_label_values(&[result.label()]).inc();
    }

    /// Counts and logs one reload of either daemon: `config unchanged`, the changed key names,
    /// the keys that wait for a restart, or the errors of a refused config.
    pub fn report(&self, outcome: &Result<ReloadOutcome, ConfigErrors>) {
        match outcome {
            Ok(done) => {
                self.count(done.result);
                match done.result {
                    ReloadResult::Unchanged => {
                        info!(result = done.result.label(), "config unchanged")
                    }
                    ReloadResult::RestartRequired => warn!(
                        result = done.result.label(),
                        fields = ?done.restart_required,
                        "config changes take effect only after a restart; nothing applied"
                    ),
                    _ => {
                        info!(result = done.result.label(), changed = ?done.changed, "config reloaded");
                        if !done.restart_required.is_empty() {
                            warn!(
                                fields = ?done.restart_required,
                                "these config changes take effect only after a restart"
                            );
                        }
                    }
                }
                if !done.restart_required.is_empty() {
                    self.restart_required.inc();
                }
            }
            Err(errors) => self.reject(errors),
        }
    }

    /// Counts and logs a new config that was refused: invalid values, or a file that could not
    /// even be loaded (unreadable, bad YAML). The running config stays in force.
    pub fn reject(&self, error: &dyn std::fmt::Display) {
        self.count(ReloadResult::Invalid);
        warn!(
            result = "invalid",
            error = %error,
            "config reload rejected; the running config stays in force"
        );
    }

    /// The count of one result (tests, status).
    pub fn get(&self, result: ReloadResult) -> u64 {
        self.reloads.with_label_values(&[result.label()]).get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[derive(Serialize)]
    struct Inner {
        a: u32,
        list: Vec<u32>,
    }

    #[derive(Serialize)]
    struct Outer {
        name: String,
        inner: Inner,
        map: BTreeMap<String, String>,
    }

    fn outer(name: &str, a: u32, list: Vec<u32>, map: &[(&str, &str)]) -> Outer {
        Outer {
            name: name.to_owned(),
            inner: Inner { a, list },
            map: map
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        }
    }

    #[test]
    fn reports_leaf_paths_of_changed_values_only() {
        let old = outer("x", 1, vec![1, 2], &[("k", "v")]);
        assert!(changed_fields(&old, &outer("x", 1, vec![1, 2], &[("k", "v")])).is_empty());
        let new = outer("y", 2, vec![1, 2], &[("k", "v"), ("n", "m")]);
        assert_eq!(
            changed_fields(&old, &new),
            ["inner.a", "map.n", "name"].map(String::from)
        );
        let new = outer("x", 1, vec![2, 1], &[]);
        assert_eq!(
            changed_fields(&old, &new),
            ["inner.list", "map.k"].map(String::from)
        );
    }

    #[test]
    fn reload_counter_has_every_result() {
        let registry = Registry::new();
        let metrics = ReloadMetrics::register(&registry).unwrap();
        metrics.count(ReloadResult::Invalid);
        assert_eq!(metrics.get(ReloadResult::Invalid), 1);
        assert_eq!(metrics.get(ReloadResult::Unchanged), 0);
        let families = registry.gather();
        let reloads = families
            .iter()
            .find(|f| f.name() == "tether_config_reloads_total")
            .unwrap();
        assert_eq!(reloads.get_metric().len(), ReloadResult::ALL.len());
        assert_eq!(ReloadResult::RestartRequired.label(), "restart_required");
    }
}
