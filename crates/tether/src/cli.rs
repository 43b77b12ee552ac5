//! Command-line flags of the `tether` binary (clap).

use std::net::IpAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// tether: a reverse tunnel over mutually authenticated TLS WebSockets.
#[derive(Debug, Parser)]
#[command(name = "tether", version, about, propagate_version = true)]
pub(crate) struct Cli {
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `tether_server=debug`; beats the
    /// config's `log` key. Default: the config's `log`, else `info`.
    #[arg(long, global = true, env = "TETHER_LOG")]
    pub(crate) log: Option<String>,
    /// Log format.
    #[arg(long, global = true, env = "TETHER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub(crate) log_format: LogFormat,
    #[command(subcommand)]
    pub(crate) command: Command,
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
    /// Show the clients and sessions of a running server (its `GET /v1/clients`).
    Status {
        /// The server's admin listener (`admin_listen`), as `http://host:port`.
        #[arg(long, env = "TETHER_ADMIN", default_value = "http://127.0.0.1:9090")]
        admin: String,
        /// Print the raw JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Give up when the server has not answered within this many seconds.
        #[arg(long, default_value_t = 5)]
        timeout_secs: u64,
    },
    /// Run a throwaway CA, a server, an agent and a target on loopback, and send traffic.
    Demo {
        /// Exit after the traffic check: 0 only if the data came back byte-exact.
        #[arg(long)]
        once: bool,
        /// Bytes to send through the tunnel.
        #[arg(long, default_value_t = 8 * 1024 * 1024)]
        bytes: usize,
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
        /// DNS names for the server certificate (repeatable).
        #[arg(long = "dns", default_values_t = vec!["localhost".to_string()])]
        dns: Vec<String>,
        /// IP addresses for the server certificate (repeatable).
        #[arg(long = "ip", default_values_t = vec![IpAddr::from([127, 0, 0, 1])])]
        ip: Vec<IpAddr>,
        /// Validity of the server certificate (`90d`, `12h`); one year when omitted.
        #[arg(long, value_name = "DURATION")]
        valid_for: Option<String>,
    },
    /// Issue an agent certificate (URI SAN `tether://agent/<ID>`) with the CA in a directory.
    Issue {
        /// Directory holding `ca.pem` and `ca-key.pem`.
        #[arg(long)]
        dir: PathBuf,
        /// The agent id (letters, digits, `.`, `_`, `-`).
        #[arg(long)]
        agent: String,
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
    Revoke {
        /// Directory holding `ca.pem` and `ca-key.pem`.
        #[arg(long)]
        dir: PathBuf,
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
