//! The session's streams meeting local sockets: the byte pump ([`pipe`]) and direct delivery
//! ([`direct`]), where the session's reader writes received bytes into a socket itself. The
//! shell sees such a socket only as a [`DeliverSink`].

pub mod direct;
pub mod pipe;

/// A socket the session's reader may write a stream's received bytes into, outside the lock.
pub(crate) trait DeliverSink: Send + Sync {
    /// One non-blocking write of a prefix of `data`; returns how many bytes were written. A
    /// full socket writes nothing; an error writes nothing and is kept for the stream's pump.
    fn try_deliver(&self, data: &[u8]) -> usize;
}
