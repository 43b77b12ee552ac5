//! The replica set: every address of every server URL's host, resolved again on a timer and
//! whenever a session ends. Pure set arithmetic plus one resolver call per URL.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use crate::config::MAX_SERVERS;
use crate::connector::{Connector, Endpoint};

/// Longest one resolution may take; past it the name counts as not resolving this round.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Resolves every server URL of `connector` into endpoints. A URL whose host is an IP address
/// is one endpoint. A host name gives one endpoint per address of one family (IPv4 when it
/// has any, else IPv6: `localhost` and dual-stack names would otherwise list every server
/// twice); at most [`MAX_SERVERS`] per URL. A name that does not resolve (or resolves to
/// nothing, or takes longer than [`RESOLVE_TIMEOUT`]) keeps the endpoints it had in
/// `previous`, or, if it had none, becomes one endpoint dialed by name, whose attempts then
/// report the resolution error.
pub(crate) async fn resolve(
    connector: &Connector,
    previous: &BTreeSet<Endpoint>,
) -> BTreeSet<Endpoint> {
    let mut endpoints = BTreeSet::new();
    for (url, server) in connector.servers() {
        let addrs = match server.host.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, server.port)],
            Err(_) => tokio::time::timeout(
                RESOLVE_TIMEOUT,
                tokio::net::lookup_host((server.host.as_str(), server.port)),
            )
            .await
            .ok()
            .and_then(Result::ok)
            .map(|addrs| addrs.collect())
            .unwrap_or_default(),
        };
        let addrs = one_family(addrs);
        if addrs.is_empty() {
            let kept: Vec<&Endpoint> = previous.iter().filter(|e| e.url == url).collect();
            if kept.is_empty() {
                endpoints.insert(Endpoint {
                    url: url.to_owned(),
                    addr: None,
                });
            } else {
                endpoints.extend(kept.into_iter().cloned());
            }
            continue;
        }
        endpoints.extend(addrs.into_iter().take(MAX_SERVERS).map(|addr| Endpoint {
            url: url.to_owned(),
            addr: Some(addr),
        }));
    }
    endpoints
}

/// The IPv4 addresses of `addrs` if there are any, else the IPv6 ones; sorted, no duplicates.
fn one_family(addrs: Vec<SocketAddr>) -> Vec<SocketAddr> {
    let any_v4 = addrs.iter().any(SocketAddr::is_ipv4);
    let set: BTreeSet<SocketAddr> = addrs
        .into_iter()
        .filter(|a| a.is_ipv4() == any_v4)
        .collect();
    set.into_iter().collect()
}

/// What changed between two endpoint sets: (added, removed).
pub(crate) fn diff(
    old: &BTreeSet<Endpoint>,
    new: &BTreeSet<Endpoint>,
) -> (Vec<Endpoint>, Vec<Endpoint>) {
    (
        new.difference(old).cloned().collect(),
        old.difference(new).cloned().collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(url: &str, addr: Option<&str>) -> Endpoint {
        Endpoint {
            url: url.to_owned(),
            addr: addr.map(|a| a.parse().unwrap()),
        }
    }

    #[test]
    fn one_family_prefers_ipv4_and_dedups() {
        let addrs: Vec<SocketAddr> = ["[::1]:1", "127.0.0.2:1", "127.0.0.1:1", "127.0.0.2:1"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        assert_eq!(
            one_family(addrs),
            vec![
                "127.0.0.1:1".parse().unwrap(),
                "127.0.0.2:1".parse().unwrap()
            ]
        );
        let v6: Vec<SocketAddr> = vec!["[::1]:1".parse().unwrap()];
        assert_eq!(one_family(v6.clone()), v6);
    }

    #[test]
    fn diff_names_added_and_removed() {
        let old: BTreeSet<_> = [ep("u", Some("127.0.0.1:1")), ep("u", Some("127.0.0.2:1"))].into();
        let new: BTreeSet<_> = [ep("u", Some("127.0.0.2:1")), ep("u", Some("127.0.0.3:1"))].into();
        let (added, removed) = diff(&old, &new);
        assert_eq!(added, vec![ep("u", Some("127.0.0.3:1"))]);
        assert_eq!(removed, vec![ep("u", Some("127.0.0.1:1"))]);
    }

    #[test]
    fn endpoint_tags_are_stable_and_distinct() {
        let a = ep("wss://x:1/v1/connect", Some("127.0.0.1:1"));
        let b = ep("wss://x:1/v1/connect", Some("127.0.0.2:1"));
        assert_eq!(a.tag(), a.clone().tag());
        assert_ne!(a.tag(), b.tag());
        assert_eq!(a.tag().len(), 8);
    }
}
