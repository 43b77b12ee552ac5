//! IPv4 addresses carried inside IPv6 addresses by translation and tunnelling schemes (NAT64,
//! 6to4, Teredo, ISATAP), so the policy can judge such an address by the host it reaches.

use std::net::{Ipv4Addr, Ipv6Addr};

/// Every IPv4 address `v6` may stand for; empty for an ordinary IPv6 address. The
/// IPv4-mapped and IPv4-compatible forms are `canonical_ip`'s; these are the rest:
/// - NAT64 well-known prefix `64:ff9b::/96` (RFC 6052): the last 32 bits;
/// - NAT64 local-use prefix `64:ff9b:1::/48` (RFC 8215): the network may use any RFC 6052
///   prefix length inside it, so every placement for /48, /56, /64 and /96 is returned;
/// - 6to4 `2002::/16` (RFC 3056): bits 16 to 47;
/// - Teredo `2001::/32` (RFC 4380): the server (bits 32 to 63) and the client (the last 32
///   bits, inverted);
/// - ISATAP interface ids `::0:5efe:a.b.c.d` and `::200:5efe:a.b.c.d` (RFC 5214): the last
///   32 bits.
pub(super) fn embedded_ipv4(v6: Ipv6Addr) -> Vec<Ipv4Addr> {
    let o = v6.octets();
    let v4 = |a: u8, b: u8, c: u8, d: u8| Ipv4Addr::new(a, b, c, d);
    let segments = v6.segments();
    let mut found = Vec::new();
    if segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        found.push(v4(o[12], o[13], o[14], o[15]));
    }
    if segments[..3] == [0x64, 0xff9b, 1] {
        // RFC 6052 layouts: octet 8 ("u") is skipped.
        found.push(v4(o[6], o[7], o[9], o[10])); // /48
        found.push(v4(o[7], o[9], o[10], o[11])); // /56
        found.push(v4(o[9], o[10], o[11], o[12])); // /64
        found.push(v4(o[12], o[13], o[14], o[15])); // /96
    }
    if segments[0] == 0x2002 {
        found.push(v4(o[2], o[3], o[4], o[5]));
    }
    if segments[..2] == [0x2001, 0] {
        found.push(v4(o[4], o[5], o[6], o[7]));
        found.push(v4(!o[12], !o[13], !o[14], !o[15]));
    }
    if matches!(segments[4], 0 | 0x200) && segments[5] == 0x5efe {
        found.push(v4(o[12], o[13], o[14], o[15]));
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn of(s: &str) -> Vec<Ipv4Addr> {
        embedded_ipv4(s.parse().expect("test address"))
    }

    #[test]
    fn each_scheme_yields_the_address_it_carries() {
        let lo = Ipv4Addr::new(127, 0, 0, 1);
        let metadata = Ipv4Addr::new(169, 254, 169, 254);
        assert_eq!(of("64:ff9b::7f00:1"), vec![lo]);
        assert!(of("64:ff9b:1:7f00:0:100::").contains(&lo), "/48 layout");
        assert!(of("64:ff9b:1::a9fe:a9fe").contains(&metadata), "/96 layout");
        assert_eq!(of("2002:7f00:1::1"), vec![lo]);
        assert!(
            of("2001:0:a9fe:a9fe::1").contains(&metadata),
            "Teredo server"
        );
        assert!(
            of("2001:0:4136:e378:8000:63bf:80ff:fffe").contains(&lo),
            "Teredo client"
        );
        assert_eq!(of("fe80::5efe:7f00:1"), vec![lo]);
        assert_eq!(of("2001:db8::200:5efe:a9fe:a9fe"), vec![metadata]);
        assert!(of("2001:db8::1").is_empty());
        assert!(of("2606:4700::1111").is_empty());
    }
}
