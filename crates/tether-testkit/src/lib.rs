//! test helpers: throwaway PKI, echo and sink servers, in-memory transports.

pub mod echo;
pub mod pki;
pub mod sentinel;

pub use echo::{EchoHandle, echo_server};
pub use pki::{AgentCert, TestPki};
pub use sentinel::assert_no_prior_connection;
