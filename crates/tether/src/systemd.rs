//! systemd integration of the daemons: the notifier from `NOTIFY_SOCKET` and the watchdog task.

use tether_common::sd_notify::{self, Notifier};
use tracing::{info, warn};

use crate::AbortOnDrop;

/// What a daemon holds while it runs under systemd; dropping it stops the watchdog pings.
pub(crate) struct Systemd {
    /// READY / STOPPING (given to the daemon library) and RELOADING (for a reload handler).
    pub(crate) notifier: Notifier,
    _watchdog: Option<AbortOnDrop>,
}

/// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID`. Without them (not started by
/// systemd) every notification is a no-op. Malformed values are logged and ignored: systemd
/// will then report the missing READY or watchdog ping, which names the problem better than an
/// exit would.
pub(crate) fn start() -> Systemd {
    let notifier = Notifier::from_env().unwrap_or_else(|err| {
        warn!(error = %err, "ignoring the systemd notify socket");
        Notifier::disabled()
    });
    let watchdog = match sd_notify::watchdog_interval_from_env() {
        Ok(Some(interval)) if notifier.is_enabled() => {
            info!(interval = ?interval, "sending systemd watchdog pings");
            Some(AbortOnDrop(tokio::spawn(sd_notify::run_watchdog(
                notifier.clone(),
                interval,
            ))))
        }
        Ok(_) => None,
        Err(err) => {
            warn!(error = %err, "ignoring the systemd watchdog settings");
            None
        }
    };
    Systemd {
        notifier,
        _watchdog: watchdog,
    }
}
