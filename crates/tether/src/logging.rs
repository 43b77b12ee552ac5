//! Tracing subscriber set-up for the binary: an EnvFilter and text or JSON output on stderr,
//! with a handle that swaps the filter at runtime (the config's `log` key on reload). A log
//! write that fails is dropped and counted: logging never takes a daemon down. Colour only
//! when stderr is a terminal and `NO_COLOR` is unset; JSON is never coloured.

use std::io::{IsTerminal, Write};
use std::sync::Arc;

use prometheus::IntCounter;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

use crate::cli::LogFormat;

type Swap = dyn Fn(EnvFilter) -> Result<(), String> + Send + Sync;

/// Swaps the log filter of the global subscriber. Cheap to clone.
#[derive(Clone)]
pub(crate) struct LogControl {
    /// The filter given on the command line or in `TETHER_LOG`, which beats the config.
    pinned: Option<String>,
    swap: Arc<Swap>,
    write_errors: IntCounter,
}

impl LogControl {
    /// `tether_log_write_errors_total`: log lines that could not be written (full disk, a
    /// closed pipe, `/dev/full`), for the daemon's registry.
    pub(crate) fn write_errors(&self) -> IntCounter {
        self.write_errors.clone()
    }

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
/// falls back to `info` with a warning. Fails only if the write-error counter cannot be built.
pub(crate) fn init(
    pinned: Option<String>,
    fallback: &str,
    format: LogFormat,
) -> prometheus::Result<LogControl> {
    let text = pinned.as_deref().unwrap_or(fallback);
    let (filter, bad) = match EnvFilter::try_new(text) {
        Ok(filter) => (filter, None),
        Err(err) => (EnvFilter::new("info"), Some(err)),
    };
    let write_errors = IntCounter::new(
        "tether_log_write_errors_total",
        "Log lines dropped because writing them to stderr failed.",
    )?;
    let writer = QuietStderr {
        errors: write_errors.clone(),
    };
    let swap: Arc<Swap> = match format {
        LogFormat::Text => {
            let builder = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_ansi(colour(
                    std::io::stderr().is_terminal(),
                    std::env::var_os("NO_COLOR"),
                ))
                .with_writer(writer.clone())
                .log_internal_errors(false)
                .with_filter_reloading();
            let handle = builder.reload_handle();
            builder.init();
            Arc::new(move |f| handle.reload(f).map_err(|e| e.to_string()))
        }
        LogFormat::Json => {
            let builder = tracing_subscriber::fmt()
                .json()
                .with_env_filter(filter)
                .with_ansi(false)
                .with_writer(writer.clone())
                .log_internal_errors(false)
                .with_filter_reloading();
            let handle = builder.reload_handle();
            builder.init();
            Arc::new(move |f| handle.reload(f).map_err(|e| e.to_string()))
        }
    };
    if let Some(err) = bad {
        tracing::warn!(%err, "invalid log filter; using `info`");
    }
    Ok(LogControl {
        pinned,
        swap,
        write_errors,
    })
}

/// Stderr whose write errors are counted and swallowed. The fmt layer reports a failed write
/// with `eprintln!`, which panics when stderr itself is the problem; a swallowed error never
/// reaches it.
#[derive(Clone)]
struct QuietStderr {
    errors: IntCounter,
}

/// One event's writer: the event's bytes go out whole or are dropped and counted once.
struct QuietWriter<'a> {
    errors: &'a IntCounter,
}

impl<'a> MakeWriter<'a> for QuietStderr {
    type Writer = QuietWriter<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        QuietWriter {
            errors: &self.errors,
        }
    }
}

impl Write for QuietWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if std::io::stderr().lock().write_all(buf).is_err() {
            self.errors.inc();
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
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
