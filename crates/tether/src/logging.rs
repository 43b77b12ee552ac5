//! Tracing subscriber set-up for the binary: an EnvFilter and text or JSON output on stderr.

use tracing_subscriber::EnvFilter;

use crate::cli::LogFormat;

/// Installs the global subscriber. An invalid filter falls back to `info` with a warning.
pub(crate) fn init(filter: &str, format: LogFormat) {
    let (filter, bad) = match EnvFilter::try_new(filter) {
        Ok(filter) => (filter, None),
        Err(err) => (EnvFilter::new("info"), Some(err)),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    if let Some(err) = bad {
        tracing::warn!(%err, "invalid log filter; using `info`");
    }
}
