//! The bound sockets the server runs on (`Listeners`, `FrontendListeners`), how they are bound
//! from a config, and the check that the ones given match the config.

use std::net::SocketAddr;

use tether_common::config_error::FieldError;
use tokio::net::TcpListener;

use crate::config::ServerConfig;
use crate::server::error::{ServerError, one};

/// The bound sockets the server runs on (tests bind `127.0.0.1:0`).
#[derive(Debug)]
pub struct Listeners {
    /// The tunnel listener (mutual TLS).
    pub tunnel: TcpListener,
    /// The admin listener (plain HTTP).
    pub admin: TcpListener,
    /// `forwards[i]` serves `config.forwards[i]`.
    pub forwards: Vec<TcpListener>,
    /// The consumer proxy listeners, present exactly when configured.
    pub frontends: FrontendListeners,
}

/// The listeners of the consumer frontends (`frontends.http_connect_listen`,
/// `frontends.socks5_listen`); `None` for a frontend that is off.
#[derive(Debug, Default)]
pub struct FrontendListeners {
    /// The HTTP CONNECT proxy listener.
    pub http_connect: Option<TcpListener>,
    /// The SOCKS5 proxy listener.
    pub socks5: Option<TcpListener>,
}

impl FrontendListeners {
    /// Binds the frontend addresses of `config` that are set.
    pub async fn bind(config: &ServerConfig) -> Result<FrontendListeners, ServerError> {
        let frontends = &config.frontends;
        let mut out = FrontendListeners::default();
        if let Some(addr) = frontends.http_connect_addr().map_err(one)? {
            out.http_connect = Some(bind("frontends.http_connect_listen", addr).await?);
        }
        if let Some(addr) = frontends.socks5_addr().map_err(one)? {
            out.socks5 = Some(bind("frontends.socks5_listen", addr).await?);
        }
        Ok(out)
    }
}

impl Listeners {
    /// Binds every address of `config`.
    pub async fn bind(config: &ServerConfig) -> Result<Listeners, ServerError> {
        let tunnel = bind("listen", config.listen_addr().map_err(one)?).await?;
        let admin = bind("admin_listen", config.admin_addr().map_err(one)?).await?;
        let mut forwards = Vec::with_capacity(config.forwards.len());
        for (i, f) in config.forwards.iter().enumerate() {
            let what = format!("forwards[{i}].listen");
            let addr = f
                .listen_addr()
                .map_err(|m| one(FieldError::new(&what, m)))?;
            forwards.push(bind(&what, addr).await?);
        }
        let frontends = FrontendListeners::bind(config).await?;
        Ok(Listeners {
            tunnel,
            admin,
            forwards,
            frontends,
        })
    }
}

pub(crate) async fn bind(what: &str, addr: SocketAddr) -> Result<TcpListener, ServerError> {
    tether_common::listen::bind(addr).map_err(|source| ServerError::Bind {
        what: what.to_owned(),
        addr,
        source,
    })
}

impl Listeners {
    /// Whether these listeners are the ones `config` asks for: one per forward, a frontend
    /// listener exactly for each frontend configured; and the forwards' targets parse.
    pub(crate) fn check(&self, config: &ServerConfig) -> Result<(), ServerError> {
        if self.forwards.len() != config.forwards.len() {
            return Err(ServerError::ForwardListeners {
                expected: config.forwards.len(),
                got: self.forwards.len(),
            });
        }
        for (i, f) in config.forwards.iter().enumerate() {
            f.target_addr()
                .map_err(|m| one(FieldError::new(format!("forwards[{i}].target"), m)))?;
        }
        let frontends = &config.frontends;
        for (key, configured, given) in [
            (
                "http_connect_listen",
                frontends.http_connect_addr().map_err(one)?.is_some(),
                self.frontends.http_connect.is_some(),
            ),
            (
                "socks5_listen",
                frontends.socks5_addr().map_err(one)?.is_some(),
                self.frontends.socks5.is_some(),
            ),
        ] {
            if configured != given {
                let why = if configured {
                    "configured but no listener was given"
                } else {
                    "a listener was given but the key is empty"
                };
                return Err(ServerError::FrontendListener { key, why });
            }
        }
        Ok(())
    }
}

/// A listener's address for logs.
pub(crate) fn display_addr(listener: &TcpListener) -> String {
    listener
        .local_addr()
        .map_or_else(|e| format!("unknown ({e})"), |a| a.to_string())
}
