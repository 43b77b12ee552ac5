//! Command-line flags of the `tether` binary (clap).

use std::net::IpAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// tether: a reverse tunnel over mutually authenticated TLS WebSockets.
#[derive(Debug, Parser)]
#[command(name = "tether", version, about, propagate_version = true)]
pub(crate) struct Cli {
    /// `--log` before the subcommand (older scripts); the daemon commands take it themselves.
    #[arg(long, hide = true)]
    pub(crate) log: Option<String>,
    /// `--log-format` before the subcommand (older scripts).
    #[arg(long, hide = true, value_enum)]
    pub(crate) log_format: Option<LogFormat>,
    #[command(subcommand)]
    pub(crate) command: Command,
}

/// The log flags of the commands that run daemons (`server`, `agent`, `demo`); the other
/// commands print their results and take no log flags.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct LogArgs {
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `tether=debug`; beats the
    /// config's `log` key. Default: the config's `log`, else `info`.
    #[arg(long, env = "TETHER_LOG")]
    pub(crate) log: Option<String>,
    /// Log format: `text` (coloured only when stderr is a terminal and NO_COLOR is unset) or
    /// `json` (one JSON object per line, never coloured).
    /// [default: text]
    #[arg(long, env = "TETHER_LOG_FORMAT", value_enum)]
    pub(crate) log_format: Option<LogFormat>,
}

impl LogArgs {
    /// These flags, falling back to the ones given before the subcommand.
    pub(crate) fn or_top(&self, cli: &Cli) -> (Option<String>, LogFormat) {
        (
            self.log.clone().or_else(|| cli.log.clone()),
            self.log_format
                .or(cli.log_format)
                .unwrap_or(LogFormat::Text),
        )
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Run the server daemon: accepts agents, serves forwards and the admin endpoint.
    Server {
        /// Path of the server config (YAML).
        #[arg(long, short, env = "TETHER_CONFIG")]
        config: PathBuf,
        /// Override one config key: `--set key.path=value` (repeatable; beats the file and
        /// `TETHER_*` variables; an empty value keeps the less specific layer).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        #[command(flatten)]
        log: LogArgs,
    },
    /// Run the agent daemon: dials the server and opens streams to allowed targets.
    Agent {
        /// Path of the agent config (YAML).
        #[arg(long, short, env = "TETHER_CONFIG")]
        config: PathBuf,
        /// Override one config key: `--set key.path=value` (repeatable; beats the file and
        /// `TETHER_*` variables; an empty value keeps the less specific layer).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        #[command(flatten)]
        log: LogArgs,
    },
    /// Start a setup in one step: a CA, the server and agent certificates, and a minimal
    /// server.yaml and agent.yaml that match (one forward, and the policy that allows it).
    #[command(after_help = "Example (one machine):\n  \
        tether init --dir pki --server-name localhost --agent edge-1 --target 127.0.0.1:8080\n  \
        tether server --config pki/server.yaml &\n  \
        tether agent --config pki/agent.yaml &\n  \
        curl http://127.0.0.1:18080/")]
    Init {
        /// Output directory (created if missing; refused if it holds a CA key or configs).
        #[arg(long)]
        dir: PathBuf,
        /// The name (or IP) agents dial; the server certificate holds it next to `localhost`
        /// and 127.0.0.1.
        #[arg(long, default_value = "localhost")]
        server_name: String,
        /// The agent id (letters, digits, `.`, `_`, `-`).
        #[arg(long)]
        agent: String,
        /// The forward's target, `host:port` as the agent sees it; the agent's policy allows
        /// exactly this.
        #[arg(long, default_value = "127.0.0.1:8080")]
        target: String,
        /// The forward's local listen address on the server, `ip:port`.
        #[arg(long, default_value = "127.0.0.1:18080")]
        forward_listen: String,
    },
    /// Create a CA and certificates for mutual TLS.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// Validate a config file and exit: 0 when valid, 2 with every error listed otherwise.
    CheckConfig {
        /// Which daemon the file is for; guessed from its keys when omitted.
        #[arg(long, value_enum)]
        kind: Option<ConfigKind>,
        /// The config file.
        path: PathBuf,
    },
    /// Check a setup step by step and explain what fails: for an agent config the config,
    /// certificates, activation gate, DNS, TCP, TLS, the WebSocket upgrade and the server's
    /// verdict on this identity; for a server config the certificates, CA, CRLs and listeners.
    #[command(after_help = "Examples:\n  \
        tether doctor --config /etc/tether/agent.yaml\n  \
        tether doctor --config /etc/tether/agent.yaml --target db.internal:5432\n  \
        tether doctor --config /etc/tether/server.yaml\n\n\
        Each step prints `ok`, `warn` or `FAIL` with the reason, and a `fix:` line on failure.\n\
        Exit code 0 when no step failed, 1 otherwise.")]
    Doctor {
        /// The server or agent config (YAML).
        #[arg(long, short, env = "TETHER_CONFIG")]
        config: PathBuf,
        /// Which daemon the file is for; guessed from its keys when omitted.
        #[arg(long, value_enum)]
        kind: Option<ConfigKind>,
        /// Override one config key, as the daemon's `--set` (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Agent configs: check a target `host:port` against the agent's dial policy (which
        /// rule allows it, after resolution on this host), then dial it.
        #[arg(long, value_name = "HOST:PORT")]
        target: Option<String>,
    },
    /// Show the clients, sessions, forwards and frontends of a running server (its
    /// `GET /v1/clients`), or with CLIENT why that client is or is not connected.
    Status {
        /// One client id: its sessions, its last refused attempt (TLS refusals included) and
        /// its last session end (`GET /v1/clients/CLIENT`). A source address shows the refusals
        /// of peers whose certificate named no readable id.
        client: Option<String>,
        /// The server's admin listener (`admin_listen`), as `http://host:port`. Repeat it
        /// (or give a host name with several addresses) for server replicas: each client's
        /// sessions per replica, and the replicas it is missing on.
        #[arg(
            long,
            env = "TETHER_ADMIN",
            default_value = "http://127.0.0.1:9090",
            value_delimiter = ','
        )]
        admin: Vec<String>,
        /// Print the raw JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Give up when the server has not answered within this duration (`5s`, `500ms`).
        #[arg(long, default_value = "5s", value_parser = parse_duration)]
        timeout: std::time::Duration,
    },
    /// Run a throwaway CA, a server, an agent and a target on loopback, and send traffic.
    Demo {
        /// Exit after the traffic check: 0 only if the data came back byte-exact.
        #[arg(long)]
        once: bool,
        /// Bytes to send through the tunnel.
        #[arg(long, default_value_t = 8 * 1024 * 1024)]
        bytes: usize,
        /// Keep the CA, the certificates and the working server.yaml and agent.yaml in this
        /// directory (created; must not hold a setup already) instead of a throwaway one.
        #[arg(long, value_name = "DIR")]
        keep: Option<PathBuf>,
        #[command(flatten)]
        log: LogArgs,
    },
    /// Read a consumer token from stdin (one line) and print its SHA-256 for
    /// `frontends.consumers[].token_sha256`.
    HashToken,
}

#[derive(Debug, Subcommand)]
pub(crate) enum CertsCommand {
    /// Create `ca.pem`, `ca-key.pem`, `server.pem` and `server-key.pem` in a directory.
    Init {
        /// Output directory (created if missing).
        #[arg(long)]
        dir: PathBuf,
        /// DNS names for the server certificate (repeatable), added to `localhost`.
        #[arg(long = "dns")]
        dns: Vec<String>,
        /// IP addresses for the server certificate (repeatable), added to 127.0.0.1.
        #[arg(long = "ip")]
        ip: Vec<IpAddr>,
        /// Leave out `localhost` and 127.0.0.1 (then at least one --dns or --ip is needed).
        #[arg(long)]
        no_localhost: bool,
        /// Validity of the server certificate (`90d`, `12h`); one year when omitted.
        #[arg(long, value_name = "DURATION")]
        valid_for: Option<String>,
    },
    /// Issue an agent certificate (URI SAN `tether://agent/<ID>`) with the CA in a directory,
    /// or with `--server-peer ID` a replica's peer certificate (URI SAN `tether://server/<ID>`).
    Issue {
        /// Directory holding `ca.pem` and `ca-key.pem`.
        #[arg(long)]
        dir: PathBuf,
        /// The agent id (letters, digits, `.`, `_`, `-`).
        #[arg(
            long,
            required_unless_present = "server_peer",
            conflicts_with = "server_peer"
        )]
        agent: Option<String>,
        /// A server replica's id: writes `server-peer-<ID>.pem` and its key, for the
        /// replica-to-replica peer session (never accepted as an agent).
        #[arg(long, value_name = "ID")]
        server_peer: Option<String>,
        /// Validity of the certificate (`90d`, `12h`); one year when omitted.
        #[arg(long, value_name = "DURATION")]
        valid_for: Option<String>,
    },
    /// Issue a successor of a certificate: same identity (agent id, or server names), a new
    /// key, a new validity. Replaces the certificate and key files; running daemons pick them
    /// up without dropping sessions.
    Renew {
        /// Directory holding `ca.pem` and `ca-key.pem`.
        #[arg(long)]
        dir: PathBuf,
        /// The certificate to renew (PEM); replaced.
        #[arg(long)]
        cert: PathBuf,
        /// Its private key (PEM); replaced by a new key.
        #[arg(long)]
        key: PathBuf,
        /// Validity of the new certificate (`90d`, `12h`).
        #[arg(long, value_name = "DURATION", default_value = "365d")]
        valid_for: String,
        /// Keep the existing key (it must be the certificate's): only the certificate file is
        /// replaced.
        #[arg(long)]
        keep_key: bool,
    },
    /// Print a one-time join token for an agent's enrollment: the server stores only its
    /// hash (in `enrollment.tokens_file`); the agent presents it once, with `enroll:` in its
    /// config, and receives a certificate for the id named here.
    Token {
        /// The agent id the enrolled certificate will carry (whatever the agent asks for).
        #[arg(long)]
        agent: String,
        /// How long the token can be redeemed (`1h`, `30m`, `2d`).
        #[arg(long, value_name = "DURATION", default_value = "1h")]
        valid_for: String,
        /// The server config whose `enrollment.tokens_file` takes the token (also prints the
        /// `ca_sha256` pin of its `tls.client_ca`).
        #[arg(
            long,
            required_unless_present = "tokens_file",
            conflicts_with = "tokens_file"
        )]
        config: Option<PathBuf>,
        /// The token store file itself (instead of `--config`).
        #[arg(long)]
        tokens_file: Option<PathBuf>,
    },
    /// Show a certificate file: identity, names, issuer, validity; with `--config`, whether it
    /// fits that server or agent config.
    Inspect {
        /// The certificate (PEM; a chain or bundle shows every certificate).
        file: PathBuf,
        /// A server or agent config to check the certificate against.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Revoke certificates: add them to the CA's CRL file (created if missing; existing
    /// entries kept). A server listing the file in `tls.crls` reloads it and closes the
    /// revoked agents' sessions. Without `--cert`, only re-sign the CRL (or create it empty).
    ///
    /// With `--agent ID --config server.yaml`: every certificate the server's enrollment issued
    /// to that agent (from its issuance log), signed by `enrollment.issuer_cert`, into the
    /// server's first `tls.crls` file (or `--crl`).
    Revoke {
        /// Directory holding `ca.pem` and `ca-key.pem`.
        #[arg(long, required_unless_present = "agent")]
        dir: Option<PathBuf>,
        /// An enrolled agent's id: revoke every certificate enrollment issued to it.
        #[arg(long, requires = "config", conflicts_with_all = ["dir", "cert"])]
        agent: Option<String>,
        /// The server config (with `enrollment:`) for `--agent`.
        #[arg(long)]
        config: Option<PathBuf>,
        /// The certificate(s) to revoke (PEM).
        #[arg(long)]
        cert: Option<PathBuf>,
        /// The CRL file; `<dir>/crl.pem` when omitted.
        #[arg(long)]
        crl: Option<PathBuf>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum ConfigKind {
    Server,
    Agent,
}

/// A duration flag in the config files' syntax (`5s`, `500ms`, `2m`).
fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    tether_common::duration::parse_duration(text)
}
