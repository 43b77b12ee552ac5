//! Target addresses of OPEN frames: `tcp/host:port`, with IPv6 literals in brackets.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

/// Longest host name accepted (DNS names are at most 253 characters; 255 leaves room for a dot).
pub const MAX_HOST_LEN: usize = 255;
/// Longest encoded target (`tcp/` + host + `:` + port) accepted on the wire.
pub const MAX_TARGET_LEN: usize = 512;

/// Why a target string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    /// The target exceeds [`MAX_TARGET_LEN`] bytes.
    #[error("target longer than {MAX_TARGET_LEN} bytes")]
    TooLong,
    /// The target is not `tcp/...`.
    #[error("unsupported protocol (only tcp/host:port is supported)")]
    UnsupportedProtocol,
    /// Not valid UTF-8.
    #[error("target is not UTF-8")]
    NotUtf8,
    /// No `:port` at the end.
    #[error("missing :port")]
    MissingPort,
    /// The port is not a number in 1..=65535.
    #[error("port must be a number from 1 to 65535")]
    BadPort,
    /// The host part is empty.
    #[error("empty host")]
    EmptyHost,
    /// The host exceeds [`MAX_HOST_LEN`] bytes.
    #[error("host longer than {MAX_HOST_LEN} bytes")]
    HostTooLong,
    /// The host holds a character that is not allowed in a host name (NUL, space, `:`, `/`...).
    #[error("host contains a character that is not allowed in a host name")]
    BadHostChar,
    /// Brackets that do not hold an IPv6 address.
    #[error("bracketed host is not an IPv6 address")]
    BadIpv6,
}

/// The host part of a target: an IP literal or a name resolved by the agent.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    /// An IP literal (`10.0.0.1`, `[::1]`).
    Ip(IpAddr),
    /// A host name, resolved on the agent side. It may still spell an address in a legacy form
    /// (`127.1`); the agent's policy checks the address actually dialed.
    Name(String),
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
            Host::Ip(IpAddr::V4(ip)) => write!(f, "{ip}"),
            Host::Name(name) => f.write_str(name),
        }
    }
}

/// A TCP target: where the far side should connect.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TargetAddr {
    /// Host name or IP literal.
    pub host: Host,
    /// Port, 1..=65535.
    pub port: u16,
}

impl TargetAddr {
    /// A target for a socket address.
    pub fn from_socket_addr(addr: SocketAddr) -> Self {
        Self {
            host: Host::Ip(addr.ip()),
            port: addr.port(),
        }
    }

    /// Parses the wire form `tcp/host:port`.
    pub fn parse_wire(bytes: &[u8]) -> Result<Self, TargetError> {
        if bytes.len() > MAX_TARGET_LEN {
            return Err(TargetError::TooLong);
        }
        let rest = bytes
            .strip_prefix(b"tcp/")
            .ok_or(TargetError::UnsupportedProtocol)?;
        let text = std::str::from_utf8(rest).map_err(|_| TargetError::NotUtf8)?;
        Self::parse_host_port(text)
    }

    /// Parses `host:port` (IPv6 literals in brackets).
    pub fn parse_host_port(text: &str) -> Result<Self, TargetError> {
        if text.len() > MAX_TARGET_LEN {
            return Err(TargetError::TooLong);
        }
        let (host, port) = text.rsplit_once(':').ok_or(TargetError::MissingPort)?;
        let port = parse_port(port)?;
        let host = if let Some(inner) = host.strip_prefix('[') {
            let inner = inner.strip_suffix(']').ok_or(TargetError::BadIpv6)?;
            let ip = Ipv6Addr::from_str(inner).map_err(|_| TargetError::BadIpv6)?;
            Host::Ip(IpAddr::V6(ip))
        } else {
            parse_host(host)?
        };
        Ok(Self { host, port })
    }

    /// Appends the wire form `tcp/host:port`.
    pub fn write_wire(&self, dst: &mut impl bytes::BufMut) {
        dst.put_slice(b"tcp/");
        dst.put_slice(self.to_string().as_bytes());
    }

    /// The length of the wire form.
    pub fn wire_len(&self) -> usize {
        4 + self.to_string().len()
    }
}

impl fmt::Display for TargetAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

impl FromStr for TargetAddr {
    type Err = TargetError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.strip_prefix("tcp/") {
            Some(rest) => Self::parse_host_port(rest),
            None => Self::parse_host_port(s),
        }
    }
}

fn parse_port(text: &str) -> Result<u16, TargetError> {
    // `u16::from_str` accepts a leading '+'; a port is digits only.
    if text.is_empty() || text.len() > 5 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(TargetError::BadPort);
    }
    match text.parse::<u16>() {
        Ok(0) | Err(_) => Err(TargetError::BadPort),
        Ok(port) => Ok(port),
    }
}

fn parse_host(host: &str) -> Result<Host, TargetError> {
    if host.is_empty() {
        return Err(TargetError::EmptyHost);
    }
    if host.len() > MAX_HOST_LEN {
        return Err(TargetError::HostTooLong);
    }
    if !host
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
    {
        return Err(TargetError::BadHostChar);
    }
    // Only the canonical dotted quad becomes an IP here; other numeric spellings stay names and
    // the agent canonicalizes them before its policy check.
    match host.parse::<IpAddr>() {
        Ok(ip) => Ok(Host::Ip(ip)),
        Err(_) => Ok(Host::Name(host.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_names_ipv4_and_bracketed_ipv6() {
        let t = TargetAddr::parse_wire(b"tcp/db.example:5432").unwrap();
        assert_eq!(t.host, Host::Name("db.example".into()));
        assert_eq!(t.port, 5432);
        let t = TargetAddr::parse_wire(b"tcp/10.1.2.3:22").unwrap();
        assert_eq!(t.host, Host::Ip("10.1.2.3".parse().unwrap()));
        let t = TargetAddr::parse_wire(b"tcp/[::1]:443").unwrap();
        assert_eq!(t.host, Host::Ip("::1".parse().unwrap()));
        assert_eq!(t.to_string(), "[::1]:443");
        let t = TargetAddr::parse_wire(b"tcp/[::ffff:127.0.0.1]:80").unwrap();
        assert_eq!(t.host, Host::Ip("::ffff:127.0.0.1".parse().unwrap()));
    }

    #[test]
    fn rejects_bad_targets() {
        let cases: &[(&[u8], TargetError)] = &[
            (b"udp/a:1", TargetError::UnsupportedProtocol),
            (b"a:1", TargetError::UnsupportedProtocol),
            (b"tcp/:80", TargetError::EmptyHost),
            (b"tcp/host", TargetError::MissingPort),
            (b"tcp/host:0", TargetError::BadPort),
            (b"tcp/host:65536", TargetError::BadPort),
            (b"tcp/host:+80", TargetError::BadPort),
            (b"tcp/host:", TargetError::BadPort),
            (b"tcp/host:80:x", TargetError::BadPort),
            (b"tcp/ho\0st:80", TargetError::BadHostChar),
            (b"tcp/ho st:80", TargetError::BadHostChar),
            (b"tcp/a:b:80", TargetError::BadHostChar),
            (b"tcp/::1:80", TargetError::BadHostChar),
            (b"tcp/[::1:80", TargetError::BadIpv6),
            (b"tcp/[10.0.0.1]:80", TargetError::BadIpv6),
            (b"tcp/\xff:80", TargetError::NotUtf8),
        ];
        for (input, want) in cases {
            assert_eq!(
                TargetAddr::parse_wire(input).as_ref(),
                Err(want),
                "input {:?}",
                String::from_utf8_lossy(input)
            );
        }
        let long = format!("tcp/{}:80", "a".repeat(256));
        assert_eq!(
            TargetAddr::parse_wire(long.as_bytes()),
            Err(TargetError::HostTooLong)
        );
        let longer = format!("tcp/{}:80", "a".repeat(600));
        assert_eq!(
            TargetAddr::parse_wire(longer.as_bytes()),
            Err(TargetError::TooLong)
        );
        let ok = format!("tcp/{}:80", "a".repeat(255));
        assert!(TargetAddr::parse_wire(ok.as_bytes()).is_ok());
    }

    #[test]
    fn wire_form_round_trips() {
        for text in ["tcp/a.b:1", "tcp/1.2.3.4:65535", "tcp/[fe80::1]:8080"] {
            let t = TargetAddr::parse_wire(text.as_bytes()).unwrap();
            let mut out = Vec::new();
            t.write_wire(&mut out);
            assert_eq!(out, text.as_bytes());
            assert_eq!(t.wire_len(), text.len());
        }
    }
}
