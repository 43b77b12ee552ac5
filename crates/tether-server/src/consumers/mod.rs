//! The consumers' side: static forwards and the HTTP CONNECT and SOCKS5 proxies, which
//! authorize a consumer, dial through an agent's session and splice the two sockets.

pub mod audit;
pub(crate) mod auth;
pub(crate) mod dial;
pub(crate) mod forward;
pub(crate) mod http_connect;
pub(crate) mod proxy;
pub(crate) mod socks5;
