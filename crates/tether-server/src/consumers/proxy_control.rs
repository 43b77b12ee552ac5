//! In-place reload of the proxies' consumers and settings (`FrontendControl`): both listeners
//! see the new table on their next connection.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tether_common::config_error::ConfigErrors;
use tracing::info;

use crate::config::FrontendsConfig;
use crate::consumers::auth::ConsumerTable;

/// What reload can change without touching the listeners.
#[derive(Debug)]
pub(crate) struct Settings {
    pub(crate) consumers: ConsumerTable,
    pub(crate) handshake_timeout: Duration,
    /// The section these settings were built from (to tell a real change from none).
    config: FrontendsConfig,
}

impl Settings {
    fn from_config(config: &FrontendsConfig) -> Self {
        Self {
            consumers: ConsumerTable::from_config(config),
            handshake_timeout: config.handshake_timeout.0,
            config: config.clone(),
        }
    }
}

/// What a [`FrontendControl::reload`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FrontendReload {
    /// Keys of `frontends:` that changed and now apply to new consumer connections
    /// (`consumers`, `anonymous_clients`, `handshake_timeout`).
    pub applied: Vec<&'static str>,
    /// Keys that changed but only apply after a restart (`http_connect_listen`,
    /// `socks5_listen`, `max_connections`).
    pub needs_restart: Vec<&'static str>,
}

/// Reloads the frontends' consumers and settings in place; both listeners see the new table
/// on their next connection, connections already past their handshake are not touched.
#[derive(Debug, Clone)]
pub struct FrontendControl {
    settings: Arc<ArcSwap<Settings>>,
}

impl FrontendControl {
    pub(crate) fn new(config: &FrontendsConfig) -> Self {
        Self {
            settings: Arc::new(ArcSwap::from_pointee(Settings::from_config(config))),
        }
    }

    /// Applies the reloadable part of `new` if it differs from the current section; a section
    /// equal to the current one touches nothing. An invalid section changes nothing.
    pub fn reload(&self, new: &FrontendsConfig) -> Result<FrontendReload, ConfigErrors> {
        let mut errors = ConfigErrors::new();
        new.validate(&mut errors);
        errors.into_result(())?;
        let current = self.settings.load();
        let old = &current.config;
        let mut outcome = FrontendReload::default();
        for (key, changed) in [
            ("consumers", old.consumers != new.consumers),
            (
                "anonymous_clients",
                old.anonymous_clients != new.anonymous_clients,
            ),
            (
                "handshake_timeout",
                old.handshake_timeout != new.handshake_timeout,
            ),
        ] {
            if changed {
                outcome.applied.push(key);
            }
        }
        for (key, changed) in [
            (
                "http_connect_listen",
                old.http_connect_listen != new.http_connect_listen,
            ),
            ("socks5_listen", old.socks5_listen != new.socks5_listen),
            (
                "max_connections",
                old.max_connections != new.max_connections,
            ),
        ] {
            if changed {
                outcome.needs_restart.push(key);
            }
        }
        if !outcome.applied.is_empty() {
            // Keep the listener keys as they run, so a later reload still reports them.
            let mut applied = new.clone();
            applied.http_connect_listen = old.http_connect_listen.clone();
            applied.socks5_listen = old.socks5_listen.clone();
            applied.max_connections = old.max_connections;
            self.settings
                .store(Arc::new(Settings::from_config(&applied)));
            info!(changed = ?outcome.applied, "frontend consumers and settings reloaded");
        }
        if !outcome.needs_restart.is_empty() {
            info!(changed = ?outcome.needs_restart, "frontend listener settings change at the next restart");
        }
        Ok(outcome)
    }

    pub(crate) fn current(&self) -> Arc<Settings> {
        self.settings.load_full()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use tether_common::duration::HumanDuration;

    use super::*;

    #[test]
    fn reload_applies_only_what_changed_and_reports_restart_keys() {
        let initial = FrontendsConfig {
            http_connect_listen: "127.0.0.1:3128".into(),
            ..FrontendsConfig::default()
        };
        let control = FrontendControl::new(&initial);
        let before = control.current();

        // Equal: nothing is swapped.
        let outcome = control.reload(&initial).unwrap();
        assert_eq!(outcome, FrontendReload::default());
        assert!(Arc::ptr_eq(&before, &control.current()));

        // Listener keys only: reported, not swapped.
        let moved = FrontendsConfig {
            http_connect_listen: "127.0.0.1:3129".into(),
            max_connections: 5,
            ..initial.clone()
        };
        let outcome = control.reload(&moved).unwrap();
        assert!(outcome.applied.is_empty());
        assert_eq!(
            outcome.needs_restart,
            ["http_connect_listen", "max_connections"]
        );
        assert!(Arc::ptr_eq(&before, &control.current()));

        // Reloadable keys: swapped; the running listener keys are kept, so they are still
        // reported as pending next time.
        let faster = FrontendsConfig {
            handshake_timeout: HumanDuration::secs(3),
            anonymous_clients: vec!["edge-*".into()],
            ..moved.clone()
        };
        let outcome = control.reload(&faster).unwrap();
        assert_eq!(outcome.applied, ["anonymous_clients", "handshake_timeout"]);
        let now = control.current();
        assert_eq!(now.handshake_timeout, Duration::from_secs(3));
        assert_eq!(now.config.http_connect_listen, "127.0.0.1:3128");
        let outcome = control.reload(&faster).unwrap();
        assert!(outcome.applied.is_empty());
        assert_eq!(
            outcome.needs_restart,
            ["http_connect_listen", "max_connections"]
        );

        // Invalid: refused with the key path, nothing changes.
        let invalid = FrontendsConfig {
            handshake_timeout: HumanDuration::secs(0),
            ..faster
        };
        let err = control.reload(&invalid).unwrap_err().to_string();
        assert!(err.contains("frontends.handshake_timeout"), "{err}");
        assert_eq!(control.current().handshake_timeout, Duration::from_secs(3));
    }
}
