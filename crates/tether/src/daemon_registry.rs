//! The Prometheus registry of one daemon: every collector a deployed `tether server` or
//! `tether agent` exports beyond its library's own metrics (heap, runtime, `process_*`, log
//! write errors).

use anyhow::Context;

/// A registry holding the heap, runtime, `process_*` and log write error collectors (the
/// process's one logging setup, `logs`). `main` builds one per
/// daemon and `tether demo` one for each of its two, so the demo's `/metrics` is what a
/// deployed daemon shows; the daemon libraries add their own metrics (build info, streams,
/// sessions, certificate expiry) when they are constructed with it.
pub(crate) fn daemon_registry(
    logs: &crate::logging::LogControl,
) -> anyhow::Result<prometheus::Registry> {
    let registry = prometheus::Registry::new();
    registry
        .register(Box::new(logs.write_errors()))
        .context("registering the log write error counter")?;
    tether_common::runtime_metrics::register(&registry, tokio::runtime::Handle::current())
        .context("registering the runtime metrics")?;
    Ok(registry)
}
