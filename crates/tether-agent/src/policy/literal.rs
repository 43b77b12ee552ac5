//! Target spellings: IP literals (including legacy inet_aton forms), canonical IPs, host names and host patterns.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Parses `s` as an IP literal, accepting every spelling that `inet_aton`/`getaddrinfo` would treat
/// as an address rather than a name, so that such strings are never sent to DNS.
///
/// Accepted forms:
/// - IPv6, optionally in brackets (`[::1]`) and with a zone id (`fe80::1%eth0`, the zone is dropped);
/// - IPv4 in 1 to 4 dot-separated parts (`a`, `a.b`, `a.b.c`, `a.b.c.d`, where the last part fills
///   the remaining bytes), each part decimal, octal (leading `0`) or hexadecimal (`0x`), so `127.1`,
///   `2130706433`, `0177.0.0.1`, `0x7f.1` and `0x7f000001` are all `127.0.0.1`;
/// - a single trailing dot (`127.0.0.1.`), and IPv4 forms in brackets.
///
/// The result is canonicalized with [`canonical_ip`] (`::ffff:127.0.0.1` becomes `127.0.0.1`).
pub fn parse_ip_literal(s: &str) -> Option<IpAddr> {
    let inner = match s.strip_prefix('[') {
        Some(rest) => rest.strip_suffix(']')?,
        None => s,
    };
    if inner.contains(':') {
        // A zone id only qualifies the address; it does not change which address it is.
        let addr = inner.split_once('%').map_or(inner, |(addr, _zone)| addr);
        return addr
            .parse::<Ipv6Addr>()
            .ok()
            .map(|v6| canonical_ip(IpAddr::V6(v6)));
    }
    parse_legacy_ipv4(inner).map(IpAddr::V4)
}

/// The address a policy reasons about: IPv4-mapped (`::ffff:a.b.c.d`) and IPv4-compatible
/// (`::a.b.c.d`, except `::` and `::1`) IPv6 addresses become the IPv4 address.
///
/// NAT64 (`64:ff9b::/96`) and 6to4 (`2002::/16`) embeddings are not translated: whether they reach
/// an IPv4 host depends on the network, so CIDR rules match them as the IPv6 addresses they are;
/// `is_sensitive` still classifies them by the IPv4 address they embed.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return IpAddr::V4(v4);
            }
            let octets = v6.octets();
            let (high, low) = octets.split_at(12);
            let low = u32::from_be_bytes([low[0], low[1], low[2], low[3]]);
            if high.iter().all(|b| *b == 0) && low > 1 {
                IpAddr::V4(Ipv4Addr::from(low))
            } else {
                ip
            }
        }
    }
}

/// Legacy IPv4 syntax of `inet_aton`: 1 to 4 parts, each decimal, octal or hex; the last part fills
/// the remaining bytes. An optional single trailing dot is ignored.
fn parse_legacy_ipv4(s: &str) -> Option<Ipv4Addr> {
    let s = s.strip_suffix('.').unwrap_or(s);
    if s.is_empty() {
        return None;
    }
    let mut parts = [0u64; 4];
    let mut count = 0;
    for part in s.split('.') {
        let slot = parts.get_mut(count)?;
        *slot = parse_c_number(part)?;
        count += 1;
    }
    let (last, leading) = parts[..count].split_last()?;
    if leading.iter().any(|v| *v > 255) {
        return None;
    }
    let remaining_bits = 8 * (4 - leading.len() as u32);
    if *last >= 1u64 << remaining_bits {
        return None;
    }
    let mut addr = *last as u32;
    for (i, byte) in leading.iter().enumerate() {
        addr |= (*byte as u32) << (24 - 8 * i as u32);
    }
    Some(Ipv4Addr::from(addr))
}

/// A C-style unsigned number: `0x..` hex, `0..` octal, otherwise decimal. Signs, spaces and
/// anything else are rejected. A bare `0x` counts as zero (older C libraries accept it).
fn parse_c_number(part: &str) -> Option<u64> {
    let (digits, radix) =
        if let Some(hex) = part.strip_prefix("0x").or_else(|| part.strip_prefix("0X")) {
            if hex.is_empty() {
                return Some(0);
            }
            (hex, 16)
        } else if part.len() > 1 && part.starts_with('0') {
            (&part[1..], 8)
        } else {
            (part, 10)
        };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    u64::from_str_radix(digits, radix).ok()
}

/// Whether `s` is a syntactically valid DNS host name that is not an IP literal: labels of 1 to 63
/// ASCII letters, digits, `-` or `_`, at most 253 characters (one trailing dot allowed), and a last
/// label that is not all digits (RFC 3696 §2), so numeric spellings never reach DNS.
pub fn is_valid_hostname(s: &str) -> bool {
    let s = s.strip_suffix('.').unwrap_or(s);
    if s.is_empty() || s.len() > 253 || parse_ip_literal(s).is_some() {
        return false;
    }
    let labels_ok = s.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    });
    let last_is_numeric = s
        .rsplit('.')
        .next()
        .is_some_and(|last| last.bytes().all(|b| b.is_ascii_digit()));
    labels_ok && !last_is_numeric
}

/// Lower-cases a host name and drops one trailing dot.
pub(crate) fn normalize_name(name: &str) -> String {
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

/// Host-pattern matching: exact names match case-insensitively with a trailing dot ignored;
/// `*.a.b` matches any name with at least one more label (`x.a.b`, `y.x.a.b`) but not `a.b`.
/// Patterns or names that are not valid host names never match.
pub fn matches_pattern(pattern: &str, name: &str) -> bool {
    if !is_valid_hostname(name) {
        return false;
    }
    let name = normalize_name(name);
    match pattern.strip_prefix("*.") {
        Some(suffix) => {
            if !is_valid_hostname(suffix) {
                return false;
            }
            let suffix = normalize_name(suffix);
            name.len() > suffix.len() + 1
                && name.ends_with(suffix.as_str())
                && name.as_bytes()[name.len() - suffix.len() - 1] == b'.'
        }
        None => is_valid_hostname(pattern) && normalize_name(pattern) == name,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(s: &str) -> Option<IpAddr> {
        s.parse::<Ipv4Addr>().ok().map(IpAddr::V4)
    }

    #[test]
    fn legacy_ipv4_spellings_are_literals() {
        let loopback = v4("127.0.0.1");
        for s in [
            "127.0.0.1",
            "127.1",
            "127.0.1",
            "2130706433",
            "0177.0.0.1",
            "0x7f.1",
            "0X7F.0.0.1",
            "0x7f000001",
            "017700000001",
            "127.0.0.1.",
            "[127.0.0.1]",
            "::ffff:127.0.0.1",
            "[::ffff:127.0.0.1]",
            "::ffff:7f00:1",
            "::127.0.0.1",
        ] {
            assert_eq!(parse_ip_literal(s), loopback, "{s}");
        }
        assert_eq!(parse_ip_literal("0"), v4("0.0.0.0"));
        assert_eq!(parse_ip_literal("0x"), v4("0.0.0.0"));
        assert_eq!(parse_ip_literal("0xa9fea9fe"), v4("169.254.169.254"));
        assert_eq!(
            parse_ip_literal("0251.0376.0251.0376"),
            v4("169.254.169.254")
        );
        assert_eq!(parse_ip_literal("10.1.65535"), v4("10.1.255.255"));
    }

    #[test]
    fn ipv6_literals() {
        assert_eq!(parse_ip_literal("[::1]"), Some("::1".parse().unwrap()));
        assert_eq!(parse_ip_literal("::"), Some("::".parse().unwrap()));
        assert_eq!(
            parse_ip_literal("fe80::1%eth0"),
            Some("fe80::1".parse().unwrap())
        );
        assert_eq!(
            parse_ip_literal("[fe80::1%25eth0]"),
            Some("fe80::1".parse().unwrap())
        );
        assert_eq!(parse_ip_literal("[::1"), None);
        assert_eq!(parse_ip_literal("::ffff:127.1"), None);
    }

    #[test]
    fn non_literals() {
        for s in [
            "",
            ".",
            "example.com",
            "1.2.3.256",
            "256.1",
            "1.2.65536",
            "4294967296",
            "1.2.3.4.5",
            "08",
            "0x7g",
            "+1",
            "-1",
            " 127.0.0.1",
            "127.0.0.1 ",
            "1..2",
            "99999999999999999999999",
            "localhost",
        ] {
            assert_eq!(parse_ip_literal(s), None, "{s:?}");
        }
    }

    #[test]
    fn canonicalization() {
        let c = |s: &str| canonical_ip(s.parse().unwrap());
        assert_eq!(c("::ffff:10.0.0.1"), c("10.0.0.1"));
        assert_eq!(c("::10.0.0.1"), c("10.0.0.1"));
        assert_eq!(c("::1"), "::1".parse::<IpAddr>().unwrap());
        assert_eq!(c("::"), "::".parse::<IpAddr>().unwrap());
        assert_eq!(
            c("64:ff9b::7f00:1"),
            "64:ff9b::7f00:1".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn hostnames() {
        for ok in ["example.com", "a", "db_1.internal.", "X-Y.example"] {
            assert!(is_valid_hostname(ok), "{ok}");
        }
        for bad in [
            "",
            ".",
            "a..b",
            "127.0.0.1",
            "127.1",
            "1.2.3.256",
            "a b",
            "a:b",
            "[x]",
            "é.example",
            "example.123",
        ] {
            assert!(!is_valid_hostname(bad), "{bad:?}");
        }
        assert!(!is_valid_hostname(&"a".repeat(64)));
        assert!(is_valid_hostname(&"a".repeat(63)));
    }

    #[test]
    fn pattern_matching() {
        assert!(matches_pattern("db.example", "db.example"));
        assert!(matches_pattern("db.example", "DB.Example."));
        assert!(matches_pattern("DB.EXAMPLE.", "db.example"));
        assert!(!matches_pattern("db.example", "xdb.example"));
        assert!(!matches_pattern("db.example", "a.db.example"));

        assert!(matches_pattern("*.a.b", "x.a.b"));
        assert!(matches_pattern("*.a.b", "y.x.a.b"));
        assert!(matches_pattern("*.A.b", "X.a.B."));
        assert!(!matches_pattern("*.a.b", "a.b"));
        assert!(!matches_pattern("*.a.b", "xa.b"));
        assert!(!matches_pattern("*.a.b", ".a.b"));
        assert!(!matches_pattern("*.a.b", "x.a.b.c"));

        assert!(!matches_pattern("*", "x.a.b"));
        assert!(!matches_pattern("a.*.b", "a.x.b"));
        assert!(!matches_pattern("*.1", "127.1"));
        assert!(!matches_pattern("*.example", "127.0.0.1"));
    }
}
