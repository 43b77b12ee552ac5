//! `peers:` of server.yaml: the peer listener, the member list and this replica's peer
//! certificate, with their validation.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tether_common::config_error::ConfigErrors;
use tether_common::duration::HumanDuration;

use crate::config::fields::{check_readable, parse_socket_addr, positive};

/// Most entries in `peers.members`, and most addresses used per entry.
pub const MAX_MEMBERS: usize = 64;

/// `peers:`: replicas relay dials for agents they hold no session of to a replica that does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeersConfig {
    /// The peer listener, `ip:port`: other replicas open their relay sessions here. Mutual
    /// TLS: this server's `tls.cert`, and a client certificate with a `tether://server/<id>`
    /// URI SAN chaining to `tls.client_ca` (`tether certs issue --server-peer <id>`); an agent
    /// certificate is refused.
    pub listen: String,
    /// Every replica's peer listener, `host:port`; a name with several addresses (a headless
    /// Service) lists several replicas. This replica may be among them. A replica's place in
    /// an agent's ranking is its IP address, so agents must reach the replicas on the same
    /// addresses.
    pub members: Vec<String>,
    /// This replica's peer certificate chain (PEM): URI SAN `tether://server/<server_id>`.
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// The CA bundle the other replicas' server certificates (`tls.cert`) chain to.
    pub server_ca: PathBuf,
    /// The TLS name their certificates must be valid for. Empty: the host of `members[0]`.
    #[serde(default)]
    pub server_name: String,
    /// How often `members` are resolved again. Default: 10s.
    #[serde(default = "default_interval")]
    pub interval: HumanDuration,
    /// Bound on one relay attempt at one replica (the stream open and its answer, which
    /// includes that replica's dial through its agent). Default: 10s.
    #[serde(default = "default_relay_timeout")]
    pub relay_timeout: HumanDuration,
}

fn default_interval() -> HumanDuration {
    HumanDuration::secs(10)
}

fn default_relay_timeout() -> HumanDuration {
    HumanDuration::secs(10)
}

impl PeersConfig {
    /// Makes relative paths absolute against `base_dir`.
    pub fn resolve_paths(&mut self, base_dir: &Path) {
        for path in [&mut self.cert, &mut self.key, &mut self.server_ca] {
            if path.is_relative() {
                *path = base_dir.join(&*path);
            }
        }
    }

    /// Checks the section; every problem with its key path.
    pub fn validate(&self, errors: &mut ConfigErrors) {
        if let Err(message) = parse_socket_addr(&self.listen) {
            errors.push("peers.listen", message);
        }
        if self.members.is_empty() {
            errors.push("peers.members", "must list at least one `host:port`");
        }
        if self.members.len() > MAX_MEMBERS {
            errors.push(
                "peers.members",
                format!("{} entries; at most {MAX_MEMBERS}", self.members.len()),
            );
        }
        for (i, member) in self.members.iter().enumerate() {
            if let Err(message) = split_host_port(member) {
                errors.push(format!("peers.members[{i}]"), message);
            }
        }
        for (key, path) in [
            ("peers.cert", &self.cert),
            ("peers.key", &self.key),
            ("peers.server_ca", &self.server_ca),
        ] {
            if let Err(message) = check_readable(path) {
                errors.push(key, message);
            }
        }
        positive(errors, "peers.interval", self.interval);
        positive(errors, "peers.relay_timeout", self.relay_timeout);
    }

    /// The TLS name to verify on the other replicas' certificates.
    pub fn tls_name(&self) -> String {
        if !self.server_name.is_empty() {
            return self.server_name.clone();
        }
        self.members
            .first()
            .and_then(|m| split_host_port(m).ok())
            .map(|(host, _)| host.to_owned())
            .unwrap_or_default()
    }
}

/// `host:port` (`[v6]:port` for IPv6 literals) split, with a message naming what is wrong.
pub(crate) fn split_host_port(text: &str) -> Result<(&str, u16), String> {
    let bad = || format!("`{text}` is not `host:port` (e.g. tether-peers:8444 or 10.0.0.5:8444)");
    let (host, port) = text.rsplit_once(':').ok_or_else(bad)?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let port: u16 = port.parse().map_err(|_| bad())?;
    if host.is_empty() || port == 0 || host.contains(':') && !text.starts_with('[') {
        return Err(bad());
    }
    Ok((host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_are_host_port() {
        assert_eq!(split_host_port("peers:8444"), Ok(("peers", 8444)));
        assert_eq!(split_host_port("[::1]:8444"), Ok(("::1", 8444)));
        for bad in ["peers", "peers:", ":1", "a:0", "::1:8444", "a:x"] {
            assert!(split_host_port(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn every_problem_is_named_by_its_key() {
        let config = PeersConfig {
            listen: "nope".into(),
            members: vec!["x".into()],
            cert: "/nonexistent/c".into(),
            key: "/nonexistent/k".into(),
            server_ca: "/nonexistent/ca".into(),
            server_name: String::new(),
            interval: default_interval(),
            relay_timeout: HumanDuration::secs(0),
        };
        let mut errors = ConfigErrors::new();
        config.validate(&mut errors);
        let keys: Vec<&str> = errors.0.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            keys,
            [
                "peers.listen",
                "peers.members[0]",
                "peers.cert",
                "peers.key",
                "peers.server_ca",
                "peers.relay_timeout"
            ]
        );
        assert_eq!(config.tls_name(), "");
    }
}
