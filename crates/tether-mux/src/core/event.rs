//! What the core reports to its shell: events to turn into wake-ups, and what the reader must
//! do after a received frame.

use std::time::Duration;

use bytes::Bytes;
use tether_proto::{StreamId, TargetAddr};

use crate::error::OpenError;

/// Something the shell must tell a waiting party.
#[derive(Debug)]
pub(crate) enum Event {
    /// Bytes, FIN or a failure arrived for the stream's reader, which waits (its last read
    /// was `Pending`).
    Readable(StreamId),
    /// Credit or a failure arrived for the stream's writer, which waits (its last credit
    /// check was `Pending`).
    Writable(StreamId),
    /// An OPEN of ours was answered, refused, reset or abandoned (reported once per stream).
    Opened(StreamId, Result<(), OpenError>),
    /// A PING of ours came back (with its round-trip time) or was forgotten (`None`).
    Pong { nonce: u64, rtt: Option<Duration> },
    /// The stream left the table: nothing refers to it any more.
    Removed(StreamId),
}

/// What the reader must do after a frame was applied.
#[derive(Debug)]
pub(crate) enum Applied {
    /// Nothing more.
    Done,
    /// Write `payload` into the stream's attached socket (outside the lock, non-blocking), then
    /// report with [`Conn::delivered`](super::Conn::delivered).
    Deliver { stream: StreamId, payload: Bytes },
    /// The peer opened a stream: hand it to the application.
    Incoming {
        stream: StreamId,
        target: TargetAddr,
        timeout_ms: u32,
    },
}
