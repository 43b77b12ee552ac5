//! The server's configuration file: `ServerConfig` (serde, every key documented), path
//! resolution against the file's directory, and validation that reports every problem at once.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

pub(crate) mod fields;

use serde::{Deserialize, Serialize};

pub(crate) use self::fields::{check_readable, parse_socket_addr, positive};
use tether_common::config_error::{ConfigErrors, ConfigLoadError, FieldError, parse_yaml};
use tether_common::duration::HumanDuration;
use tether_common::identity::{IdentityMode, validate_agent_id};
use tether_common::session_settings::SessionSettings;
use tether_common::tls::{ClientCertPolicy, ServerTlsFiles};
use tether_mux::MuxConfig;
use tether_proto::TargetAddr;

/// The only configuration format version this build understands.
pub const CONFIG_VERSION: u32 = 1;

/// The server configuration (`server.yaml`). Every key is optional; defaults are shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Format version of this file; must be `1`.
    pub version: u32,
    /// This replica's id: announced to agents in `X-Tether-Server` (an agent keeps one session
    /// per replica id), shown in `/v1/clients`, `tether_build_info` and dial errors. Empty (the
    /// default): the host name (a pod's name under Kubernetes, the container id under docker
    /// compose). 1-64 characters of `A-Z a-z 0-9 - _ .`; changing it needs a restart.
    pub server_id: String,
    /// Tunnel listener (mutual TLS, WebSocket upgrade on `/v1/connect`), `ip:port`.
    /// Default `0.0.0.0:8443`.
    pub listen: String,
    /// Admin listener (plain HTTP: `/healthz`, `/readyz`, `/metrics`, `/v1/clients`), `ip:port`.
    /// Default `127.0.0.1:9090`; keep it on loopback or a private network.
    pub admin_listen: String,
    /// TLS material of the tunnel listener. Relative paths are relative to the directory of the
    /// configuration file.
    pub tls: TlsConfig,
    /// Where the agent id is read from in the client certificate: `uri_san`
    /// (`tether://agent/<id>`, the default) or `dns_san` (the first DNS name).
    pub identity: IdentityMode,
    /// Agent ids allowed to connect. Empty (the default) admits any agent whose certificate
    /// chains to `tls.client_ca`; otherwise other agents get HTTP 403.
    pub allowed_agents: Vec<String>,
    /// The TLS handshake and the HTTP upgrade of a new connection must finish within this
    /// (default `10s`).
    pub handshake_timeout: HumanDuration,
    /// Most connections in the TLS/upgrade phase at once; further connections are dropped at
    /// accept (default `1024`).
    pub max_pending_handshakes: usize,
    /// Most connections from one source address (an IPv6 peer by its /64) in the TLS/upgrade
    /// phase at once; further connections from it are dropped at accept, so one host cannot
    /// take every slot (default `64`).
    pub max_pending_handshakes_per_source: usize,
    /// Most agent sessions at once; upgrades beyond this get HTTP 503 (default `10000`).
    pub max_agents: usize,
    /// How long an agent may take to connect a target for a dial (default `10s`).
    pub dial_timeout: HumanDuration,
    /// On shutdown, how long streams may take to finish after GOAWAY before the sessions are
    /// closed (default `20s`). Keep it below systemd's `TimeoutStopSec`.
    pub drain_timeout: HumanDuration,
    /// Settings of every tunnel session: windows, frame size, stream cap and keepalive.
    pub session: SessionSettings,
    /// Static port forwards: each listens locally and tunnels every connection to `target`
    /// through the newest session of agent `client`.
    pub forwards: Vec<ForwardConfig>,
    /// Health probes of agent sessions (the `health:` section).
    pub health: HealthConfig,
    /// What `/metrics` exports beyond the `tether_*` series.
    pub metrics: MetricsConfig,
    /// Go rancher/remotedialer clients on the tunnel listener (the `remotedialer:` section).
    pub remotedialer: RemotedialerConfig,
    /// Consumer frontends: the HTTP CONNECT and SOCKS5 proxies and who may use them.
    pub frontends: FrontendsConfig,
    /// Log filter (tracing `EnvFilter` syntax) used when neither `--log` nor `TETHER_LOG` is
    /// given; applied in place on reload. Empty: `info`.
    pub log: String,
    /// One JSON line per tunnelled connection when it closes (the `audit_log:` section).
    pub audit_log: AuditLogConfig,
    /// Agents that enroll with one-time join tokens and renew their own short-lived
    /// certificates (the `enrollment:` section); absent: off. Changes need a restart.
    pub enrollment: Option<EnrollmentConfig>,
    /// Replica peering: relay dials for agents placed on other replicas (the `peers:`
    /// section). Unset: no peering; a dial needs a session on this replica.
    pub peers: Option<crate::peers::config::PeersConfig>,
}

/// The `enrollment:` section. Relative paths are relative to the config file's directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollmentConfig {
    /// The CA certificate (PEM) that signs enrolled agents' certificates; ideally an
    /// intermediate whose root is in `tls.client_ca` (it is then sent with each certificate).
    pub issuer_cert: PathBuf,
    /// The issuing CA's private key (PEM).
    pub issuer_key: PathBuf,
    /// The join-token store written by `tether certs token` (hashes only); redeemed tokens are
    /// recorded in `<tokens_file>.used`.
    pub tokens_file: PathBuf,
    /// Validity of an issued or renewed certificate (`7d`, `12h`, `30m`, at least `10s`);
    /// agents renew at two thirds of it. Default `7d`.
    #[serde(default = "default_cert_valid_for")]
    pub cert_valid_for: String,
}

fn default_cert_valid_for() -> String {
    "7d".to_owned()
}

/// Shortest and longest `enrollment.cert_valid_for`.
const MIN_ENROLLED_VALIDITY: Duration = Duration::from_secs(10);
const MAX_ENROLLED_VALIDITY: Duration = Duration::from_secs(366 * 86_400);

impl EnrollmentConfig {
    /// `cert_valid_for` parsed: `<n>d` days or a duration such as `12h`.
    pub fn validity(&self) -> Result<Duration, String> {
        let text = self.cert_valid_for.trim();
        let duration = match text.strip_suffix('d') {
            Some(days) => days
                .parse::<u64>()
                .ok()
                .and_then(|d| d.checked_mul(86_400))
                .map(Duration::from_secs)
                .ok_or_else(|| format!("`{text}`: expected a whole number of days such as `7d`"))?,
            None => tether_common::duration::parse_duration(text)
                .map_err(|e| format!("{e}; days are written `7d`"))?,
        };
        if !(MIN_ENROLLED_VALIDITY..=MAX_ENROLLED_VALIDITY).contains(&duration) {
            return Err(format!("`{text}` is outside 10s..366d"));
        }
        Ok(duration)
    }

    fn validate(&self, identity: IdentityMode, errors: &mut ConfigErrors) {
        let mut readable = true;
        for (key, path) in [
            ("enrollment.issuer_cert", &self.issuer_cert),
            ("enrollment.issuer_key", &self.issuer_key),
        ] {
            if let Err(message) = check_readable(path) {
                errors.push(key, message);
                readable = false;
            }
        }
        if readable {
            let load = std::fs::read_to_string(&self.issuer_cert)
                .and_then(|cert| std::fs::read_to_string(&self.issuer_key).map(|key| (cert, key)));
            match load {
                Err(err) => errors.push("enrollment.issuer_key", err.to_string()),
                Ok((cert, key)) => {
                    if let Err(err) = tether_common::pki::Ca::from_pem(&cert, &key) {
                        errors.push(
                            "enrollment.issuer_cert",
                            format!(
                                "{} with {}: {err}",
                                self.issuer_cert.display(),
                                self.issuer_key.display()
                            ),
                        );
                    }
                }
            }
        }
        if self.tokens_file.as_os_str().is_empty() {
            errors.push("enrollment.tokens_file", "must be set");
        } else if self.tokens_file.is_dir() {
            errors.push(
                "enrollment.tokens_file",
                format!("{} is a directory", self.tokens_file.display()),
            );
        } else if let Some(parent) = self.tokens_file.parent()
            && !parent.as_os_str().is_empty()
            && !parent.is_dir()
        {
            errors.push(
                "enrollment.tokens_file",
                format!("the directory {} does not exist", parent.display()),
            );
        }
        if let Err(message) = self.validity() {
            errors.push("enrollment.cert_valid_for", message);
        }
        if identity != IdentityMode::UriSan {
            errors.push(
                "enrollment",
                "enrolled certificates carry the identity tether://agent/<id>; set `identity: \
                 uri_san`",
            );
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            version: CONFIG_VERSION,
            server_id: String::new(),
            listen: "0.0.0.0:8443".into(),
            admin_listen: "127.0.0.1:9090".into(),
            tls: TlsConfig::default(),
            identity: IdentityMode::UriSan,
            allowed_agents: Vec::new(),
            handshake_timeout: HumanDuration::secs(10),
            max_pending_handshakes: 1024,
            max_pending_handshakes_per_source: 64,
            max_agents: 10_000,
            dial_timeout: HumanDuration::secs(10),
            drain_timeout: HumanDuration::secs(20),
            session: SessionSettings::default(),
            forwards: Vec::new(),
            health: HealthConfig::default(),
            metrics: MetricsConfig::default(),
            remotedialer: RemotedialerConfig::default(),
            frontends: FrontendsConfig::default(),
            log: String::new(),
            audit_log: AuditLogConfig::default(),
            enrollment: None,
            peers: None,
        }
    }
}

/// Where the audit log goes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditOutput {
    /// No audit log (the default).
    #[default]
    Off,
    /// Standard error, beside the daemon's own logs.
    Stderr,
    /// Appended to `path`; reopened on SIGHUP (for logrotate).
    File,
}

/// The `audit_log:` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditLogConfig {
    /// `off` (default), `stderr` or `file`.
    pub output: AuditOutput,
    /// The file for `output: file`; relative paths are relative to the config file.
    pub path: PathBuf,
    /// Lines that may wait for the writer; past it lines are dropped and counted in
    /// `tether_audit_lines_total{result="dropped"}` (default `8192`).
    pub queue: usize,
}

impl Default for AuditLogConfig {
    fn default() -> Self {
        Self {
            output: AuditOutput::Off,
            path: PathBuf::new(),
            queue: 8192,
        }
    }
}

/// Largest `audit_log.queue` accepted.
const MAX_AUDIT_QUEUE: usize = 1 << 20;

impl AuditLogConfig {
    fn validate(&self, errors: &mut ConfigErrors) {
        if self.output == AuditOutput::File && self.path.as_os_str().is_empty() {
            errors.push(
                "audit_log.path",
                "is required when audit_log.output is `file`",
            );
        }
        if !(1..=MAX_AUDIT_QUEUE).contains(&self.queue) {
            errors.push(
                "audit_log.queue",
                format!("{} is outside 1..={MAX_AUDIT_QUEUE} lines", self.queue),
            );
        }
    }
}

/// The `health:` section: every session is pinged every `interval`; a session that misses
/// `unhealthy_after` pongs in a row is unhealthy until it answers again. Dials prefer the
/// newest healthy session of a client and fall back to the newest open one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// Time between the end of one probe of a session and the start of the next (default `10s`).
    pub interval: HumanDuration,
    /// How long a probe waits for its pong before it counts as missed (default `5s`).
    pub timeout: HumanDuration,
    /// Missed pongs in a row that make a session unhealthy (default `3`).
    pub unhealthy_after: u32,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            interval: HumanDuration::secs(10),
            timeout: HumanDuration::secs(5),
            unhealthy_after: 3,
        }
    }
}

/// Longest `health.interval` / `health.timeout` accepted.
const MAX_HEALTH_DURATION: Duration = Duration::from_secs(3600);
/// Largest `health.unhealthy_after` accepted.
const MAX_UNHEALTHY_AFTER: u32 = 1000;

impl HealthConfig {
    fn validate(&self, errors: &mut ConfigErrors) {
        for (path, value) in [
            ("health.interval", self.interval),
            ("health.timeout", self.timeout),
        ] {
            if value.0.is_zero() {
                errors.push(path, format!("{value} must be above zero"));
            } else if value.0 > MAX_HEALTH_DURATION {
                errors.push(path, format!("{value} must be at most 1h"));
            }
        }
        if !(1..=MAX_UNHEALTHY_AFTER).contains(&self.unhealthy_after) {
            errors.push(
                "health.unhealthy_after",
                format!(
                    "{} is outside 1..={MAX_UNHEALTHY_AFTER} missed pongs",
                    self.unhealthy_after
                ),
            );
        }
    }
}

/// The `tls:` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// Server certificate chain, PEM (default `server.pem`).
    pub cert: PathBuf,
    /// Server private key, PEM (default `server-key.pem`).
    pub key: PathBuf,
    /// CA bundle that agent certificates must chain to, PEM (default `ca.pem`).
    pub client_ca: PathBuf,
    /// Certificate revocation lists, PEM, checked for agent certificates (default none).
    pub crls: Vec<PathBuf>,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            cert: "server.pem".into(),
            key: "server-key.pem".into(),
            client_ca: "ca.pem".into(),
            crls: Vec::new(),
        }
    }
}

/// The `metrics:` section.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Also export remotedialer's `session_server_total_*` counters (without the `addr`
    /// label), for Rancher dashboards (default `false`).
    pub remotedialer_compat: bool,
}

/// The `remotedialer:` section: a WebSocket upgrade on `path` without the `tether.v1`
/// subprotocol is a rancher/remotedialer client. Its identity is the client certificate's, as
/// for native agents; the headers below can only narrow who gets in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RemotedialerConfig {
    /// Accept remotedialer clients (default `true`).
    pub enabled: bool,
    /// The upgrade path (default `/connect`); must start with `/` and differ from
    /// `/v1/connect`.
    pub path: String,
    /// A request header that, when present, must equal the certificate's agent id (default
    /// `X-Tunnel-ID`, the key of remotedialer's example server); empty disables the check.
    pub tunnel_id_header: String,
    /// Also require this header to be present (default `false`).
    pub require_tunnel_id: bool,
    /// A file holding a shared token (surrounding whitespace ignored); when set, every
    /// remotedialer request must carry it in `token_header` (default: none).
    pub token_file: Option<PathBuf>,
    /// The header carrying the token (default `X-API-Tunnel-Token`).
    pub token_header: String,
    /// How long a connection may stay half-closed (one side finished, the other not) before
    /// it is ended; remotedialer cannot carry a half-close (default `30s`).
    pub close_linger: HumanDuration,
    /// Connections younger than this are never reaped by a client's SyncConnections (its list
    /// may predate their Connect) (default `10s`).
    pub sync_grace: HumanDuration,
    /// Let clients complete the TLS handshake without a certificate (a presented one must
    /// still verify). Certless remotedialer clients are then identified by `tunnel_id_header`
    /// and authenticated by the token; certless native agents are refused. Needs
    /// `token_file` (default `false`).
    pub allow_without_client_cert: bool,
}

impl Default for RemotedialerConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            path: "/connect".into(),
            tunnel_id_header: "X-Tunnel-ID".into(),
            require_tunnel_id: false,
            token_file: None,
            token_header: "X-API-Tunnel-Token".into(),
            close_linger: HumanDuration::secs(30),
            sync_grace: HumanDuration::secs(10),
            allow_without_client_cert: false,
        }
    }
}

impl RemotedialerConfig {
    fn validate(&self, errors: &mut ConfigErrors) {
        if self.allow_without_client_cert {
            let missing = [
                (!self.enabled, "remotedialer.enabled: true"),
                (self.token_file.is_none(), "remotedialer.token_file"),
                (
                    self.tunnel_id_header.is_empty(),
                    "remotedialer.tunnel_id_header",
                ),
            ];
            for (absent, what) in missing {
                if absent {
                    errors.push(
                        "remotedialer.allow_without_client_cert",
                        format!(
                            "needs {what}: clients without a certificate are authenticated by \
                             the token and named by the tunnel-id header"
                        ),
                    );
                }
            }
        }
        if !self.enabled {
            return;
        }
        if !self.path.starts_with('/') || self.path.contains(['?', '#', ' ']) {
            errors.push(
                "remotedialer.path",
                format!("`{}` must be a path starting with `/`", self.path),
            );
        } else if self.path == "/v1/connect" {
            errors.push(
                "remotedialer.path",
                "`/v1/connect` is the native agents' path; choose another".to_owned(),
            );
        }
        for (key, value, may_be_empty) in [
            (
                "remotedialer.tunnel_id_header",
                &self.tunnel_id_header,
                true,
            ),
            ("remotedialer.token_header", &self.token_header, false),
        ] {
            if value.is_empty() && may_be_empty {
                continue;
            }
            if http::HeaderName::from_bytes(value.as_bytes()).is_err() {
                errors.push(key, format!("`{value}` is not a valid HTTP header name"));
            }
        }
        if self.close_linger.0.is_zero() || self.close_linger.0 > Duration::from_secs(86_400) {
            errors.push(
                "remotedialer.close_linger",
                format!("{} must be above zero and at most 24h", self.close_linger),
            );
        }
        if self.sync_grace.0 > Duration::from_secs(3600) {
            errors.push(
                "remotedialer.sync_grace",
                format!("{} must be at most 1h", self.sync_grace),
            );
        }
        if self.require_tunnel_id && self.tunnel_id_header.is_empty() {
            errors.push(
                "remotedialer.require_tunnel_id",
                "needs remotedialer.tunnel_id_header".to_owned(),
            );
        }
        if let Some(file) = &self.token_file
            && let Err(message) = check_readable(file)
        {
            errors.push("remotedialer.token_file", message);
        }
    }
}

/// One entry of `forwards:`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardConfig {
    /// A unique name, used in logs (`[A-Za-z0-9._-]`, at most 64 characters).
    pub name: String,
    /// Local listen address, `ip:port` (use loopback unless consumers elsewhere need it).
    pub listen: String,
    /// The agent id whose session carries the connections.
    pub client: String,
    /// Where the agent connects, `host:port` as seen from the agent (`[v6]:port` for IPv6).
    pub target: String,
}

impl ForwardConfig {
    /// The parsed listen address.
    pub fn listen_addr(&self) -> Result<SocketAddr, String> {
        parse_socket_addr(&self.listen)
    }

    /// The parsed target.
    pub fn target_addr(&self) -> Result<TargetAddr, String> {
        TargetAddr::from_str(&self.target).map_err(|e| format!("`{}`: {e}", self.target))
    }
}

// === impl ServerConfig ===

impl ServerConfig {
    /// The effective config: fallbacks resolved (an empty `server_id` is the host name), so
    /// that two configs that mean the same thing compare equal.
    pub fn effective(mut self) -> ServerConfig {
        if self.server_id.is_empty() {
            self.server_id = tether_common::host::host_name();
        }
        self
    }

    /// Reads `path`, parses it, resolves relative paths against its directory and validates it.
    pub fn load(path: &Path) -> Result<ServerConfig, ConfigLoadError> {
        let source_name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigLoadError::Read {
            source_name: source_name.clone(),
            source,
        })?;
        let base_dir = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, &source_name, base_dir)
    }

    /// Parses YAML `text` (named `source_name` in errors), resolves relative paths against
    /// `base_dir` and validates the result.
    pub fn parse(
        text: &str,
        source_name: &str,
        base_dir: &Path,
    ) -> Result<ServerConfig, ConfigLoadError> {
        let mut config: ServerConfig = parse_yaml(text, source_name)?;
        config.resolve_paths(base_dir);
        config
            .validate()
            .map_err(|errors| ConfigLoadError::Invalid {
                source_name: source_name.to_owned(),
                errors,
            })?;
        Ok(config)
    }

    /// Makes the TLS paths absolute by joining relative ones onto `base_dir`.
    pub fn resolve_paths(&mut self, base_dir: &Path) {
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base_dir.join(&*p);
            }
        };
        resolve(&mut self.tls.cert);
        resolve(&mut self.tls.key);
        resolve(&mut self.tls.client_ca);
        self.tls.crls.iter_mut().for_each(resolve);
        if let Some(token) = &mut self.remotedialer.token_file {
            resolve(token);
        }
        if !self.audit_log.path.as_os_str().is_empty() {
            resolve(&mut self.audit_log.path);
        }
        if let Some(enrollment) = &mut self.enrollment {
            resolve(&mut enrollment.issuer_cert);
            resolve(&mut enrollment.issuer_key);
            resolve(&mut enrollment.tokens_file);
        }
        if let Some(peers) = &mut self.peers {
            peers.resolve_paths(base_dir);
        }
    }

    /// Checks everything that parsing cannot; collects every problem with its key path.
    pub fn validate(&self) -> Result<(), ConfigErrors> {
        let mut errors = ConfigErrors::new();
        if self.version != CONFIG_VERSION {
            errors.push(
                "version",
                format!(
                    "unsupported version {} (this build reads version {CONFIG_VERSION})",
                    self.version
                ),
            );
        }
        for (path, addr) in [
            ("listen", &self.listen),
            ("admin_listen", &self.admin_listen),
        ] {
            if let Err(message) = parse_socket_addr(addr) {
                errors.push(path, message);
            }
        }
        if !self.server_id.is_empty()
            && let Err(message) = tether_common::host::validate_server_id(&self.server_id)
        {
            errors.push("server_id", message);
        }
        self.validate_tls(&mut errors);
        for (i, id) in self.allowed_agents.iter().enumerate() {
            if let Err(err) = validate_agent_id(id) {
                errors.push(format!("allowed_agents[{i}]"), err.to_string());
            }
        }
        positive(&mut errors, "handshake_timeout", self.handshake_timeout);
        positive(&mut errors, "dial_timeout", self.dial_timeout);
        if self.dial_timeout.0 > Duration::from_millis(u64::from(u32::MAX)) {
            errors.push("dial_timeout", "must be below 49 days");
        }
        if self.max_pending_handshakes == 0 {
            errors.push("max_pending_handshakes", "must be at least 1");
        }
        if self.max_pending_handshakes_per_source == 0 {
            errors.push("max_pending_handshakes_per_source", "must be at least 1");
        }
        if self.max_agents == 0 {
            errors.push("max_agents", "must be at least 1");
        }
        self.session.validate("session", &mut errors);
        self.validate_forwards(&mut errors);
        self.health.validate(&mut errors);
        self.remotedialer.validate(&mut errors);
        self.frontends.validate(&mut errors);
        self.audit_log.validate(&mut errors);
        if let Some(enrollment) = &self.enrollment {
            enrollment.validate(self.identity, &mut errors);
        }
        if let Some(peers) = &self.peers {
            peers.validate(&mut errors);
        }
        errors.into_result(())
    }

    fn validate_tls(&self, errors: &mut ConfigErrors) {
        let files = [
            ("tls.cert".to_owned(), &self.tls.cert),
            ("tls.key".to_owned(), &self.tls.key),
            ("tls.client_ca".to_owned(), &self.tls.client_ca),
        ];
        let crls = self
            .tls
            .crls
            .iter()
            .enumerate()
            .map(|(i, p)| (format!("tls.crls[{i}]"), p));
        for (path, file) in files.into_iter().chain(crls) {
            if let Err(message) = check_readable(file) {
                errors.push(path, message);
            }
        }
    }

    fn validate_forwards(&self, errors: &mut ConfigErrors) {
        let allowed: HashSet<&str> = self.allowed_agents.iter().map(String::as_str).collect();
        let mut names: HashMap<&str, usize> = HashMap::new();
        let mut listens: HashMap<SocketAddr, usize> = HashMap::new();
        for (i, forward) in self.forwards.iter().enumerate() {
            let at = |key: &str| format!("forwards[{i}].{key}");
            if let Err(message) = check_forward_name(&forward.name) {
                errors.push(at("name"), message);
            } else if let Some(first) = names.insert(&forward.name, i) {
                errors.push(
                    at("name"),
                    format!(
                        "`{}` is already the name of forwards[{first}]",
                        forward.name
                    ),
                );
            }
            match forward.listen_addr() {
                Err(message) => errors.push(at("listen"), message),
                Ok(addr) if addr.port() != 0 => {
                    if let Some(first) = listens.insert(addr, i) {
                        errors.push(
                            at("listen"),
                            format!("{addr} is already the address of forwards[{first}]"),
                        );
                    }
                }
                Ok(_) => {}
            }
            if let Err(err) = validate_agent_id(&forward.client) {
                errors.push(at("client"), err.to_string());
            } else if !allowed.is_empty() && !allowed.contains(forward.client.as_str()) {
                errors.push(
                    at("client"),
                    format!(
                        "`{}` is not in allowed_agents, so it can never connect",
                        forward.client
                    ),
                );
            }
            if let Err(message) = forward.target_addr() {
                errors.push(at("target"), message);
            }
        }
    }

    /// The parsed tunnel listen address.
    pub fn listen_addr(&self) -> Result<SocketAddr, FieldError> {
        parse_socket_addr(&self.listen).map_err(|m| FieldError::new("listen", m))
    }

    /// The parsed admin listen address.
    pub fn admin_addr(&self) -> Result<SocketAddr, FieldError> {
        parse_socket_addr(&self.admin_listen).map_err(|m| FieldError::new("admin_listen", m))
    }

    /// Whether the tunnel listener's handshake demands a client certificate: not with
    /// `remotedialer.allow_without_client_cert`, nor with `enrollment` (an enrolling agent has
    /// none yet). The routes then decide: only the enrollment route (and the token-only
    /// remotedialer route) serve a client without one.
    pub fn client_cert_policy(&self) -> ClientCertPolicy {
        if (self.remotedialer.enabled && self.remotedialer.allow_without_client_cert)
            || self.enrollment.is_some()
        {
            ClientCertPolicy::Optional
        } else {
            ClientCertPolicy::Required
        }
    }

    /// The TLS files, for `tether_common::tls::server_config`.
    pub fn tls_files(&self) -> ServerTlsFiles {
        ServerTlsFiles {
            cert: self.tls.cert.clone(),
            key: self.tls.key.clone(),
            client_ca: self.tls.client_ca.clone(),
            crls: self.tls.crls.clone(),
        }
    }

    /// The multiplexer settings of each session.
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
}

fn check_forward_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name.len() > 64 {
        return Err("must be at most 64 characters".into());
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(format!(
            "`{name}`: only the characters A-Z a-z 0-9 . _ - are allowed"
        ));
    }
    Ok(())
}

// === impl FrontendsConfig ===

/// The `frontends:` section: the HTTP CONNECT and SOCKS5 proxies, through which local
/// consumers reach any target an agent allows, naming the agent by its client id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FrontendsConfig {
    /// HTTP CONNECT proxy listener, `ip:port`; empty (the default) means off.
    pub http_connect_listen: String,
    /// SOCKS5 proxy listener, `ip:port`; empty (the default) means off.
    pub socks5_listen: String,
    /// A consumer must finish its proxy handshake (request line and headers, or the SOCKS5
    /// greeting, authentication and request) within this (default `10s`).
    pub handshake_timeout: HumanDuration,
    /// Most established (authorized) consumer connections per frontend, and, counted apart,
    /// most connections still in their handshake (at most 64 of those from one peer address);
    /// past either, connections are refused (default `1024`).
    pub max_connections: usize,
    /// Consumers that authenticate with a token.
    pub consumers: Vec<ConsumerConfig>,
    /// Client id patterns that consumers without a token may reach, only from a loopback
    /// address. Empty (the default) refuses every consumer without a token.
    pub anonymous_clients: Vec<String>,
}

impl Default for FrontendsConfig {
    fn default() -> Self {
        Self {
            http_connect_listen: String::new(),
            socks5_listen: String::new(),
            handshake_timeout: HumanDuration::secs(10),
            max_connections: 1024,
            consumers: Vec::new(),
            anonymous_clients: Vec::new(),
        }
    }
}

/// One entry of `frontends.consumers`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsumerConfig {
    /// A unique name, used in logs (`[A-Za-z0-9._-]`, at most 64 characters).
    pub name: String,
    /// SHA-256 of the consumer's token, 64 hex digits (`tether hash-token` reads the token on
    /// stdin and prints it; `printf %s "$TOKEN" | sha256sum` gives the same).
    pub token_sha256: TokenHash,
    /// Client id patterns this consumer may reach: an id, or `*` for any run of characters
    /// (`edge-*`, `*`).
    pub clients: Vec<String>,
}

/// The SHA-256 of a consumer token, as hex. Not the token, but kept out of logs all the same.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TokenHash(pub String);

impl std::fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenHash(***)")
    }
}

impl TokenHash {
    /// The hash of `token`, as the config stores it.
    pub fn of(token: &str) -> TokenHash {
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes());
        TokenHash(digest.as_ref().iter().map(|b| format!("{b:02x}")).collect())
    }

    /// The 32 bytes of the hash, or why the text is not one.
    pub fn bytes(&self) -> Result<[u8; 32], String> {
        let text = self.0.as_bytes();
        if text.len() != 64 {
            return Err(format!(
                "must be 64 hex digits (a SHA-256), got {} characters",
                text.len()
            ));
        }
        let mut out = [0u8; 32];
        for (i, pair) in text.chunks_exact(2).enumerate() {
            let digit = |c: u8| (c as char).to_digit(16);
            match (digit(pair[0]), digit(pair[1])) {
                (Some(hi), Some(lo)) => out[i] = (hi * 16 + lo) as u8,
                _ => return Err("must be 64 hex digits (a SHA-256)".into()),
            }
        }
        Ok(out)
    }
}

/// Longest `frontends.handshake_timeout` accepted.
const MAX_FRONTEND_HANDSHAKE: Duration = Duration::from_secs(600);

impl FrontendsConfig {
    /// The parsed HTTP CONNECT listen address, `None` when off.
    pub fn http_connect_addr(&self) -> Result<Option<SocketAddr>, FieldError> {
        optional_addr(&self.http_connect_listen)
            .map_err(|m| FieldError::new("frontends.http_connect_listen", m))
    }

    /// The parsed SOCKS5 listen address, `None` when off.
    pub fn socks5_addr(&self) -> Result<Option<SocketAddr>, FieldError> {
        optional_addr(&self.socks5_listen)
            .map_err(|m| FieldError::new("frontends.socks5_listen", m))
    }

    /// Checks the section; problems go to `errors` with their key paths.
    pub fn validate(&self, errors: &mut ConfigErrors) {
        for result in [self.http_connect_addr(), self.socks5_addr()] {
            if let Err(err) = result {
                errors.0.push(err);
            }
        }
        if let (Ok(Some(a)), Ok(Some(b))) = (self.http_connect_addr(), self.socks5_addr())
            && a == b
            && a.port() != 0
        {
            errors.push(
                "frontends.socks5_listen",
                format!("{b} is already frontends.http_connect_listen"),
            );
        }
        let timeout = self.handshake_timeout;
        if timeout.0.is_zero() {
            errors.push(
                "frontends.handshake_timeout",
                format!("{timeout} must be above zero"),
            );
        } else if timeout.0 > MAX_FRONTEND_HANDSHAKE {
            errors.push(
                "frontends.handshake_timeout",
                format!("{timeout} must be at most 10m"),
            );
        }
        if self.max_connections == 0 {
            errors.push("frontends.max_connections", "must be at least 1");
        }
        let mut names: HashMap<&str, usize> = HashMap::new();
        let mut hashes: HashMap<&str, usize> = HashMap::new();
        for (i, consumer) in self.consumers.iter().enumerate() {
            let at = |key: &str| format!("frontends.consumers[{i}].{key}");
            if let Err(message) = check_forward_name(&consumer.name) {
                errors.push(at("name"), message);
            } else if let Some(first) = names.insert(&consumer.name, i) {
                errors.push(
                    at("name"),
                    format!(
                        "`{}` is already the name of frontends.consumers[{first}]",
                        consumer.name
                    ),
                );
            }
            if let Err(message) = consumer.token_sha256.bytes() {
                errors.push(at("token_sha256"), message);
            } else if let Some(first) = hashes.insert(consumer.token_sha256.0.as_str(), i) {
                errors.push(
                    at("token_sha256"),
                    format!("is the same token as frontends.consumers[{first}]"),
                );
            }
            if consumer.clients.is_empty() {
                errors.push(at("clients"), "must name at least one client id pattern");
            }
            for (j, pattern) in consumer.clients.iter().enumerate() {
                if let Err(message) = check_client_pattern(pattern) {
                    errors.push(at(&format!("clients[{j}]")), message);
                }
            }
        }
        for (j, pattern) in self.anonymous_clients.iter().enumerate() {
            if let Err(message) = check_client_pattern(pattern) {
                errors.push(format!("frontends.anonymous_clients[{j}]"), message);
            }
        }
    }
}

fn optional_addr(text: &str) -> Result<Option<SocketAddr>, String> {
    if text.is_empty() {
        Ok(None)
    } else {
        parse_socket_addr(text).map(Some)
    }
}

/// A client id pattern: agent id characters and `*`.
fn check_client_pattern(pattern: &str) -> Result<(), String> {
    if pattern.is_empty() {
        return Err("must not be empty".into());
    }
    if pattern.len() > 128 {
        return Err("must be at most 128 characters".into());
    }
    if !pattern
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'*'))
    {
        return Err(format!(
            "`{pattern}`: only A-Z a-z 0-9 . _ - and the wildcard * are allowed"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod enrollment_tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn enrollment_keys_are_checked_with_their_key_paths() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        tether_common::pki::init_dir(d, &["localhost".into()], &[]).unwrap();
        let parse = |enrollment: &str| {
            ServerConfig::parse(
                &format!(
                    "tls: {{cert: server.pem, key: server-key.pem, client_ca: ca.pem}}\n{enrollment}"
                ),
                "server.yaml",
                d,
            )
        };
        let ok = parse(
            "enrollment: {issuer_cert: ca.pem, issuer_key: ca-key.pem, tokens_file: tokens}\n",
        )
        .unwrap();
        let section = ok.enrollment.as_ref().unwrap();
        assert_eq!(section.validity().unwrap(), Duration::from_secs(7 * 86_400));
        assert_eq!(section.tokens_file, d.join("tokens"));
        assert_eq!(ok.client_cert_policy(), ClientCertPolicy::Optional);

        let err = parse(
            "identity: dns_san\nenrollment: {issuer_cert: server.pem, issuer_key: server-key.pem, \
             tokens_file: missing/tokens, cert_valid_for: 5s}\n",
        )
        .unwrap_err()
        .to_string();
        for expected in [
            "enrollment.issuer_cert",
            "not a CA",
            "enrollment.tokens_file",
            "does not exist",
            "enrollment.cert_valid_for",
            "outside 10s..366d",
            "identity: uri_san",
        ] {
            assert!(err.contains(expected), "{expected} in {err}");
        }
        let err =
            parse("enrollment: {issuer_cert: nope.pem, issuer_key: ca-key.pem, tokens_file: t}\n")
                .unwrap_err()
                .to_string();
        assert!(
            err.contains("enrollment.issuer_cert") && err.contains("nope.pem"),
            "{err}"
        );
    }
}
