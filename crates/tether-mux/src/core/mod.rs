//! The multiplexer's state machine without I/O: a [`Conn`] changed by one method per peer frame
//! and per local action, which queues the frames to send and reports what happened as
//! [`Event`]s. No runtime, wakers, sockets or clock here: time comes in as a [`Time`] argument.
//! The async shell (`crate::shared`) holds the lock, the wakers and the sockets.

mod buffer;
mod conn;
mod control;
mod event;
mod lifecycle;
mod recv;
mod send;
mod stream;
mod streams;
mod time;

#[cfg(any(test, feature = "fuzzing"))]
pub(crate) mod harness;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_tuning;

pub(crate) use buffer::{ReadTarget, RecvBuf};
pub(crate) use conn::Conn;
pub(crate) use event::{Applied, Event};
pub(crate) use time::Time;
