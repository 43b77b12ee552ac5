//! The agent's deny-by-default dial policy: `policy:` config types, compilation and address checks.
//!
//! A request is allowed when some rule matches the port and either a CIDR of the rule contains the
//! resolved (canonical) IP, or the requested name matches a host pattern of the rule and the
//! resolved IP is not sensitive. Sensitive addresses (loopback, unspecified, link-local, cloud
//! metadata, multicast, broadcast) are reachable only through a CIDR rule whose network lies
//! entirely inside a sensitive range, never through `0.0.0.0/0`, `::/0` or a host name rule.

mod embedded;
mod literal;

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::{Deserialize, Deserializer, Serialize};

pub use literal::{canonical_ip, is_valid_hostname, matches_pattern, parse_ip_literal};

/// `policy:` in agent.yaml.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Allow rules; an empty list denies everything.
    #[serde(default)]
    pub allow: Vec<RuleConfig>,
}

/// One allow rule: `hosts` and/or `cidrs`, optionally restricted to `ports`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// Host name patterns: an exact name or `*.suffix`, case-insensitive.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Networks such as `10.0.0.0/8` or `fd00::/8`; a bare address means a single host.
    #[serde(default)]
    pub cidrs: Vec<String>,
    /// Ports (`"443"`) and inclusive ranges (`"8000-8100"`); empty means any port.
    #[serde(default, deserialize_with = "de_ports")]
    pub ports: Vec<String>,
}

/// Accepts YAML ports written as strings or as integers (`ports: [443, "8000-8100"]`).
fn de_ports<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum PortItem {
        Num(i64),
        Str(String),
    }
    let items = Vec::<PortItem>::deserialize(deserializer)?;
    Ok(items
        .into_iter()
        .map(|item| match item {
            PortItem::Num(n) => n.to_string(),
            PortItem::Str(s) => s,
        })
        .collect())
}

/// One invalid value in a `policy:` section, with its key path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct PolicyConfigError {
    /// Key path such as `policy.allow[1].cidrs[0]`.
    pub path: String,
    /// What is wrong with the value there.
    pub message: String,
}

/// A target as requested by the server: an IP literal or a domain name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    /// An IP address.
    Ip(IpAddr),
    /// A domain name (to be resolved).
    Name(String),
}

impl Host {
    /// Classifies a target string: anything [`parse_ip_literal`] accepts (including legacy IPv4
    /// spellings such as `127.1` and bracketed IPv6) is an IP, canonicalized; the rest is a name.
    pub fn parse(s: &str) -> Host {
        match parse_ip_literal(s) {
            Some(ip) => Host::Ip(ip),
            None => Host::Name(s.to_owned()),
        }
    }

    /// The same host with IP literals canonicalized, including a `Name` that is an IP literal.
    pub fn canonical(&self) -> Host {
        match self {
            Host::Ip(ip) => Host::Ip(canonical_ip(*ip)),
            Host::Name(name) => Host::parse(name),
        }
    }
}

impl From<IpAddr> for Host {
    fn from(ip: IpAddr) -> Self {
        Host::Ip(ip)
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Ip(IpAddr::V6(v6)) => write!(f, "[{v6}]"),
            Host::Ip(IpAddr::V4(v4)) => write!(f, "{v4}"),
            // Names can come from the peer; escape anything unusual so logs stay one line.
            Host::Name(name) => write!(f, "{}", name.escape_debug()),
        }
    }
}

/// Why a dial was refused. The set is closed; see [`Denial::reason`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DenialReason {
    /// No rule covers the address (or name).
    NoRule,
    /// The address is sensitive and only a broad rule or a host name rule covered it.
    SensitiveAddress,
    /// A rule covers the address but not the port.
    Port,
}

impl DenialReason {
    /// `"no_rule"`, `"sensitive_address"` or `"port"`.
    pub fn as_str(self) -> &'static str {
        match self {
            DenialReason::NoRule => "no_rule",
            DenialReason::SensitiveAddress => "sensitive_address",
            DenialReason::Port => "port",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            DenialReason::NoRule => "no allow rule matches",
            DenialReason::SensitiveAddress => {
                "loopback, link-local, metadata, multicast and unspecified addresses need an explicit CIDR rule"
            }
            DenialReason::Port => "port not allowed for this address",
        }
    }
}

/// A dial refused by the policy. Display names only the address and port, so it is safe to log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("dial to {} denied by policy: {}", SocketAddr::new(self.addr, self.port), self.reason.describe())]
pub struct Denial {
    reason: DenialReason,
    addr: IpAddr,
    port: u16,
}

impl Denial {
    /// `"no_rule"`, `"sensitive_address"` or `"port"`.
    pub fn reason(&self) -> &'static str {
        self.reason.as_str()
    }

    /// The reason as an enum.
    pub fn kind(&self) -> DenialReason {
        self.reason
    }

    /// The canonical address that was refused.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The port that was refused.
    pub fn port(&self) -> u16 {
        self.port
    }
}

/// Sensitive ranges: reachable only through a CIDR rule lying entirely inside one of them.
const SENSITIVE: [IpNet; 11] = [
    IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::new(0, 0, 0, 0), 8)), // "this network", unspecified
    IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::new(127, 0, 0, 0), 8)), // loopback
    IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::new(169, 254, 0, 0), 16)), // link-local, metadata
    IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::new(100, 100, 100, 200), 32)), // Alibaba metadata
    IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::new(224, 0, 0, 0), 4)), // multicast
    IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::new(255, 255, 255, 255), 32)), // broadcast
    IpNet::V6(Ipv6Net::new_assert(Ipv6Addr::UNSPECIFIED, 128)),
    IpNet::V6(Ipv6Net::new_assert(Ipv6Addr::LOCALHOST, 128)),
    IpNet::V6(Ipv6Net::new_assert(
        Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0),
        10,
    )), // link-local
    IpNet::V6(Ipv6Net::new_assert(
        Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254),
        128,
    )), // AWS metadata
    IpNet::V6(Ipv6Net::new_assert(
        Ipv6Addr::new(0xff00, 0, 0, 0, 0, 0, 0, 0),
        8,
    )), // multicast
];

/// Whether the canonical form of `ip` is loopback, unspecified, link-local, cloud metadata,
/// multicast or broadcast, or an IPv6 address that embeds such an IPv4 address (NAT64, 6to4,
/// Teredo, ISATAP: `embedded.rs`).
pub fn is_sensitive(ip: IpAddr) -> bool {
    let ip = canonical_ip(ip);
    let direct = SENSITIVE.iter().any(|net| net.contains(&ip));
    direct
        || match ip {
            IpAddr::V4(_) => false,
            IpAddr::V6(v6) => embedded::embedded_ipv4(v6)
                .into_iter()
                .any(|v4| SENSITIVE.iter().any(|net| net.contains(&IpAddr::V4(v4)))),
        }
}

fn net_inside_sensitive(net: &IpNet) -> bool {
    SENSITIVE.iter().any(|s| s.contains(net))
}

/// A compiled, immutable policy. [`Policy::default`] denies everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    rules: Vec<Rule>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    hosts: Vec<HostPattern>,
    cidrs: Vec<Cidr>,
    /// Empty means any port (1-65535).
    ports: Vec<(u16, u16)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostPattern {
    /// Normalized exact name.
    Exact(String),
    /// Normalized suffix after `*.`.
    Wildcard(String),
}

impl HostPattern {
    fn matches(&self, normalized_name: &str) -> bool {
        match self {
            HostPattern::Exact(exact) => exact == normalized_name,
            HostPattern::Wildcard(suffix) => normalized_name
                .strip_suffix(suffix.as_str())
                .and_then(|head| head.strip_suffix('.'))
                .is_some_and(|head| !head.is_empty()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Cidr {
    net: IpNet,
    /// The network lies entirely inside a sensitive range, so it may reach sensitive addresses.
    explicit_sensitive: bool,
}

/// How one rule relates to an address, ignoring the port.
#[derive(Clone, Copy, PartialEq, Eq)]
enum AddrMatch {
    None,
    /// Covered, but the address is sensitive and the rule is not explicit enough.
    Sensitive,
    Allowed,
}

impl Rule {
    fn addr_match(&self, name: Option<&str>, ip: IpAddr, sensitive: bool) -> AddrMatch {
        let mut result = AddrMatch::None;
        for cidr in self.cidrs.iter().filter(|c| c.net.contains(&ip)) {
            if !sensitive || cidr.explicit_sensitive {
                return AddrMatch::Allowed;
            }
            result = AddrMatch::Sensitive;
        }
        if name.is_some_and(|name| self.hosts.iter().any(|p| p.matches(name))) {
            if !sensitive {
                return AddrMatch::Allowed;
            }
            result = AddrMatch::Sensitive;
        }
        result
    }

    fn port_match(&self, port: u16) -> bool {
        port != 0
            && (self.ports.is_empty()
                || self
                    .ports
                    .iter()
                    .any(|(lo, hi)| (*lo..=*hi).contains(&port)))
    }
}

impl Policy {
    /// Whether the policy has no rules (and so denies everything).
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Checks one resolved address for a requested host and port.
    ///
    /// `resolved` is canonicalized first (`::ffff:127.0.0.1` is `127.0.0.1`). Host patterns are
    /// consulted only when `requested_host` is a valid host name; a `Name` that is an IP literal
    /// (`"127.1"`) counts as that IP. Port 0 is never allowed.
    pub fn check(&self, requested_host: &Host, port: u16, resolved: IpAddr) -> Result<(), Denial> {
        let ip = canonical_ip(resolved);
        let sensitive = is_sensitive(ip);
        let name = match requested_host {
            Host::Name(name) if is_valid_hostname(name) => Some(literal::normalize_name(name)),
            _ => None,
        };
        let mut port_denied = false;
        let mut sensitive_denied = false;
        for rule in &self.rules {
            match rule.addr_match(name.as_deref(), ip, sensitive) {
                AddrMatch::Allowed if rule.port_match(port) => return Ok(()),
                AddrMatch::Allowed => port_denied = true,
                AddrMatch::Sensitive => sensitive_denied = true,
                AddrMatch::None => {}
            }
        }
        let reason = if port_denied {
            DenialReason::Port
        } else if sensitive_denied {
            DenialReason::SensitiveAddress
        } else {
            DenialReason::NoRule
        };
        Err(Denial {
            reason,
            addr: ip,
            port,
        })
    }
}

impl PolicyConfig {
    /// Validates and compiles the rules, reporting every invalid value with its key path.
    pub fn compile(&self) -> Result<Policy, Vec<PolicyConfigError>> {
        let mut errors = Vec::new();
        let mut rules = Vec::with_capacity(self.allow.len());
        for (i, rule) in self.allow.iter().enumerate() {
            let path = format!("policy.allow[{i}]");
            if let Some(rule) = compile_rule(rule, &path, &mut errors) {
                rules.push(rule);
            }
        }
        if errors.is_empty() {
            Ok(Policy { rules })
        } else {
            Err(errors)
        }
    }
}

fn compile_rule(
    rule: &RuleConfig,
    path: &str,
    errors: &mut Vec<PolicyConfigError>,
) -> Option<Rule> {
    let before = errors.len();
    let mut push = |path: String, message: String| errors.push(PolicyConfigError { path, message });
    if rule.hosts.is_empty() && rule.cidrs.is_empty() {
        push(
            path.to_owned(),
            r#"a rule needs "hosts" or "cidrs""#.to_owned(),
        );
    }
    let mut hosts = Vec::with_capacity(rule.hosts.len());
    for (j, pattern) in rule.hosts.iter().enumerate() {
        match compile_pattern(pattern) {
            Ok(p) => hosts.push(p),
            Err(message) => push(format!("{path}.hosts[{j}]"), message),
        }
    }
    let mut cidrs = Vec::with_capacity(rule.cidrs.len());
    for (j, cidr) in rule.cidrs.iter().enumerate() {
        match compile_cidr(cidr) {
            Ok(c) => cidrs.push(c),
            Err(message) => push(format!("{path}.cidrs[{j}]"), message),
        }
    }
    let mut ports = Vec::with_capacity(rule.ports.len());
    for (j, spec) in rule.ports.iter().enumerate() {
        match compile_ports(spec) {
            Ok(range) => ports.push(range),
            Err(message) => push(format!("{path}.ports[{j}]"), message),
        }
    }
    (errors.len() == before).then_some(Rule {
        hosts,
        cidrs,
        ports,
    })
}

fn compile_pattern(pattern: &str) -> Result<HostPattern, String> {
    if parse_ip_literal(pattern).is_some() {
        return Err(format!(
            r#"{pattern:?} is an IP address; list addresses under "cidrs""#
        ));
    }
    let invalid =
        || format!(r#"{pattern:?} is not a host name pattern (an exact name or "*.suffix")"#);
    match pattern.strip_prefix("*.") {
        Some(suffix) if is_valid_hostname(suffix) => {
            Ok(HostPattern::Wildcard(literal::normalize_name(suffix)))
        }
        Some(_) => Err(invalid()),
        None if is_valid_hostname(pattern) => {
            Ok(HostPattern::Exact(literal::normalize_name(pattern)))
        }
        None => Err(invalid()),
    }
}

fn compile_cidr(text: &str) -> Result<Cidr, String> {
    let net = match text.parse::<IpNet>() {
        Ok(net) => {
            let trunc = net.trunc();
            if trunc != net {
                return Err(format!(
                    "{text:?} has host bits set; the network is {trunc}"
                ));
            }
            net
        }
        Err(_) => match text.parse::<IpAddr>() {
            Ok(ip) => IpNet::from(ip),
            Err(_) => return Err(format!("{text:?} is not a CIDR")),
        },
    };
    let net = canonical_net(net);
    Ok(Cidr {
        net,
        explicit_sensitive: net_inside_sensitive(&net),
    })
}

/// An IPv6 network inside `::ffff:0:0/96` becomes the IPv4 network it maps, since addresses are
/// canonicalized to IPv4 before matching.
fn canonical_net(net: IpNet) -> IpNet {
    let IpNet::V6(v6) = net else {
        return net;
    };
    let mapped = v6
        .network()
        .to_ipv4_mapped()
        .filter(|_| v6.prefix_len() >= 96)
        .and_then(|v4| Ipv4Net::new(v4, v6.prefix_len() - 96).ok());
    mapped.map_or(net, IpNet::V4)
}

fn compile_ports(spec: &str) -> Result<(u16, u16), String> {
    let parse = |s: &str| -> Option<u16> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        s.parse::<u16>().ok().filter(|p| *p != 0)
    };
    let not_port =
        || format!("{spec:?} is not a port or port range (1-65535, e.g. \"443\" or \"8000-8100\")");
    let trimmed = spec.trim();
    match trimmed.split_once('-') {
        Some((lo, hi)) => {
            let (lo, hi) = (
                parse(lo.trim()).ok_or_else(not_port)?,
                parse(hi.trim()).ok_or_else(not_port)?,
            );
            if lo > hi {
                return Err(format!("{spec:?} is an empty range ({lo} > {hi})"));
            }
            Ok((lo, hi))
        }
        None => parse(trimmed).map(|p| (p, p)).ok_or_else(not_port),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(hosts: &[&str], cidrs: &[&str], ports: &[&str]) -> RuleConfig {
        let owned = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
        RuleConfig {
            hosts: owned(hosts),
            cidrs: owned(cidrs),
            ports: owned(ports),
        }
    }

    fn policy(rules: Vec<RuleConfig>) -> Policy {
        PolicyConfig { allow: rules }
            .compile()
            .expect("valid policy")
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// Every loopback / metadata / link-local / unspecified spelling from RELIABILITY.md, with the
    /// canonical address it denotes.
    const SSRF_FORMS: &[(&str, &str)] = &[
        ("127.0.0.1", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("2130706433", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("127.0.0.1.", "127.0.0.1"),
        ("127.255.255.254", "127.255.255.254"),
        ("[::1]", "::1"),
        ("::1", "::1"),
        ("[::ffff:127.0.0.1]", "127.0.0.1"),
        ("::ffff:127.0.0.1", "127.0.0.1"),
        ("::127.0.0.1", "127.0.0.1"),
        ("0.0.0.0", "0.0.0.0"),
        ("0", "0.0.0.0"),
        ("[::]", "::"),
        ("169.254.169.254", "169.254.169.254"),
        ("0xa9fea9fe", "169.254.169.254"),
        ("0251.0376.0251.0376", "169.254.169.254"),
        ("[::ffff:169.254.169.254]", "169.254.169.254"),
        ("[fd00:ec2::254]", "fd00:ec2::254"),
        ("100.100.100.200", "100.100.100.200"),
        ("169.254.1.1", "169.254.1.1"),
        ("[fe80::1]", "fe80::1"),
        ("fe80::1%eth0", "fe80::1"),
        ("[febf::1]", "febf::1"),
        ("224.0.0.1", "224.0.0.1"),
        ("[ff02::1]", "ff02::1"),
        ("255.255.255.255", "255.255.255.255"),
    ];

    fn permissive() -> Policy {
        policy(vec![rule(&[], &["0.0.0.0/0", "::/0"], &[])])
    }

    #[test]
    fn ssrf_forms_are_ip_literals_of_sensitive_addresses() {
        for (form, canonical) in SSRF_FORMS {
            assert_eq!(Host::parse(form), Host::Ip(ip(canonical)), "{form}");
            assert!(is_sensitive(ip(canonical)), "{form}");
        }
    }

    #[test]
    fn ssrf_forms_denied_under_permissive_cidr_rule() {
        let p = permissive();
        for (form, _) in SSRF_FORMS {
            let host = Host::parse(form);
            let Host::Ip(addr) = host else {
                panic!("{form} not an IP literal")
            };
            let denial = p.check(&host, 80, addr).expect_err(form);
            assert_eq!(denial.reason(), "sensitive_address", "{form}");
            // A Name that is really a literal must not escape the IP treatment either.
            let as_name = Host::Name((*form).to_owned());
            let denial = p.check(&as_name, 80, addr).expect_err(form);
            assert_eq!(denial.reason(), "sensitive_address", "{form} as name");
        }
        // Ordinary addresses are allowed, including through the mapped form.
        assert!(
            p.check(&Host::Ip(ip("10.1.2.3")), 80, ip("10.1.2.3"))
                .is_ok()
        );
        assert!(
            p.check(&Host::Ip(ip("2001:db8::1")), 80, ip("2001:db8::1"))
                .is_ok()
        );
        assert!(
            p.check(&Host::parse("::ffff:10.1.2.3"), 80, ip("::ffff:10.1.2.3"))
                .is_ok()
        );
        // Not in the sensitive set: private and CGNAT ranges outside 100.100.100.200.
        assert!(
            p.check(&Host::Ip(ip("100.100.100.201")), 80, ip("100.100.100.201"))
                .is_ok()
        );
    }

    #[test]
    fn ipv6_forms_embedding_sensitive_ipv4_are_denied_under_permissive_rules() {
        let p = permissive();
        for form in [
            "64:ff9b::7f00:1", // NAT64 of 127.0.0.1
            "64:ff9b::169.254.169.254",
            "64:ff9b:1::a9fe:a9fe", // local-use NAT64, /96 layout
            "2002:7f00:1::",        // 6to4 of 127.0.0.1
            "2002:a9fe:a9fe::1",    // 6to4 of the metadata address
            "2001:0:7f00:1::",      // Teredo server 127.0.0.1
            "fe80::5efe:127.0.0.1", // ISATAP (link-local anyway)
            "2001:db8::5efe:a9fe:a9fe",
            "::ffff:127.0.0.1",  // mapped
            "::169.254.169.254", // compatible
        ] {
            let host = Host::parse(form);
            let Host::Ip(addr) = host else {
                panic!("{form} not an IP literal")
            };
            let denial = p.check(&host, 80, addr).expect_err(form);
            assert_eq!(denial.reason(), "sensitive_address", "{form}");
        }
        for ordinary in ["64:ff9b::a01:203", "2002:a01:203::1", "2001:db8::1"] {
            assert!(
                p.check(&Host::parse(ordinary), 80, ip(ordinary)).is_ok(),
                "{ordinary}"
            );
        }
    }

    #[test]
    fn ssrf_forms_denied_under_hostname_rule() {
        let p = policy(vec![rule(
            &["*.example", "db.example", "localhost"],
            &[],
            &[],
        )]);
        for (form, canonical) in SSRF_FORMS {
            let host = Host::parse(form);
            assert_eq!(
                p.check(&host, 80, ip(canonical)).unwrap_err().reason(),
                "no_rule",
                "{form}"
            );
            // A matching name that resolves to the sensitive address is still denied.
            for name in ["evil.example", "DB.example.", "localhost"] {
                let denial = p
                    .check(&Host::Name(name.to_owned()), 80, ip(canonical))
                    .expect_err(name);
                assert_eq!(denial.reason(), "sensitive_address", "{name} -> {form}");
                assert_eq!(denial.addr(), ip(canonical));
            }
        }
        assert!(
            p.check(&Host::Name("evil.example".into()), 80, ip("10.0.0.7"))
                .is_ok()
        );
        assert_eq!(
            p.check(&Host::Name("other.test".into()), 80, ip("10.0.0.7"))
                .unwrap_err()
                .reason(),
            "no_rule"
        );
        // An IP host never matches a name pattern.
        assert_eq!(
            p.check(&Host::Ip(ip("10.0.0.7")), 80, ip("10.0.0.7"))
                .unwrap_err()
                .reason(),
            "no_rule"
        );
    }

    #[test]
    fn explicit_sensitive_cidrs_allow_only_their_range() {
        let p = policy(vec![rule(&[], &["127.0.0.0/8"], &[])]);
        for (form, canonical) in SSRF_FORMS {
            let host = Host::parse(form);
            let result = p.check(&host, 80, ip(canonical));
            let is_v4_loopback = ip(canonical).to_string().starts_with("127.");
            assert_eq!(result.is_ok(), is_v4_loopback, "{form}: {result:?}");
        }
        // Mapped form of an allowed address is allowed; ::1 needs its own rule.
        assert!(
            p.check(&Host::parse("::ffff:127.0.0.1"), 80, ip("::ffff:127.0.0.1"))
                .is_ok()
        );
        assert!(p.check(&Host::parse("::1"), 80, ip("::1")).is_err());

        let p = policy(vec![rule(
            &[],
            &[
                "169.254.169.254/32",
                "::1",
                "fe80::/10",
                "::ffff:127.0.0.1/128",
            ],
            &[],
        )]);
        assert!(
            p.check(&Host::parse("0xa9fea9fe"), 80, ip("169.254.169.254"))
                .is_ok()
        );
        assert_eq!(
            p.check(&Host::parse("169.254.1.1"), 80, ip("169.254.1.1"))
                .unwrap_err()
                .reason(),
            "no_rule"
        );
        assert!(p.check(&Host::parse("[::1]"), 80, ip("::1")).is_ok());
        assert!(
            p.check(&Host::parse("fe80::1%eth0"), 80, ip("fe80::1"))
                .is_ok()
        );
        assert!(p.check(&Host::parse("127.1"), 80, ip("127.0.0.1")).is_ok());
        assert!(
            p.check(&Host::parse("127.0.0.2"), 80, ip("127.0.0.2"))
                .is_err()
        );

        // A range that only partly overlaps a sensitive range does not count as explicit.
        let p = policy(vec![rule(&[], &["126.0.0.0/7", "0.0.0.0/1"], &[])]);
        assert_eq!(
            p.check(&Host::parse("127.0.0.1"), 80, ip("127.0.0.1"))
                .unwrap_err()
                .reason(),
            "sensitive_address"
        );
        assert!(
            p.check(&Host::parse("126.0.0.1"), 80, ip("126.0.0.1"))
                .is_ok()
        );
    }

    #[test]
    fn resolved_address_decides_not_the_name() {
        let p = policy(vec![
            rule(&[], &["10.0.0.0/8"], &["22"]),
            rule(&["db.example"], &[], &["5432"]),
        ]);
        let db = Host::Name("db.example".into());
        assert!(p.check(&db, 5432, ip("192.0.2.10")).is_ok());
        assert!(
            p.check(&db, 22, ip("10.9.9.9")).is_ok(),
            "CIDR rule applies to names too"
        );
        assert_eq!(
            p.check(&db, 5432, ip("::ffff:127.0.0.1"))
                .unwrap_err()
                .reason(),
            "sensitive_address"
        );
        assert_eq!(
            p.check(&db, 5432, ip("198.51.100.1"))
                .map_err(|d| d.reason()),
            Ok(())
        );
        assert_eq!(
            p.check(&Host::Name("www.example".into()), 5432, ip("198.51.100.1"))
                .unwrap_err()
                .reason(),
            "no_rule"
        );
    }

    #[test]
    fn port_lists_and_ranges() {
        let p = policy(vec![
            rule(&["*.internal.example"], &[], &["443", "8000-8100"]),
            rule(&[], &["10.0.0.0/8", "fd00::/8"], &["22"]),
            rule(&[], &["192.0.2.0/24"], &[]),
        ]);
        let web = Host::Name("api.internal.example".into());
        let addr = ip("198.51.100.7");
        for port in [443, 8000, 8050, 8100] {
            assert!(p.check(&web, port, addr).is_ok(), "{port}");
        }
        for port in [0, 80, 442, 444, 7999, 8101, 65535] {
            assert_eq!(
                p.check(&web, port, addr).unwrap_err().reason(),
                "port",
                "{port}"
            );
        }
        let ssh = Host::Ip(ip("fd12::1"));
        assert!(p.check(&ssh, 22, ip("fd12::1")).is_ok());
        let denial = p.check(&ssh, 23, ip("fd12::1")).unwrap_err();
        assert_eq!((denial.reason(), denial.port()), ("port", 23));
        assert!(
            p.check(&Host::Ip(ip("10.1.1.1")), 22, ip("10.1.1.1"))
                .is_ok()
        );
        // Omitted ports means any port except 0.
        for port in [1, 80, 65535] {
            assert!(
                p.check(&Host::Ip(ip("192.0.2.1")), port, ip("192.0.2.1"))
                    .is_ok()
            );
        }
        assert_eq!(
            p.check(&Host::Ip(ip("192.0.2.1")), 0, ip("192.0.2.1"))
                .unwrap_err()
                .reason(),
            "port"
        );
    }

    #[test]
    fn deny_by_default() {
        let p = Policy::default();
        assert!(p.is_empty());
        let denial = p
            .check(&Host::Ip(ip("10.0.0.1")), 80, ip("10.0.0.1"))
            .unwrap_err();
        assert_eq!(denial.reason(), "no_rule");
        let p = PolicyConfig::default().compile().unwrap();
        assert!(
            p.check(&Host::Name("a.example".into()), 80, ip("10.0.0.1"))
                .is_err()
        );
    }

    #[test]
    fn denial_display_names_address_and_port_only() {
        let p = permissive();
        let d = p
            .check(
                &Host::Name("evil\n.example".into()),
                8080,
                ip("::ffff:127.0.0.1"),
            )
            .unwrap_err();
        assert_eq!(
            d.to_string(),
            "dial to 127.0.0.1:8080 denied by policy: loopback, link-local, metadata, multicast and unspecified addresses need an explicit CIDR rule"
        );
        let d = Policy::default()
            .check(&Host::Ip(ip("fe80::1")), 22, ip("fe80::1"))
            .unwrap_err();
        assert_eq!(
            d.to_string(),
            "dial to [fe80::1]:22 denied by policy: no allow rule matches"
        );
        assert_eq!(Host::Name("a\nb".into()).to_string(), "a\\nb");
    }

    #[test]
    fn config_errors_are_collected_with_paths() {
        let cfg = PolicyConfig {
            allow: vec![
                rule(&["ok.example"], &["10.0.0.0/8"], &["443"]),
                rule(
                    &["*", "a.*.b", "127.0.0.1"],
                    &["10.0.0.0/33", "nope", "10.0.0.1/8"],
                    &[],
                ),
                rule(&[], &[], &["0", "65536", "9000-8000", "1-", "x", "22"]),
            ],
        };
        let errors = cfg.compile().unwrap_err();
        let rendered: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(
            rendered,
            [
                r#"policy.allow[1].hosts[0]: "*" is not a host name pattern (an exact name or "*.suffix")"#,
                r#"policy.allow[1].hosts[1]: "a.*.b" is not a host name pattern (an exact name or "*.suffix")"#,
                r#"policy.allow[1].hosts[2]: "127.0.0.1" is an IP address; list addresses under "cidrs""#,
                r#"policy.allow[1].cidrs[0]: "10.0.0.0/33" is not a CIDR"#,
                r#"policy.allow[1].cidrs[1]: "nope" is not a CIDR"#,
                r#"policy.allow[1].cidrs[2]: "10.0.0.1/8" has host bits set; the network is 10.0.0.0/8"#,
                r#"policy.allow[2]: a rule needs "hosts" or "cidrs""#,
                r#"policy.allow[2].ports[0]: "0" is not a port or port range (1-65535, e.g. "443" or "8000-8100")"#,
                r#"policy.allow[2].ports[1]: "65536" is not a port or port range (1-65535, e.g. "443" or "8000-8100")"#,
                r#"policy.allow[2].ports[2]: "9000-8000" is an empty range (9000 > 8000)"#,
                r#"policy.allow[2].ports[3]: "1-" is not a port or port range (1-65535, e.g. "443" or "8000-8100")"#,
                r#"policy.allow[2].ports[4]: "x" is not a port or port range (1-65535, e.g. "443" or "8000-8100")"#,
            ]
        );
        assert_eq!(errors[3].path, "policy.allow[1].cidrs[0]");
    }

    #[test]
    fn yaml_shape_and_unknown_fields() {
        let yaml = r#"
allow:
  - hosts: ["*.internal.example", "db.example"]
    ports: ["443", "8000-8100", 22]
  - cidrs: ["10.0.0.0/8", "fd00::/8"]
    ports: ["22"]
"#;
        let cfg: PolicyConfig = serde_yaml_ng::from_str(yaml).unwrap();
        assert_eq!(cfg.allow[0].ports, ["443", "8000-8100", "22"]);
        assert!(cfg.allow[1].hosts.is_empty());
        let p = cfg.compile().unwrap();
        assert!(
            p.check(
                &Host::Name("x.internal.example".into()),
                22,
                ip("192.0.2.1")
            )
            .is_ok()
        );
        assert!(p.check(&Host::Ip(ip("fd00::5")), 22, ip("fd00::5")).is_ok());

        let err = serde_yaml_ng::from_str::<PolicyConfig>("allow:\n  - cidr: [\"10.0.0.0/8\"]\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `cidr`"), "{err}");
        let err = serde_yaml_ng::from_str::<PolicyConfig>("deny: []\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `deny`"), "{err}");
    }

    #[test]
    fn mapped_cidrs_match_canonical_addresses() {
        let p = policy(vec![rule(&[], &["::ffff:10.0.0.0/104"], &[])]);
        assert!(
            p.check(&Host::Ip(ip("10.2.3.4")), 80, ip("10.2.3.4"))
                .is_ok()
        );
        assert!(
            p.check(&Host::Ip(ip("11.2.3.4")), 80, ip("11.2.3.4"))
                .is_err()
        );
        // ::/0 covers IPv6 only; mapped IPv4 is judged as IPv4.
        let p = policy(vec![rule(&[], &["::/0"], &[])]);
        assert!(
            p.check(&Host::Ip(ip("10.2.3.4")), 80, ip("::ffff:10.2.3.4"))
                .is_err()
        );
    }
}
