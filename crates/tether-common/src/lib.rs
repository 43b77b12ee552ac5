//! shared plumbing: TLS and identity, PKI, config loading, shutdown, backoff, telemetry.

pub mod backoff;
pub mod config_error;
pub mod duration;
pub mod identity;
pub mod pipe;
pub mod pki;
pub mod session_settings;
pub mod tls;
