//! Tracing subscriber set-up for the binary: an EnvFilter and text or JSON output on stderr,
//! with a handle that swaps the filter at runtime (the config's `log` key on reload). Colour
//! only when stderr is a terminal and `NO_COLOR` is unset; JSON is never coloured.

use std::io::IsTerminal;
use std::sync::Arc;

use tracing_subscriber::EnvFilter;

use crate::cli::LogFormat;

type Swap = dyn Fn(EnvFilter) -> Result<(), String> + Send + Sync;

/// Swaps the log filter of the global subscriber. Cheap to clone.
#[derive(Clone)]
pub(crate) struct LogControl {
    /// The filter given on the command line or in `TETHER_LOG`, which beats the config.
    pinned: Option<String>,
    swap: Arc<Swap>,
}

impl LogControl {
    /// Applies the config's `log` filter unless `--log`/`TETHER_LOG` pinned one. An empty
    /// filter means `info`; an invalid one is reported and the current filter stays.
    pub(crate) fn apply_config(&self, filter: &str) {
        if self.pinned.is_some() {
            return;
        }
        let filter = if filter.is_empty() { "info" } else { filter };
        match EnvFilter::try_new(filter) {
            Ok(parsed) => match (self.swap)(parsed) {
                Ok(()) => tracing::debug!(log = filter, "log filter in effect"),
                Err(err) => tracing::warn!(%err, "cannot change the log filter"),
            },
            Err(err) => {
                tracing::warn!(%err, log = filter, "invalid log filter in the config; keeping the current one")
            }
        }
    }
}

/// Installs the global subscriber with `pinned` (or `fallback` when `None`). An invalid filter
/// falls back to `info` with a warning.
pub(crate) fn init(pinned: Option<String>, fallback: &str, format: LogFormat) -> LogControl {
    let text = pinned.as_deref().unwrap_or(fallback);
    let (filter, bad) = match EnvFilter::try_new(text) {
        Ok(filter) => (filter, None),
        Err(err) => (EnvFilter::new("info"), Some(err)),
    };
    let swap: Arc<Swap> = match format {
        LogFormat::Text => {
            let builder = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_ansi(colour(
                    std::io::stderr().is_terminal(),
                    std::env::var_os("NO_COLOR"),
                ))
                .with_writer(std::io::stderr)
                .with_filter_reloading();
            let handle = builder.reload_handle();
            builder.init();
            Arc::new(move |f| handle.reload(f).map_err(|e| e.to_string()))
        }
        LogFormat::Json => {
            let builder = tracing_subscriber::fmt()
                .json()
                .with_ansi(false)
                .with_env_filter(filter)
                .with_writer(std::io::stderr)
                .with_filter_reloading();
            let handle = builder.reload_handle();
            builder.init();
            Arc::new(move |f| handle.reload(f).map_err(|e| e.to_string()))
        }
    };
    if let Some(err) = bad {
        tracing::warn!(%err, "invalid log filter; using `info`");
    }
    LogControl { pinned, swap }
}

/// Whether text logs are coloured: only on a terminal, and never when `NO_COLOR` is set to a
/// non-empty value (no-color.org).
fn colour(terminal: bool, no_color: Option<std::ffi::OsString>) -> bool {
    terminal && no_color.is_none_or(|v| v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::colour;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(colour(true, None));
        assert!(colour(true, Some("".into())));
        assert!(!colour(true, Some("1".into())));
        assert!(!colour(false, None));
    }
}
