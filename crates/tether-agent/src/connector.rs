//! One connection attempt to the server: TCP (bounded, `TCP_NODELAY`), TLS against the pinned
//! CA, then the WebSocket upgrade to `tether.v1` with the agent's handshake headers.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use http::header::SEC_WEBSOCKET_PROTOCOL;
use http::{HeaderName, HeaderValue, StatusCode};
use rustls::pki_types::ServerName;
use tether_common::config_error::ConfigErrors;
use tether_common::read_ahead::ReadAhead;
use tether_proto::Limits;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Error as WsError};

use crate::config::{AgentConfig, AgentProtocol, ServerUrl};
use crate::ws_transport::WsTransport;

/// The WebSocket subprotocol of the native protocol.
pub const SUBPROTOCOL: &str = "tether.v1";
/// Request header: a random id per agent process start.
pub const INSTANCE_HEADER: HeaderName = HeaderName::from_static("x-tether-instance");
/// Request header: the agent's version.
pub const VERSION_HEADER: HeaderName = HeaderName::from_static("x-tether-version");
/// Request header: the agent's labels, `k=v,k=v`.
pub const LABELS_HEADER: HeaderName = HeaderName::from_static("x-tether-labels");
/// Response header: the server process's id.
pub const SERVER_HEADER: HeaderName = HeaderName::from_static("x-tether-server");
/// Request header: which of the agent's endpoints (server URL and address) this session is
/// for, so that a server reached through two endpoints does not take the second session for a
/// reconnect of the first (which would replace it).
pub const ENDPOINT_HEADER: HeaderName = HeaderName::from_static("x-tether-endpoint");
/// Request and response header: the capabilities each side offers (issue 27: the
/// one-round-trip open); a server that does not answer it gets tether.v1 as first specified.
pub const CAPS_HEADER: HeaderName = HeaderName::from_static(tether_proto::caps::CAPS_HEADER);

/// Room for the frame header in a WebSocket message beyond the largest DATA payload.
const WS_MESSAGE_SLACK: usize = 16;
/// tungstenite writes to the socket once this much is buffered (and on every flush).
const WS_WRITE_BUFFER: usize = 128 * 1024;
/// Longest server id kept from `X-Tether-Server`.
const MAX_SERVER_ID_LEN: usize = 128;
/// Most bytes of an HTTP error body quoted in an error.
const MAX_BODY_QUOTE: usize = 200;

/// The transport of an established connection.
pub type ServerTransport = WsTransport<TlsStream<ReadAhead<TcpStream>>>;

/// Why a connection attempt failed. [`ConnectError::label`] gives a closed-set reason.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The TCP connection (or the resolution of the server's name) failed.
    #[error("tcp connect to {addr}: {source}")]
    Tcp {
        /// `host:port` of the server.
        addr: String,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The TLS handshake failed (untrusted or wrong server certificate, refused client
    /// certificate, protocol mismatch).
    #[error("tls handshake with {addr}: {source}")]
    Tls {
        /// The server's address.
        addr: SocketAddr,
        /// The error from rustls (wrapped by tokio-rustls).
        #[source]
        source: io::Error,
    },
    /// The WebSocket upgrade failed: an HTTP error status or a broken upgrade response.
    #[error("websocket upgrade failed: {message}")]
    Http {
        /// The HTTP status, when the server answered one other than 101.
        status: Option<StatusCode>,
        /// What went wrong.
        message: String,
    },
    /// The server did not select the `tether.v1` subprotocol.
    #[error("protocol: {0}")]
    Protocol(String),
    /// The whole attempt did not finish within `connect_timeout`.
    #[error("no connection within {0:?}")]
    Timeout(Duration),
}

impl ConnectError {
    /// One of `tcp`, `tls`, `http`, `protocol`, `timeout`.
    pub fn label(&self) -> &'static str {
        match self {
            ConnectError::Tcp { .. } => "tcp",
            ConnectError::Tls { .. } => "tls",
            ConnectError::Http { .. } => "http",
            ConnectError::Protocol(_) => "protocol",
            ConnectError::Timeout(_) => "timeout",
        }
    }

    /// Every label, for pre-registering metric series.
    pub const LABELS: [&'static str; 5] = ["tcp", "tls", "http", "protocol", "timeout"];
}

/// An established connection to the server.
#[derive(Debug)]
pub struct Connection {
    /// The WebSocket as a frame transport.
    pub transport: ServerTransport,
    /// The capabilities the server answered with (`x-tether-caps`; empty from older servers).
    pub peer_caps: tether_proto::Caps,
    /// The server's `X-Tether-Server` id, if it sent one.
    pub server_id: Option<String>,
    /// The server's address.
    pub peer: SocketAddr,
    /// The protocol spoken on `transport`'s WebSocket. For `Remotedialer`, take the socket
    /// back with `WsTransport::into_inner`.
    pub protocol: AgentProtocol,
}

/// One server URL, parsed, with the TLS name its certificate must carry.
#[derive(Clone, Debug)]
struct Target {
    url: String,
    server: ServerUrl,
    server_name: ServerName<'static>,
}

/// Where one session goes: a server URL and, once resolved, one of its addresses.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Endpoint {
    /// The server URL (`server_url` or an entry of `servers`).
    pub url: String,
    /// The address dialed; `None` dials the URL's host by name (it did not resolve).
    pub addr: Option<SocketAddr>,
}

impl Endpoint {
    /// A short stable tag of this endpoint (`X-Tether-Endpoint`).
    pub fn tag(&self) -> String {
        use std::hash::{Hash, Hasher};
        // FNV-1a: stable across processes and releases, unlike `DefaultHasher`.
        struct Fnv(u64);
        impl Hasher for Fnv {
            fn finish(&self) -> u64 {
                self.0
            }
            fn write(&mut self, bytes: &[u8]) {
                for b in bytes {
                    self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
                }
            }
        }
        let mut hasher = Fnv(0xcbf2_9ce4_8422_2325);
        self.url.hash(&mut hasher);
        self.addr.map(|a| a.to_string()).hash(&mut hasher);
        format!("{:08x}", hasher.finish() as u32)
    }
}

impl Endpoint {
    /// Whether `key` is this endpoint's key in `AgentStatus::replicas` (its `Display` form),
    /// compared without building the string.
    pub fn has_key(&self, key: &str) -> bool {
        use std::fmt::Write as _;
        let mut rest = DisplayMatch(Some(key));
        let _ = write!(rest, "{self}");
        rest.0 == Some("")
    }
}

/// Consumes a `Display` output from the front of a string: `None` once a piece differs.
struct DisplayMatch<'a>(Option<&'a str>);

impl std::fmt::Write for DisplayMatch<'_> {
    fn write_str(&mut self, piece: &str) -> std::fmt::Result {
        self.0 = self.0.and_then(|rest| rest.strip_prefix(piece));
        Ok(())
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.addr {
            Some(addr) => write!(f, "{} ({addr})", self.url),
            None => f.write_str(&self.url),
        }
    }
}

/// Everything needed to dial the server replicas, prepared once.
#[derive(Clone)]
pub struct Connector {
    targets: Vec<Target>,
    /// The TLS material of the next attempt; replaced in place by a reload (clones share it).
    tls: Arc<ArcSwap<rustls::ClientConfig>>,
    connect_timeout: Duration,
    headers: Vec<(HeaderName, HeaderValue)>,
    ws_config: WebSocketConfig,
    limits: Limits,
    protocol: AgentProtocol,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("targets", &self.targets)
            .finish_non_exhaustive()
    }
}

impl Connector {
    /// Prepares the attempts of `config` with the TLS client config `tls` and this process's
    /// `instance_id`. Fails only on values that `AgentConfig::validate` also refuses.
    pub fn new(
        config: &AgentConfig,
        tls: Arc<rustls::ClientConfig>,
        instance_id: &str,
    ) -> Result<Connector, ConfigErrors> {
        let mut errors = ConfigErrors::new();
        let targets = targets(config, &mut errors);
        let headers = headers(config, instance_id, &mut errors);
        if !errors.is_empty() || targets.is_empty() {
            return Err(errors);
        }
        let limits = config.to_mux_config().limits();
        let max_message = match config.protocol {
            AgentProtocol::Tether => config.session.max_frame as usize + WS_MESSAGE_SLACK,
            // Go writes whatever its caller wrote as one message (32 KiB from io.Copy).
            AgentProtocol::Remotedialer => tether_proto::remotedialer::DEFAULT_MAX_DATA + 64,
        };
        let ws_config = WebSocketConfig::default()
            .max_message_size(Some(max_message))
            .max_frame_size(Some(max_message))
            .write_buffer_size(WS_WRITE_BUFFER)
            .read_buffer_size(tether_common::session_settings::WS_READ_BUFFER)
            .max_write_buffer_size(WS_WRITE_BUFFER + 2 * max_message);
        Ok(Connector {
            targets,
            tls: Arc::new(ArcSwap::new(tls)),
            connect_timeout: config.connect_timeout.0,
            headers,
            ws_config,
            limits,
            protocol: config.protocol,
        })
    }

    /// Replaces the TLS material: the next attempt presents it; the live session is untouched.
    pub fn set_tls(&self, tls: Arc<rustls::ClientConfig>) {
        self.tls.store(tls);
    }

    /// The first server URL (for logs).
    pub fn url(&self) -> &str {
        self.targets.first().map_or("", |t| t.url.as_str())
    }

    /// Every server URL, each with its host and port to resolve.
    pub fn servers(&self) -> impl Iterator<Item = (&str, &ServerUrl)> {
        self.targets.iter().map(|t| (t.url.as_str(), &t.server))
    }

    /// One attempt to the first server URL, by name: TCP, TLS and WebSocket upgrade, all
    /// within `connect_timeout`.
    pub async fn connect(&self) -> Result<Connection, ConnectError> {
        let endpoint = Endpoint {
            url: self.url().to_owned(),
            addr: None,
        };
        self.connect_to(&endpoint).await
    }

    /// One attempt to `endpoint`: TCP to its address (or its URL's host by name), TLS for the
    /// URL's host (or `server_name`), the upgrade with the URL's path and host.
    pub async fn connect_to(&self, endpoint: &Endpoint) -> Result<Connection, ConnectError> {
        let Some(target) = self.targets.iter().find(|t| t.url == endpoint.url) else {
            return Err(ConnectError::Protocol(format!(
                "{} is no longer a configured server URL",
                endpoint.url
            )));
        };
        tokio::time::timeout(self.connect_timeout, self.attempt(target, endpoint))
            .await
            .map_err(|_| ConnectError::Timeout(self.connect_timeout))?
    }

    async fn attempt(
        &self,
        target: &Target,
        endpoint: &Endpoint,
    ) -> Result<Connection, ConnectError> {
        let addr_text = match endpoint.addr {
            Some(addr) => addr.to_string(),
            None => format!("{}:{}", target.server.host, target.server.port),
        };
        let connected = match endpoint.addr {
            Some(addr) => TcpStream::connect(addr).await,
            None => TcpStream::connect((target.server.host.as_str(), target.server.port)).await,
        };
        let tcp = connected.map_err(|source| ConnectError::Tcp {
            addr: addr_text.clone(),
            source,
        })?;
        let tcp_error = |source| ConnectError::Tcp {
            addr: addr_text.clone(),
            source,
        };
        tcp.set_nodelay(true).map_err(tcp_error)?;
        let peer = tcp.peer_addr().map_err(tcp_error)?;

        let tls = TlsConnector::from(self.tls.load_full())
            .connect(target.server_name.clone(), ReadAhead::new(tcp))
            .await
            .map_err(|source| ConnectError::Tls { addr: peer, source })?;

        let request = self.request(&target.url, &endpoint.tag())?;
        let (socket, response) =
            tokio_tungstenite::client_async_with_config(request, tls, Some(self.ws_config))
                .await
                .map_err(upgrade_error)?;
        let selected = response
            .headers()
            .get(SEC_WEBSOCKET_PROTOCOL)
            .and_then(|v| v.to_str().ok());
        if self.protocol == AgentProtocol::Tether && selected != Some(SUBPROTOCOL) {
            return Err(ConnectError::Protocol(format!(
                "the server selected subprotocol {selected:?}, not {SUBPROTOCOL}"
            )));
        }
        let server_id = response
            .headers()
            .get(SERVER_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(sanitize_server_id)
            .filter(|id| !id.is_empty());
        // Capabilities the server accepted (issue 27); none from a server without them.
        let peer_caps = response
            .headers()
            .get(CAPS_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(tether_proto::Caps::parse)
            .unwrap_or_default();
        Ok(Connection {
            transport: WsTransport::new(socket, self.limits),
            peer_caps,
            server_id,
            peer,
            protocol: self.protocol,
        })
    }

    fn request(
        &self,
        url: &str,
        endpoint_tag: &str,
    ) -> Result<tungstenite::handshake::client::Request, ConnectError> {
        let mut request = url
            .into_client_request()
            .map_err(|err| ConnectError::Http {
                status: None,
                message: format!("cannot build the upgrade request: {err}"),
            })?;
        let headers = request.headers_mut();
        for (name, value) in &self.headers {
            headers.insert(name.clone(), value.clone());
        }
        if let Ok(value) = HeaderValue::from_str(endpoint_tag) {
            headers.insert(ENDPOINT_HEADER, value);
        }
        Ok(request)
    }
}

/// A server's error body as one printable line: control characters (newlines, escape
/// sequences a hostile server could send to a terminal) are escaped, everything else, quotes
/// included, is kept as the server wrote it.
fn quote_body(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

fn upgrade_error(err: WsError) -> ConnectError {
    match err {
        WsError::Http(response) => {
            let status = response.status();
            let body = response
                .body()
                .as_deref()
                .map(|b| {
                    let text = String::from_utf8_lossy(&b[..b.len().min(MAX_BODY_QUOTE)]);
                    quote_body(text.trim())
                })
                .unwrap_or_default();
            let message = if body.is_empty() {
                format!("server answered HTTP {status}")
            } else {
                format!("server answered HTTP {status}: {body}")
            };
            ConnectError::Http {
                status: Some(status),
                message,
            }
        }
        WsError::Protocol(ProtocolError::SecWebSocketSubProtocolError(err)) => {
            ConnectError::Protocol(format!("subprotocol {SUBPROTOCOL}: {err}"))
        }
        other => ConnectError::Http {
            status: None,
            message: other.to_string(),
        },
    }
}

/// Keeps printable ASCII only, bounded: the id comes from the network and goes into logs.
fn sanitize_server_id(id: &str) -> String {
    id.chars()
        .filter(|c| c.is_ascii_graphic())
        .take(MAX_SERVER_ID_LEN)
        .collect()
}

/// A random id for this process start: 16 lowercase hex characters.
pub fn new_instance_id() -> String {
    format!("{:016x}", fastrand::u64(..))
}

/// One attempt target per server URL of `config`; problems go to `errors`.
fn targets(config: &AgentConfig, errors: &mut ConfigErrors) -> Vec<Target> {
    let mut targets = Vec::new();
    for url in config.urls() {
        let server = match ServerUrl::parse(&url) {
            Ok(server) => server,
            Err(message) => {
                errors.push("server_url", message);
                continue;
            }
        };
        match server.tls_name(&config.server_name) {
            Ok(server_name) => targets.push(Target {
                url,
                server,
                server_name,
            }),
            Err(message) => errors.push("server_name", message),
        }
    }
    targets
}

/// The upgrade request's headers: the subprotocol, `headers:`, instance id, version, labels;
/// problems go to `errors`.
fn headers(
    config: &AgentConfig,
    instance_id: &str,
    errors: &mut ConfigErrors,
) -> Vec<(HeaderName, HeaderValue)> {
    let mut headers = Vec::new();
    if config.protocol == AgentProtocol::Tether {
        headers.push((
            SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(SUBPROTOCOL),
        ));
        // Capabilities (x-tether-caps): answered by servers that know them.
        let offer = config.to_mux_config().offer().to_header();
        if !offer.is_empty()
            && let Ok(value) = HeaderValue::from_str(&offer)
        {
            headers.push((CAPS_HEADER, value));
        }
    }
    for (name, value) in &config.headers {
        match (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            (Ok(name), Ok(value)) => headers.push((name, value)),
            _ => errors.push(format!("headers.{name}"), "not a valid HTTP header"),
        }
    }
    for (name, value, key) in [
        (INSTANCE_HEADER, instance_id.to_owned(), "instance id"),
        (
            VERSION_HEADER,
            env!("CARGO_PKG_VERSION").to_owned(),
            "version",
        ),
        (LABELS_HEADER, config.labels_header(), "labels"),
    ] {
        if value.is_empty() {
            continue;
        }
        match HeaderValue::from_str(&value) {
            Ok(value) => headers.push((name, value)),
            Err(_) => errors.push(key, "not a valid HTTP header value"),
        }
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_endpoint_has_exactly_its_display_as_key() {
        let url = "wss://tether:8443/v1/connect";
        let resolved = Endpoint {
            url: url.into(),
            addr: Some("[fd00::1]:8443".parse().unwrap()),
        };
        let by_name = Endpoint {
            url: url.into(),
            addr: None,
        };
        for endpoint in [&resolved, &by_name] {
            let key = endpoint.to_string();
            assert!(endpoint.has_key(&key), "{key}");
            assert!(
                !endpoint.has_key(&key[..key.len() - 1]),
                "a prefix of {key}"
            );
            assert!(!endpoint.has_key(&format!("{key}x")), "longer than {key}");
        }
        assert!(!resolved.has_key(&by_name.to_string()));
        assert!(!by_name.has_key(&resolved.to_string()));
        assert!(!resolved.has_key("wss://tether:8443/v1/connect ([fd00::2]:8443)"));
    }

    #[test]
    fn labels_cover_every_variant() {
        let errors = [
            ConnectError::Tcp {
                addr: "a:1".into(),
                source: io::ErrorKind::ConnectionRefused.into(),
            },
            ConnectError::Tls {
                addr: "127.0.0.1:1".parse().unwrap(),
                source: io::ErrorKind::InvalidData.into(),
            },
            ConnectError::Http {
                status: Some(StatusCode::FORBIDDEN),
                message: "x".into(),
            },
            ConnectError::Protocol("x".into()),
            ConnectError::Timeout(Duration::from_secs(1)),
        ];
        let labels: Vec<_> = errors.iter().map(ConnectError::label).collect();
        assert_eq!(labels, ConnectError::LABELS);
    }

    #[test]
    fn instance_ids_are_hex_and_differ() {
        let a = new_instance_id();
        assert_eq!(a.len(), 16);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, new_instance_id());
    }

    #[test]
    fn server_ids_are_sanitized() {
        assert_eq!(sanitize_server_id("srv-1\n\x1b[31m"), "srv-1[31m");
        assert_eq!(
            sanitize_server_id(&"x".repeat(500)).len(),
            MAX_SERVER_ID_LEN
        );
    }

    #[test]
    fn bodies_keep_quotes_and_escape_control_characters() {
        assert_eq!(
            quote_body("agent \"edge-2\" is not allowed"),
            "agent \"edge-2\" is not allowed"
        );
        assert_eq!(quote_body("a\nb\u{1b}[31m"), "a\\nb\\u{1b}[31m");
    }
}
