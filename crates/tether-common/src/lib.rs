//! shared plumbing: TLS and identity, PKI, config loading, shutdown, backoff, telemetry.

pub mod backoff;
pub mod config_error;
pub mod identity;
pub mod pki;
pub mod tls;
pub mod duration;
pub mod session_settings;
pub mod pipe;
