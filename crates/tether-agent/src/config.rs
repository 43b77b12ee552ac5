//! `AgentConfig`: the keys of agent.yaml, their defaults, path resolution and validation that
//! reports every problem with its key path.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustls::pki_types::ServerName;
use serde::{Deserialize, Serialize};
use tether_common::config_error::{ConfigErrors, FieldError};
use tether_common::duration::HumanDuration;
use tether_common::session_settings::SessionSettings;
use tether_common::tls::{self, ClientTlsFiles};
use tether_mux::MuxConfig;

use crate::gate::ActivationConfig;
use crate::policy::{Policy, PolicyConfig};

/// The only config format version this agent reads.
pub const CONFIG_VERSION: u32 = 1;

/// Longest accepted `connect_timeout` and `dial_timeout`.
const MAX_TIMEOUT: Duration = Duration::from_secs(300);
/// Shortest accepted `reconnect.min_delay`: keeps a broken setup from spinning.
const MIN_RECONNECT_DELAY: Duration = Duration::from_millis(10);
/// Most labels, and the longest label key and value.
const MAX_LABELS: usize = 32;
const MAX_LABEL_LEN: usize = 63;

/// agent.yaml.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Config format version; must be 1.
    #[serde(default = "default_version")]
    pub version: u32,
    /// Where to dial: `wss://host[:port]/path` (port 443 when omitted), e.g.
    /// `wss://tether.example.com:8443/v1/connect`. Only `wss://` is accepted. A host name
    /// with several addresses is a set of server replicas: one session per address. Set this
    /// or `servers`, not both.
    #[serde(default)]
    pub server_url: String,
    /// A static list of server replicas' URLs (instead of `server_url`); each URL's host may
    /// resolve to several addresses, as for `server_url`.
    #[serde(default)]
    pub servers: Vec<String>,
    /// How the replica set is found again: re-resolution interval and readiness.
    #[serde(default)]
    pub discovery: DiscoveryConfig,
    /// How many of the discovered replicas the agent holds sessions to.
    #[serde(default)]
    pub placement: PlacementConfig,
    /// TLS name the server certificate must be valid for; empty means the host of `server_url`
    /// (an IP host is checked against the certificate's IP SANs).
    #[serde(default)]
    pub server_name: String,
    /// The agent's certificate and key, and the CA bundle the server is pinned to.
    pub tls: AgentTlsConfig,
    /// Labels sent to the server as `X-Tether-Labels: k=v,k=v` (informational; identity comes
    /// only from the certificate). Keys and values: letters, digits, `-`, `_`, `.`, `/`.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Admin HTTP listener (`/healthz`, `/readyz`, `/metrics`); empty disables it.
    #[serde(default = "default_admin_listen")]
    pub admin_listen: String,
    /// Bound on one connection attempt: TCP connect, TLS handshake and WebSocket upgrade.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: HumanDuration,
    /// Delays between connection attempts.
    #[serde(default)]
    pub reconnect: ReconnectConfig,
    /// Upper bound for dialing a target; the server's timeout in its OPEN is honoured too (the
    /// smaller one wins).
    #[serde(default = "default_dial_timeout")]
    pub dial_timeout: HumanDuration,
    /// Tunnel session settings: windows, frame size, stream cap, keepalive.
    #[serde(default)]
    pub session: SessionSettings,
    /// Which targets the server may ask this agent to dial. Deny by default: no rule, no dial.
    #[serde(default)]
    pub policy: PolicyConfig,
    /// The activation gate: which cluster role and features the tunnel needs, and where the
    /// cluster's own come from. No requirement: always dial.
    #[serde(default)]
    pub activation: ActivationConfig,
    /// Log filter (tracing `EnvFilter` syntax, e.g. `info` or `tether_agent=debug`) used when
    /// neither `--log` nor `TETHER_LOG` is given; applied in place on reload. Empty: `info`.
    #[serde(default)]
    pub log: String,
    /// Wire protocol: `tether` (the native `tether.v1`, default) or `remotedialer` (a Go
    /// rancher/remotedialer server, or a tether server's remotedialer path).
    #[serde(default)]
    pub protocol: AgentProtocol,
    /// Extra request headers of the WebSocket upgrade, e.g. `X-Tunnel-ID` or
    /// `X-API-Tunnel-Token` for a remotedialer server. Names and values must be valid HTTP.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Enrollment with a one-time join token when `tls.cert` does not exist yet, and renewal of
    /// the certificate at two thirds of its lifetime (the `enroll:` section; absent: off).
    #[serde(default)]
    pub enroll: Option<EnrollConfig>,
}

/// `enroll:` of agent.yaml. The key is made here and never leaves the host; the certificate
/// names the agent id the token was issued for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollConfig {
    /// File holding the join token printed by `tether certs token` (read only while
    /// `tls.cert` does not exist).
    pub token_file: PathBuf,
    /// SHA-256 of the CA certificate the server's certificate chains to (`sha256:` line of
    /// `tether certs inspect ca.pem`): the only thing the agent trusts before it has a CA file.
    pub ca_sha256: String,
    /// Renew the certificate with the server at two thirds of its lifetime (default true).
    #[serde(default = "default_true")]
    pub renew: bool,
}

fn default_true() -> bool {
    true
}

/// The wire protocol the agent speaks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AgentProtocol {
    /// `tether.v1`.
    #[default]
    Tether,
    /// rancher/remotedialer.
    Remotedialer,
}

/// `tls:` of agent.yaml. Relative paths are relative to the config file's directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentTlsConfig {
    /// The agent certificate chain (PEM), with the `tether://agent/<id>` URI SAN.
    pub cert: PathBuf,
    /// The agent private key (PEM).
    pub key: PathBuf,
    /// The CA bundle (PEM) the server certificate must chain to; the only trust anchors.
    pub server_ca: PathBuf,
}

/// `discovery:` of agent.yaml: the replica set is every address of every server URL.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DiscoveryConfig {
    /// How often the server names are resolved again (and at once whenever a session ends).
    /// Addresses that appeared are dialed at once; sessions to addresses that disappeared
    /// are drained.
    pub interval: HumanDuration,
    /// The agent is ready (`/readyz` 200) when at least this many replicas are connected.
    pub min_connected: usize,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        Self {
            interval: HumanDuration::secs(30),
            min_connected: 1,
        }
    }
}

/// `placement:` of agent.yaml: the agent's sessions go to `replicas_per_agent` of the
/// discovered replicas, ranked by rendezvous hashing of the agent id and each replica's
/// address (`tether_common::placement`), so that replicas compute the same placement.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PlacementConfig {
    /// Sessions to this many replicas (k); unset: to every replica discovered.
    pub replicas_per_agent: Option<usize>,
}

/// Most server URLs in `servers`, and most addresses dialed per URL.
pub const MAX_SERVERS: usize = 64;

/// `reconnect:` of agent.yaml: capped exponential backoff with jitter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReconnectConfig {
    /// Shortest delay between attempts (and the first delay).
    pub min_delay: HumanDuration,
    /// Longest delay between attempts; the delay ceiling doubles per failure up to this.
    pub max_delay: HumanDuration,
    /// A session that lived at least this long resets the backoff to `min_delay`.
    pub reset_after: HumanDuration,
}

impl Default for ReconnectConfig {
    fn default() -> Self {
        Self {
            min_delay: HumanDuration::millis(500),
            max_delay: HumanDuration::secs(60),
            reset_after: HumanDuration::secs(30),
        }
    }
}

fn default_version() -> u32 {
    CONFIG_VERSION
}

fn default_admin_listen() -> String {
    "127.0.0.1:9091".to_owned()
}

fn default_connect_timeout() -> HumanDuration {
    HumanDuration::secs(10)
}

fn default_dial_timeout() -> HumanDuration {
    HumanDuration::secs(10)
}

/// The parts of `server_url` the connector needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerUrl {
    /// Host name or IP address (without brackets).
    pub host: String,
    /// TCP port (443 when the URL has none).
    pub port: u16,
}

impl ServerUrl {
    /// Parses and checks a `wss://` URL.
    pub fn parse(url: &str) -> Result<ServerUrl, String> {
        let uri: http::Uri = url
            .parse()
            .map_err(|e| format!("`{url}` is not a URL: {e}"))?;
        match uri.scheme_str() {
            Some("wss") => {}
            Some("ws") => {
                return Err("plain ws:// is not allowed; use wss:// (the tunnel needs TLS)".into());
            }
            Some(other) => return Err(format!("scheme `{other}` is not supported; use wss://")),
            None => return Err(format!("`{url}` has no scheme; use wss://host:port/path")),
        }
        let authority = uri
            .authority()
            .ok_or_else(|| format!("`{url}` has no host"))?;
        if authority.as_str().contains('@') {
            return Err("user information in the URL is not supported".into());
        }
        let host = authority.host();
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        if host.is_empty() {
            return Err(format!("`{url}` has no host"));
        }
        if uri.query().is_some() {
            return Err("a query string is not supported".into());
        }
        let port = match authority.port_u16() {
            Some(0) => return Err("port 0 is not allowed".into()),
            Some(port) => port,
            None => 443,
        };
        Ok(ServerUrl {
            host: host.to_owned(),
            port,
        })
    }

    /// The TLS name to verify: `server_name` when set, else this host (an IP host is verified
    /// against IP SANs).
    pub fn tls_name(&self, server_name: &str) -> Result<ServerName<'static>, String> {
        let name = if server_name.is_empty() {
            self.host.as_str()
        } else {
            server_name
        };
        if let Ok(ip) = name.parse::<IpAddr>() {
            return Ok(ServerName::IpAddress(ip.into()));
        }
        ServerName::try_from(name.to_owned())
            .map_err(|_| format!("`{name}` is not a valid TLS server name"))
    }
}

impl AgentConfig {
    /// Makes relative TLS paths relative to `base_dir` (the config file's directory).
    pub fn resolve_paths(&mut self, base_dir: &Path) {
        let enroll_token = self.enroll.as_mut().map(|e| &mut e.token_file);
        for path in [
            &mut self.tls.cert,
            &mut self.tls.key,
            &mut self.tls.server_ca,
        ]
        .into_iter()
        .chain(enroll_token)
        {
            if path.is_relative() {
                *path = base_dir.join(&*path);
            }
        }
        self.activation.resolve_paths(base_dir);
    }

    /// The effective config: fallbacks resolved, so that two configs that mean the same thing
    /// compare equal (DESIGN.md lesson 2). An empty `server_name` becomes the host of
    /// `server_url`, which is what the connector verifies either way.
    pub fn effective(mut self) -> AgentConfig {
        if self.server_name.is_empty()
            && let Ok(url) = ServerUrl::parse(&self.server_url)
        {
            self.server_name = url.host;
        }
        self
    }

    /// The server URLs to dial: `servers`, or `server_url` when that list is empty.
    pub fn urls(&self) -> Vec<String> {
        if self.servers.is_empty() {
            vec![self.server_url.clone()]
        } else {
            self.servers.clone()
        }
    }

    /// The TLS files in the form `tether_common::tls` takes.
    pub fn tls_files(&self) -> ClientTlsFiles {
        ClientTlsFiles {
            cert: self.tls.cert.clone(),
            key: self.tls.key.clone(),
            server_ca: self.tls.server_ca.clone(),
        }
    }

    /// The admin listener address, `None` when `admin_listen` is empty or invalid.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_listen.parse().ok()
    }

    /// `labels` as the `X-Tether-Labels` header value: `k=v,k=v`, sorted by key.
    pub fn labels_header(&self) -> String {
        let pairs: Vec<String> = self
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        pairs.join(",")
    }

    /// Session settings for the multiplexer. A zero `session.sync_interval` disables SYNC.
    pub fn to_mux_config(&self) -> MuxConfig {
        let s = &self.session;
        MuxConfig {
            window: s.window,
            max_data: s.max_frame,
            max_streams: s.max_streams,
            // The peer can never have more OPENs waiting than the stream cap.
            accept_backlog: s.max_streams,
            ping_interval: s.ping_interval.0,
            idle_timeout: s.idle_timeout.0,
            sync_interval: (!s.sync_interval.0.is_zero()).then_some(s.sync_interval.0),
            dial_timeout: self.dial_timeout.0,
            max_window: s.max_window,
            window_budget: s.window_budget,
            early_data: s.early_data,
            ..MuxConfig::default()
        }
    }

    /// The dial policy compiled, or every rule's problem with its key path.
    pub fn compiled_policy(&self) -> Result<Policy, ConfigErrors> {
        self.policy.compile().map_err(|errors| {
            ConfigErrors(
                errors
                    .into_iter()
                    .map(|e| FieldError::new(e.path, e.message))
                    .collect(),
            )
        })
    }

    /// Checks every key; returns all problems at once, each with its key path.
    pub fn validate(&self) -> Result<(), ConfigErrors> {
        let mut errors = ConfigErrors::new();
        if self.version != CONFIG_VERSION {
            errors.push(
                "version",
                format!(
                    "version {} is not supported (expected {CONFIG_VERSION})",
                    self.version
                ),
            );
        }
        self.validate_servers(&mut errors);
        self.validate_tls(&mut errors);
        validate_labels(&self.labels, &mut errors);
        validate_headers(&self.headers, &mut errors);
        if !self.admin_listen.is_empty() && self.admin_listen.parse::<SocketAddr>().is_err() {
            errors.push(
                "admin_listen",
                format!(
                    "`{}` is not an address such as 127.0.0.1:9091 (empty disables the listener)",
                    self.admin_listen
                ),
            );
        }
        check_timeout("connect_timeout", self.connect_timeout, &mut errors);
        check_timeout("dial_timeout", self.dial_timeout, &mut errors);
        self.validate_reconnect(&mut errors);
        self.session.validate("session", &mut errors);
        if let Err(policy_errors) = self.policy.compile() {
            for err in policy_errors {
                // Policy paths already start at `policy.`.
                let path = if err.path.starts_with("policy") {
                    err.path
                } else {
                    format!("policy.{}", err.path)
                };
                errors.push(path, err.message);
            }
        }
        self.activation.validate(&mut errors);
        errors.into_result(())
    }

    fn validate_servers(&self, errors: &mut ConfigErrors) {
        let keyed: Vec<(String, &String)> =
            match (self.server_url.is_empty(), self.servers.is_empty()) {
                (true, true) => {
                    errors.push(
                        "server_url",
                        "must be set (or list the replicas' URLs in `servers`)",
                    );
                    Vec::new()
                }
                (false, false) => {
                    errors.push("servers", "set either server_url or servers, not both");
                    Vec::new()
                }
                (false, true) => vec![("server_url".to_owned(), &self.server_url)],
                (true, false) => self
                    .servers
                    .iter()
                    .enumerate()
                    .map(|(i, url)| (format!("servers[{i}]"), url))
                    .collect(),
            };
        if self.servers.len() > MAX_SERVERS {
            errors.push(
                "servers",
                format!("{} URLs; at most {MAX_SERVERS}", self.servers.len()),
            );
        }
        for (key, url) in keyed {
            match ServerUrl::parse(url) {
                Ok(url) => {
                    if let Err(message) = url.tls_name(&self.server_name) {
                        let key = if self.server_name.is_empty() {
                            key
                        } else {
                            "server_name".to_owned()
                        };
                        errors.push(key, message);
                    }
                }
                Err(message) => errors.push(key, message),
            }
        }
        let d = &self.discovery;
        if d.interval.0 < Duration::from_secs(1) || d.interval.0 > Duration::from_secs(3600) {
            errors.push(
                "discovery.interval",
                format!("{} is outside 1s..1h", d.interval),
            );
        }
        if d.min_connected == 0 || d.min_connected > MAX_SERVERS * MAX_SERVERS {
            errors.push(
                "discovery.min_connected",
                format!(
                    "{} is outside 1..={}",
                    d.min_connected,
                    MAX_SERVERS * MAX_SERVERS
                ),
            );
        }
        if let Some(k) = self.placement.replicas_per_agent {
            if k == 0 || k > MAX_SERVERS * MAX_SERVERS {
                errors.push(
                    "placement.replicas_per_agent",
                    format!("{k} is outside 1..={}", MAX_SERVERS * MAX_SERVERS),
                );
            } else if d.min_connected > k {
                errors.push(
                    "discovery.min_connected",
                    format!(
                        "{} is more than placement.replicas_per_agent ({k}): the agent could never be ready",
                        d.min_connected
                    ),
                );
            }
        }
    }

    /// Whether the agent must enroll before it can connect: `enroll:` is set and `tls.cert`
    /// does not exist yet.
    pub fn needs_enrollment(&self) -> bool {
        self.enroll.is_some() && !self.tls.cert.as_os_str().is_empty() && !self.tls.cert.exists()
    }

    fn validate_enroll(&self, errors: &mut ConfigErrors) {
        let Some(enroll) = &self.enroll else {
            return;
        };
        if let Err(message) = tether_common::csr::parse_pin(&enroll.ca_sha256) {
            errors.push("enroll.ca_sha256", message);
        }
        if self.protocol != AgentProtocol::Tether {
            errors.push("enroll", "enrollment needs `protocol: tether`");
        }
        if !self.needs_enrollment() {
            return;
        }
        match std::fs::read_to_string(&enroll.token_file) {
            Err(err) => errors.push(
                "enroll.token_file",
                format!(
                    "cannot read {} (needed: {} does not exist yet): {err}",
                    enroll.token_file.display(),
                    self.tls.cert.display()
                ),
            ),
            Ok(text) if text.trim().is_empty() => errors.push(
                "enroll.token_file",
                format!("{} holds no token", enroll.token_file.display()),
            ),
            Ok(_) => {}
        }
    }

    fn validate_tls(&self, errors: &mut ConfigErrors) {
        self.validate_enroll(errors);
        if self.needs_enrollment() {
            // The key and certificate (and the CA file, if missing) come from enrollment.
            for (key, path) in [
                ("tls.key", &self.tls.key),
                ("tls.server_ca", &self.tls.server_ca),
            ] {
                if path.as_os_str().is_empty() {
                    errors.push(key, "must be set");
                }
            }
            return;
        }
        let mut all_exist = true;
        for (key, path) in [
            ("tls.cert", &self.tls.cert),
            ("tls.key", &self.tls.key),
            ("tls.server_ca", &self.tls.server_ca),
        ] {
            if path.as_os_str().is_empty() {
                errors.push(key, "must be set");
                all_exist = false;
            } else if !path.is_file() {
                errors.push(key, format!("{} does not exist", path.display()));
                all_exist = false;
            }
        }
        // The files are there: check that they load and fit together.
        if all_exist && let Err(err) = tls::client_config(&self.tls_files()) {
            errors.push("tls", err.to_string());
        }
    }

    fn validate_reconnect(&self, errors: &mut ConfigErrors) {
        let r = &self.reconnect;
        if r.min_delay.0 < MIN_RECONNECT_DELAY {
            errors.push(
                "reconnect.min_delay",
                format!(
                    "{} is below the minimum of {}",
                    r.min_delay,
                    HumanDuration(MIN_RECONNECT_DELAY)
                ),
            );
        }
        if r.max_delay.0 < r.min_delay.0 {
            errors.push(
                "reconnect.max_delay",
                format!(
                    "{} is shorter than min_delay ({})",
                    r.max_delay, r.min_delay
                ),
            );
        }
        if r.max_delay.0 > Duration::from_secs(3600) {
            errors.push(
                "reconnect.max_delay",
                format!("{} is longer than 1h", r.max_delay),
            );
        }
        if r.reset_after.0.is_zero() {
            errors.push("reconnect.reset_after", "must be above zero");
        }
    }
}

fn check_timeout(key: &str, value: HumanDuration, errors: &mut ConfigErrors) {
    if value.0.is_zero() {
        errors.push(key, "must be above zero");
    } else if value.0 > MAX_TIMEOUT {
        errors.push(
            key,
            format!("{value} is longer than {}", HumanDuration(MAX_TIMEOUT)),
        );
    }
}

fn label_char_ok(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/')
}

fn validate_headers(headers: &BTreeMap<String, String>, errors: &mut ConfigErrors) {
    for (name, value) in headers {
        let key = format!("headers.{name}");
        match http::HeaderName::from_bytes(name.as_bytes()) {
            Err(_) => errors.push(key, format!("`{name}` is not a valid HTTP header name")),
            Ok(parsed) if parsed == http::header::SEC_WEBSOCKET_PROTOCOL => errors.push(
                key,
                "the subprotocol follows from `protocol`; it cannot be set here".to_owned(),
            ),
            Ok(_) => {
                if http::HeaderValue::from_str(value).is_err() {
                    errors.push(key, "not a valid HTTP header value".to_owned());
                }
            }
        }
    }
}

fn validate_labels(labels: &BTreeMap<String, String>, errors: &mut ConfigErrors) {
    if labels.len() > MAX_LABELS {
        errors.push(
            "labels",
            format!("{} labels; at most {MAX_LABELS} are allowed", labels.len()),
        );
    }
    for (key, value) in labels {
        let path = format!("labels.{key}");
        if key.is_empty() || key.len() > MAX_LABEL_LEN || !key.chars().all(label_char_ok) {
            errors.push(
                &path,
                format!(
                    "key must be 1..={MAX_LABEL_LEN} characters of letters, digits, `-`, `_`, `.`, `/`"
                ),
            );
        }
        if value.len() > MAX_LABEL_LEN || !value.chars().all(label_char_ok) {
            errors.push(
                path,
                format!(
                    "value must be at most {MAX_LABEL_LEN} characters of letters, digits, `-`, `_`, `.`, `/`"
                ),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_url_forms() {
        let u = ServerUrl::parse("wss://tether.example.com:8443/v1/connect").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("tether.example.com", 8443));
        let u = ServerUrl::parse("wss://example.com/v1/connect").unwrap();
        assert_eq!(u.port, 443);
        let u = ServerUrl::parse("wss://[::1]:9/v1/connect").unwrap();
        assert_eq!(u.host, "::1");
        assert!(matches!(u.tls_name("").unwrap(), ServerName::IpAddress(_)));
        assert!(matches!(
            u.tls_name("tether.example.com").unwrap(),
            ServerName::DnsName(_)
        ));
        for bad in [
            "ws://example.com/v1/connect",
            "https://example.com/",
            "example.com:443",
            "wss://",
            "wss://user@example.com/",
            "wss://example.com:0/",
            "wss://example.com/?a=b",
            "not a url",
        ] {
            assert!(ServerUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn enroll_keys_are_checked_with_their_key_paths() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path();
        let yaml = |enroll: &str| {
            let mut config: AgentConfig = serde_yaml_ng::from_str(&format!(
                "server_url: wss://localhost:8443/v1/connect\n\
                 tls: {{cert: agent.pem, key: agent-key.pem, server_ca: ca.pem}}\n{enroll}"
            ))
            .unwrap();
            config.resolve_paths(base);
            config
        };
        let paths = |config: &AgentConfig| -> Vec<String> {
            config
                .validate()
                .err()
                .map(|e| {
                    e.0.into_iter()
                        .map(|e| format!("{}: {}", e.path, e.message))
                        .collect()
                })
                .unwrap_or_default()
        };
        // No certificate yet, a token file and a pin: valid (the files come from enrollment).
        std::fs::write(base.join("token"), "tether-join-abc\n").unwrap();
        let pin = "ab".repeat(32);
        let ok = yaml(&format!(
            "enroll: {{token_file: token, ca_sha256: \"sha256:{pin}\"}}\n"
        ));
        assert!(ok.needs_enrollment());
        assert_eq!(paths(&ok), Vec::<String>::new());
        assert!(ok.enroll.as_ref().unwrap().renew, "renewal on by default");
        // A bad pin and a missing token file are named.
        let bad = yaml("enroll: {token_file: nope, ca_sha256: \"12:34\"}\n");
        let errors = paths(&bad);
        assert!(
            errors
                .iter()
                .any(|e| e.starts_with("enroll.ca_sha256: ") && e.contains("64 hex digits")),
            "{errors:?}"
        );
        assert!(
            errors
                .iter()
                .any(|e| e.starts_with("enroll.token_file: cannot read")),
            "{errors:?}"
        );
        // Without enroll, the missing certificate is an error as before.
        let plain = yaml("");
        assert!(!plain.needs_enrollment());
        assert!(paths(&plain).iter().any(|e| e.starts_with("tls.cert: ")));
        // An unknown key inside enroll is refused by the parser.
        assert!(serde_yaml_ng::from_str::<AgentConfig>(
            "server_url: wss://a/\ntls: {cert: a, key: b, server_ca: c}\nenroll: {token_file: t, ca_sha256: x, nope: 1}\n"
        )
        .is_err());
    }

    #[test]
    fn mux_config_follows_session_settings() {
        let mut config: AgentConfig = serde_yaml_ng::from_str(
            "server_url: wss://a/\ntls: {cert: a, key: b, server_ca: c}\nsession: {max_frame: 2048, sync_interval: 0s}\n",
        )
        .unwrap();
        config.dial_timeout = HumanDuration::secs(3);
        let mux = config.to_mux_config();
        assert_eq!(mux.max_data, 2048);
        assert_eq!(mux.sync_interval, None);
        assert_eq!(mux.dial_timeout, Duration::from_secs(3));
        assert_eq!(config.admin_listen, "127.0.0.1:9091");
        assert_eq!(config.reconnect, ReconnectConfig::default());
    }

    #[test]
    fn labels_header_is_sorted_pairs() {
        let mut config: AgentConfig = serde_yaml_ng::from_str(
            "server_url: wss://a/\ntls: {cert: a, key: b, server_ca: c}\nlabels: {role: upstream, cluster: eu-1}\n",
        )
        .unwrap();
        assert_eq!(config.labels_header(), "cluster=eu-1,role=upstream");
        config.labels.clear();
        assert_eq!(config.labels_header(), "");
    }

    #[test]
    fn placement_is_checked_against_min_connected() {
        let errors_for = |yaml: &str| -> Vec<(String, String)> {
            let config: AgentConfig = serde_yaml_ng::from_str(&format!(
                "server_url: wss://a/\ntls: {{cert: a, key: b, server_ca: c}}\n{yaml}"
            ))
            .unwrap();
            config
                .validate()
                .err()
                .map(|e| {
                    e.0.into_iter()
                        .map(|f| (f.path, f.message))
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
                .into_iter()
                .filter(|(path, _)| !path.starts_with("tls"))
                .collect()
        };
        assert!(errors_for("placement: {replicas_per_agent: 2}\n").is_empty());
        assert_eq!(
            errors_for("placement: {replicas_per_agent: 0}\n"),
            vec![(
                "placement.replicas_per_agent".to_owned(),
                "0 is outside 1..=4096".to_owned()
            )]
        );
        assert_eq!(
            errors_for("placement: {replicas_per_agent: 2}\ndiscovery: {min_connected: 3}\n"),
            vec![(
                "discovery.min_connected".to_owned(),
                "3 is more than placement.replicas_per_agent (2): the agent could never be ready"
                    .to_owned()
            )]
        );
        let unknown = serde_yaml_ng::from_str::<AgentConfig>(
            "server_url: wss://a/\ntls: {cert: a, key: b, server_ca: c}\nplacement: {k: 2}\n",
        );
        assert!(unknown.is_err(), "unknown keys under placement are refused");
    }
}
