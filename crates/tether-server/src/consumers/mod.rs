//! The consumers' side: static forwards and the HTTP CONNECT and SOCKS5 proxies, which
//! authorize a consumer, dial through an agent's session and splice the two sockets.

pub mod audit;
pub(crate) mod auth;
pub(crate) mod context;
pub(crate) mod dial;
pub(crate) mod dial_early;
pub mod dial_metrics;
pub(crate) mod forward;
pub(crate) mod http_connect;
pub(crate) mod proxy;
pub(crate) mod proxy_control;
pub(crate) mod proxy_listener;
pub mod proxy_metrics;
pub(crate) mod socks5;
pub(crate) mod socks5_handshake;
pub(crate) mod splice;
