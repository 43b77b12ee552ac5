//! `ServerError`: why the server could not be built or run.

use std::io;
use std::net::SocketAddr;

use tether_common::config_error::{ConfigErrors, FieldError};
use tether_common::tls::TlsError;

/// Why the server could not be built or run.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The configuration failed validation.
    #[error("invalid configuration:\n{0}")]
    Config(#[from] ConfigErrors),
    /// The TLS material could not be loaded.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The metrics could not be registered (for example, registered twice).
    #[error("cannot register metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// A listener could not be bound.
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        /// Which listener (`listen`, `admin_listen`, `forwards[0].listen`).
        what: String,
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// A frontend listener was given without its `frontends.*_listen` key, or the reverse.
    #[error("frontends.{key} and the listener given do not match: {why}")]
    FrontendListener {
        /// The config key (`http_connect_listen`, `socks5_listen`).
        key: &'static str,
        /// What is missing.
        why: &'static str,
    },
    /// The audit log could not start.
    #[error(transparent)]
    Audit(#[from] crate::consumers::audit::AuditError),
    /// Enrollment could not start (its issuer files).
    #[error(transparent)]
    Enrollment(#[from] crate::enrollment::EnrollmentError),
    /// `Listeners::forwards` does not match `ServerConfig::forwards`.
    #[error("{got} forward listeners were given for {expected} configured forwards")]
    ForwardListeners {
        /// Configured forwards.
        expected: usize,
        /// Listeners given.
        got: usize,
    },
}

/// One invalid key as a configuration error.
pub(crate) fn one(err: FieldError) -> ServerError {
    ServerError::Config(ConfigErrors(vec![err]))
}
