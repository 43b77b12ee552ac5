//! One WebSocket, many streams: credit flow control, keepalive, SYNC reconciliation and close.
//!
//! A [`Session`] runs over any transport that carries whole [`Frame`]s (see [`transport`]): a
//! WebSocket in the daemons, an in-memory pipe in tests. Streams are [`MuxStream`] handles that
//! implement `AsyncRead + AsyncWrite`. The session's tasks are driven by the [`SessionDriver`]
//! future that the owner spawns on its tracker; dropping every [`Session`] handle ends them.
//!
//! [`Frame`]: tether_proto::Frame

mod config;
mod core;
mod driver;
mod early_open;
mod error;
mod incoming;
mod io;
mod metrics;
pub mod remotedialer;
mod session;
mod shared;
mod stream;
pub mod transport;
mod writer;

pub use io::{direct, pipe};

pub use config::{MIN_DECODE_DATA, MuxConfig, Role};
pub use driver::SessionDriver;
pub use early_open::OpenAnswer;
pub use error::{OpenError, SessionEnd};
pub use incoming::{Incoming, PendingOpen};
pub use metrics::{CloseReason, MuxMetrics};
pub use session::{Session, SessionStats};
pub use stream::MuxStream;
pub use transport::{FrameTransport, TransportError};

/// The core's action harness for the fuzz target (`crates/tether-mux/fuzz`); not an API.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing {
    /// Decodes `bytes` as actions on two cores and runs them; panics when an invariant breaks.
    pub fn run(bytes: &[u8]) {
        use crate::core::harness::{Action, run_actions};
        run_actions(&Action::decode(bytes));
    }
}
