//! What triggers a config reload in the daemons (SIGHUP, or the contents of the config file or
//! of a TLS file it names changing) and the one function per daemon that reloads: load the
//! effective config again and hand it to the library's reloader.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tether_agent::AgentReloader;
use tether_common::config_layers::FlagOverride;
use tether_common::sd_notify::Notifier;
use tether_server::ServerReloader;
use tracing::{debug, info};

use crate::config_load::{self, Overrides};
use crate::logging::LogControl;
use crate::signals;

/// How often the config file is checked for changes.
const FILE_POLL: Duration = Duration::from_secs(1);

/// Why a reload happens, for the log line.
#[derive(Debug, Clone, Copy)]
enum Trigger {
    Sighup,
    FileChanged,
}

impl Trigger {
    fn label(self) -> &'static str {
        match self {
            Trigger::Sighup => "sighup",
            Trigger::FileChanged => "file_changed",
        }
    }
}

/// SIGHUP and changes of the config file's or the watched TLS files' contents, as a stream of
/// triggers.
struct Triggers {
    path: PathBuf,
    fingerprint: Option<u64>,
    /// TLS material named by the config in force, with the fingerprints last seen.
    watched: Vec<(PathBuf, Option<u64>)>,
    #[cfg(unix)]
    sighup: Option<tokio::signal::unix::Signal>,
}

impl Triggers {
    fn new(path: &Path) -> Triggers {
        Triggers {
            path: path.to_owned(),
            fingerprint: fingerprint(path),
            watched: Vec::new(),
            #[cfg(unix)]
            sighup: signals::sighup(),
        }
    }

    /// Watches `paths` from now on (the TLS files of the config in force); a path watched
    /// already keeps its baseline.
    fn watch(&mut self, paths: Vec<PathBuf>) {
        self.watched = paths
            .into_iter()
            .map(|path| {
                let seen = self
                    .watched
                    .iter()
                    .find(|(p, _)| *p == path)
                    .map_or_else(|| fingerprint(&path), |(_, f)| *f);
                (path, seen)
            })
            .collect();
    }

    async fn next(&mut self) -> Trigger {
        loop {
            tokio::select! {
                _ = recv_sighup(&mut self.sighup) => {
                    // The files read by this reload are the baseline for change detection.
                    self.fingerprint = fingerprint(&self.path);
                    for (path, seen) in &mut self.watched {
                        *seen = fingerprint(path);
                    }
                    return Trigger::Sighup;
                }
                _ = tokio::time::sleep(FILE_POLL) => {
                    let mut changed = changed(&self.path, &mut self.fingerprint);
                    for (path, seen) in &mut self.watched {
                        // Every changed file takes its new baseline now.
                        changed |= self::changed(path, seen);
                    }
                    if changed {
                        return Trigger::FileChanged;
                    }
                }
            }
        }
    }
}

#[cfg(unix)]
async fn recv_sighup(sighup: &mut Option<tokio::signal::unix::Signal>) {
    match sighup {
        Some(stream) => {
            if stream.recv().await.is_none() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending::<()>().await,
    }
}

/// Whether `path`'s contents differ from `seen` (then `seen` is updated). A file that vanished
/// (e.g. mid-replace) is not a change to act on.
fn changed(path: &Path, seen: &mut Option<u64>) -> bool {
    let now = fingerprint(path);
    if now.is_some() && now != *seen {
        *seen = now;
        return true;
    }
    false
}

fn fingerprint(path: &Path) -> Option<u64> {
    let bytes = std::fs::read(path).ok()?;
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut hasher);
    Some(hasher.finish())
}

/// Reloads the agent on every trigger until dropped (the caller aborts the task). The SIGHUP
/// handler is installed now, before the future is spawned, so an early SIGHUP never takes the
/// default action (terminate).
pub(crate) fn agent_reloads(
    path: PathBuf,
    flags: Vec<FlagOverride>,
    reloader: AgentReloader,
    logs: LogControl,
    notifier: Notifier,
) -> impl Future<Output = ()> + Send {
    let mut triggers = Triggers::new(&path);
    triggers.watch(reloader.watched_files());
    async move {
        loop {
            let trigger = triggers.next().await;
            notify(&notifier, Notifier::reloading, "RELOADING");
            reload_agent(&path, &flags, &reloader, &logs, trigger);
            triggers.watch(reloader.watched_files());
            notify(&notifier, Notifier::ready, "READY");
        }
    }
}

/// One agent reload: the effective config from the file, environment and flags, applied.
fn reload_agent(
    path: &Path,
    flags: &[FlagOverride],
    reloader: &AgentReloader,
    logs: &LogControl,
    trigger: Trigger,
) {
    info!(trigger = trigger.label(), config = %path.display(), "reloading config");
    let overrides = Overrides {
        env: &config_load::process_env,
        flags,
    };
    match config_load::load_agent(path, &overrides) {
        // The reloader logs and counts the outcome; the log filter is ours to apply.
        Ok(config) => {
            let log = config.log.clone();
            if reloader.reload(config).is_ok() {
                logs.apply_config(&log);
            }
        }
        Err(err) => reloader.reject(&err),
    }
}

/// Reloads the server on every trigger until dropped (the caller aborts the task); the SIGHUP
/// handler is installed now, as for the agent.
pub(crate) fn server_reloads(
    path: PathBuf,
    flags: Vec<FlagOverride>,
    reloader: ServerReloader,
    logs: LogControl,
    notifier: Notifier,
) -> impl Future<Output = ()> + Send {
    let mut triggers = Triggers::new(&path);
    triggers.watch(reloader.watched_files());
    async move {
        loop {
            let trigger = triggers.next().await;
            notify(&notifier, Notifier::reloading, "RELOADING");
            reload_server(&path, &flags, &reloader, &logs, trigger).await;
            triggers.watch(reloader.watched_files());
            notify(&notifier, Notifier::ready, "READY");
        }
    }
}

/// systemd hears `RELOADING=1` (with `MONOTONIC_USEC`) before a reload and `READY=1` after it,
/// whatever its outcome: the old config keeps running when the new one is refused. A failed
/// notification costs only systemd's view of the reload, so it is logged at debug.
fn notify(
    notifier: &Notifier,
    send: fn(&Notifier) -> Result<(), tether_common::sd_notify::NotifyError>,
    state: &str,
) {
    if let Err(err) = send(notifier) {
        debug!(state, error = %err, "cannot notify systemd");
    }
}

/// One server reload: the effective config from the file, environment and flags, applied.
async fn reload_server(
    path: &Path,
    flags: &[FlagOverride],
    reloader: &ServerReloader,
    logs: &LogControl,
    trigger: Trigger,
) {
    info!(trigger = trigger.label(), config = %path.display(), "reloading config");
    // The overrides borrow a non-`Sync` lookup: keep them out of the await below.
    let loaded = {
        let overrides = Overrides {
            env: &config_load::process_env,
            flags,
        };
        config_load::load_server(path, &overrides)
    };
    match loaded {
        Ok(config) => {
            let log = config.log.clone();
            match reloader.reload(config).await {
                Ok(_) => logs.apply_config(&log),
                Err(errors) => debug!(errors = errors.len(), "server reload rejected"),
            }
        }
        Err(err) => {
            reloader.reject(&err);
            // The TLS files named by the running config may still have changed (a new CRL);
            // the reloader logs and counts the outcome.
            let _ = reloader.reload_tls().await;
        }
    }
}
