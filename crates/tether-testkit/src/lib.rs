//! test helpers: throwaway PKI, echo and sink servers, in-memory transports, waiting for a
//! condition, reading metrics, loopback sockets and a plain HTTP GET.

pub mod echo;
pub mod metrics;
pub mod net;
pub mod pki;
pub mod sentinel;
pub mod wait;

pub use echo::{EchoHandle, echo_server};
pub use net::{bind_loopback, common_port_on, http_get};
pub use pki::{AgentCert, TestPki};
pub use sentinel::assert_no_prior_connection;
pub use wait::{eventually, eventually_within};
