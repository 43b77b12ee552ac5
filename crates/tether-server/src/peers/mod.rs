//! Replica peering: sessions between server replicas (`links` dials them, `listener` accepts
//! them) over which a replica relays a dial for an agent it holds no session of to a replica
//! that does (`relay` asks, `serve` answers, `splice` joins the two streams).

pub mod config;
pub(crate) mod links;
pub(crate) mod listener;
pub mod metrics;
pub(crate) mod relay;
pub(crate) mod serve;
mod splice;
pub(crate) mod tls;
pub mod view;
mod wire;
