//! shared plumbing: TLS and identity, PKI, config loading, shutdown, backoff, telemetry.

pub mod backoff;
pub mod cert_expiry;
pub mod config_collect;
pub mod config_diff;
pub mod config_error;
pub mod config_layers;
pub mod csr;
pub mod duration;
pub mod heap_trim;
pub mod host;
pub mod identity;
pub mod listen;
pub mod log_throttle;
pub mod pki;
pub mod pki_ops;
pub mod placement;
pub mod read_ahead;
pub mod runtime_metrics;
#[cfg(unix)]
pub mod sd_notify;
pub mod session_settings;
pub mod tls;
pub mod tls_check;
pub mod tls_presented;
