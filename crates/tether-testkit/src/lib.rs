//! test helpers: throwaway PKI, echo and sink servers, in-memory transports.

pub mod echo;
pub mod pki;

pub use echo::{EchoHandle, echo_server};
pub use pki::{AgentCert, TestPki};
