//! tether wire formats: frames, codec and target addresses (sans-IO: no sockets, tasks or clocks).
//!
//! One WebSocket binary message carries exactly one [`Frame`] (see [`codec::decode`]). Byte-stream
//! transports (tests over `tokio::io::duplex`, plain TCP) prefix each frame with its length
//! ([`prefixed`]). The multiplexer only ever sees [`Frame`] values, so a second framing (the
//! remotedialer one) can translate to and from them without touching the multiplexer.
#![deny(missing_docs)]

pub mod caps;
pub mod codec;
pub mod error;
pub mod frame;
pub mod prefixed;
pub mod remotedialer;
pub mod target;
pub mod varint;

pub use caps::Caps;
pub use codec::{Limits, decode, encode};
pub use error::{ProtoError, ProtoErrorKind};
pub use frame::{Frame, FrameType, GoAwayCode, OpenErrorCode, ResetCode, StreamId};
pub use target::{Host, TargetAddr, TargetError};
