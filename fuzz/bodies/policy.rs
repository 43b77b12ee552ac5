//! The body of fuzz target `fuzz_policy` (see fuzz/README.md), shared by path with the stable
//! test `crates/tether-agent/tests/fuzz_policy_body.rs`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use tether_agent::policy::{
    Host, PolicyConfig, RuleConfig, canonical_ip, is_sensitive, is_valid_hostname, matches_pattern,
    parse_ip_literal,
};

/// A parsed literal is canonical, and its printed form parses back to it.
fn check_literal(s: &str) {
    let Some(ip) = parse_ip_literal(s) else {
        return;
    };
    assert_eq!(canonical_ip(ip), ip, "{s:?} parsed to a non-canonical {ip}");
    let printed = Host::Ip(ip).to_string();
    assert_eq!(parse_ip_literal(&printed), Some(ip), "{s:?} -> {printed}");
    assert_eq!(Host::parse(s), Host::Ip(ip));
    assert_eq!(Host::Name(s.to_owned()).canonical(), Host::Ip(ip));
}

/// Sensitivity does not depend on the spelling: the mapped and compatible IPv6 forms of an IPv4
/// address are classified as that address.
fn check_sensitivity(ip: IpAddr) {
    let sensitive = is_sensitive(ip);
    assert_eq!(is_sensitive(canonical_ip(ip)), sensitive, "{ip}");
    if let IpAddr::V4(v4) = ip {
        assert_eq!(
            is_sensitive(IpAddr::V6(v4.to_ipv6_mapped())),
            sensitive,
            "mapped {v4}"
        );
    }
}

/// Rules from the input's lines: `h <pattern>`, `c <cidr>`, `p <port>`; `-` starts a new rule.
fn rules(lines: &[&str]) -> PolicyConfig {
    let mut allow = vec![RuleConfig::default()];
    for line in lines {
        let (kind, value) = (line.get(..2).unwrap_or(""), line.get(2..).unwrap_or(""));
        let rule = allow.last_mut().expect("one rule at least");
        match kind {
            "h " => rule.hosts.push(value.to_owned()),
            "c " => rule.cidrs.push(value.to_owned()),
            "p " => rule.ports.push(value.to_owned()),
            _ if allow.len() < 8 => allow.push(RuleConfig::default()),
            _ => {}
        }
    }
    PolicyConfig { allow }
}

fn address(bytes: &[u8]) -> IpAddr {
    match bytes.len() {
        n if n >= 16 => {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&bytes[..16]);
            IpAddr::V6(Ipv6Addr::from(octets))
        }
        n if n >= 4 => IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3])),
        _ => IpAddr::V4(Ipv4Addr::LOCALHOST),
    }
}

/// The fuzz target's body: panics on a finding.
pub(crate) fn check(data: &[u8]) {
    if data.len() < 3 {
        return;
    }
    let (head, text) = data.split_at(18.min(data.len()));
    let ip = address(&head[2..]);
    let port = u16::from_be_bytes([head[0], head[1]]);
    check_sensitivity(ip);

    let text = String::from_utf8_lossy(text);
    let lines: Vec<&str> = text.lines().collect();
    let Some((target, rule_lines)) = lines.split_first() else {
        return;
    };
    check_literal(target);
    let _ = is_valid_hostname(target);
    for line in rule_lines {
        let _ = matches_pattern(line, target);
    }

    let Ok(policy) = rules(rule_lines).compile() else {
        return;
    };
    let host = Host::parse(target);
    let verdict = policy.check(&host, port, ip);
    // Port 0 is never allowed.
    assert!(
        port != 0 || verdict.is_err(),
        "port 0 allowed for {target:?}"
    );
    // The resolved address counts in its canonical form.
    assert_eq!(policy.check(&host, port, canonical_ip(ip)), verdict);
    if let IpAddr::V4(v4) = ip {
        let mapped = IpAddr::V6(v4.to_ipv6_mapped());
        assert_eq!(policy.check(&host, port, mapped), verdict, "mapped {v4}");
    }
    // A name that is an IP literal counts as that IP, never as a name.
    if let Host::Ip(parsed) = host {
        assert_eq!(
            policy.check(&Host::Name((*target).to_owned()), port, ip),
            policy.check(&Host::Ip(parsed), port, ip),
            "{target:?}"
        );
    }
    // A sensitive address is reachable only through a CIDR rule, never through a name.
    if is_sensitive(ip) && verdict.is_ok() {
        assert_eq!(
            policy
                .check(&Host::Name("fuzz.invalid".into()), port, ip)
                .is_ok(),
            policy.check(&Host::Ip(ip), port, ip).is_ok(),
            "sensitive {ip} allowed by a name rule"
        );
    }
}
