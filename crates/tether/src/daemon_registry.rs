//! The Prometheus registry of one daemon: every collector a deployed `tether server` or
//! `tether agent` exports beyond its library's own metrics (heap, runtime, `process_*`).

use anyhow::Context;

/// A registry holding the heap, runtime and `process_*` collectors. `main` builds one per
/// daemon and `tether demo` one for each of its two, so the demo's `/metrics` is what a
/// deployed daemon shows; the daemon libraries add their own metrics (build info, streams,
/// sessions, certificate expiry) when they are constructed with it.
pub(crate) fn daemon_registry() -> anyhow::Result<prometheus::Registry> {
    let registry = prometheus::Registry::new();
    tether_common::runtime_metrics::register(&registry, tokio::runtime::Handle::current())
        .context("registering the runtime metrics")?;
    Ok(registry)
}
