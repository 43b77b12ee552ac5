//! The agent's placement: how many replicas it holds sessions to and which ones, by
//! rendezvous ranking of its id against each replica's address (`tether_common::placement`),
//! with the next-ranked replica standing in for one whose attempts fail.

use std::collections::BTreeSet;

use rustls::pki_types::CertificateDer;
use tether_common::identity::{IdentityMode, agent_id_from_cert};
use tether_common::placement;

use crate::connector::Endpoint;
use crate::status::{AgentStatus, ReplicaStatus};

/// The placement in force: `placement.replicas_per_agent` and the agent's key in the ranking
/// (its id from its certificate).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PlacementSettings {
    pub(crate) replicas_per_agent: Option<usize>,
    pub(crate) agent_key: String,
}

/// The agent's key in the ranking: the id its certificate carries (`tether://agent/<id>`,
/// else its first DNS SAN), which is what the server registers it under; without one, the
/// process's `instance_id` (a placement that changes on every restart).
pub(crate) fn agent_key(chain: &[CertificateDer<'_>], instance_id: &str) -> String {
    chain
        .first()
        .and_then(|der| {
            agent_id_from_cert(der, IdentityMode::UriSan)
                .or_else(|_| agent_id_from_cert(der, IdentityMode::DnsSan))
                .ok()
        })
        .unwrap_or_else(|| instance_id.to_owned())
}

/// The key of `endpoint` in the placement: the IP address dialed (what replicas list of each
/// other, on their peer port), or the URL's host when it did not resolve.
pub(crate) fn member_key(endpoint: &Endpoint) -> String {
    match endpoint.addr {
        Some(addr) => addr.ip().to_string(),
        None => endpoint.url.clone(),
    }
}

/// Whether a replica counts as unavailable for the placement: its attempts fail, or it is a
/// second address of a replica that already has a session.
pub(crate) fn is_down(replica: &ReplicaStatus) -> bool {
    !replica.connected && (replica.attempts > 0 || replica.duplicate_of.is_some())
}

/// The endpoints to hold sessions to: all of them without `replicas_per_agent`, else the
/// first k in the agent's rendezvous ranking that are not down, and the down ones above them.
pub(crate) fn wanted_endpoints(
    settings: &PlacementSettings,
    endpoints: &BTreeSet<Endpoint>,
    status: &AgentStatus,
) -> Vec<Endpoint> {
    let Some(k) = settings.replicas_per_agent else {
        return endpoints.iter().cloned().collect();
    };
    let keyed: Vec<Keyed<'_>> = endpoints
        .iter()
        .map(|endpoint| Keyed {
            key: member_key(endpoint),
            endpoint,
        })
        .collect();
    let ranked = placement::rank(&settings.agent_key, &keyed);
    placement::wanted(&ranked, k, |m| {
        status
            .replicas
            .get(&m.endpoint.to_string())
            .is_some_and(is_down)
    })
    .into_iter()
    .map(|m| m.endpoint.clone())
    .collect()
}

/// An endpoint with its placement key.
struct Keyed<'a> {
    key: String,
    endpoint: &'a Endpoint,
}

impl AsRef<str> for Keyed<'_> {
    fn as_ref(&self) -> &str {
        &self.key
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(addr: &str) -> Endpoint {
        Endpoint {
            url: "wss://tether:8443/v1/connect".into(),
            addr: Some(addr.parse().expect("an address")),
        }
    }

    fn five() -> BTreeSet<Endpoint> {
        (1..=5).map(|i| ep(&format!("127.0.0.{i}:8443"))).collect()
    }

    fn settings(k: Option<usize>) -> PlacementSettings {
        PlacementSettings {
            replicas_per_agent: k,
            agent_key: "edge-7".into(),
        }
    }

    #[test]
    fn without_k_every_endpoint_is_wanted() {
        let all = wanted_endpoints(&settings(None), &five(), &AgentStatus::default());
        assert_eq!(all.len(), 5);
    }

    #[test]
    fn k_endpoints_by_the_shared_ranking_and_a_stand_in_for_a_failing_one() {
        let endpoints = five();
        let keys: Vec<String> = endpoints.iter().map(member_key).collect();
        let ranked: Vec<String> = placement::rank("edge-7", &keys)
            .into_iter()
            .cloned()
            .collect();
        let status = AgentStatus::default();
        let top: Vec<String> = wanted_endpoints(&settings(Some(2)), &endpoints, &status)
            .iter()
            .map(member_key)
            .collect();
        assert_eq!(top, ranked[..2], "the replicas' own view of the placement");

        // The first-ranked replica fails: the third stands in, the first is still tried.
        let mut failing = AgentStatus::default();
        let first = endpoints
            .iter()
            .find(|e| member_key(e) == ranked[0])
            .expect("the first-ranked endpoint")
            .clone();
        failing.replica_mut(&first.to_string()).attempts = 3;
        let with_stand_in: Vec<String> = wanted_endpoints(&settings(Some(2)), &endpoints, &failing)
            .iter()
            .map(member_key)
            .collect();
        assert_eq!(with_stand_in, ranked[..3]);

        // Connected again: back to the top two.
        let replica = failing.replica_mut(&first.to_string());
        replica.attempts = 0;
        replica.connected = true;
        let back: Vec<String> = wanted_endpoints(&settings(Some(2)), &endpoints, &failing)
            .iter()
            .map(member_key)
            .collect();
        assert_eq!(back, ranked[..2]);
    }

    #[test]
    fn a_duplicate_address_counts_as_down() {
        let mut status = AgentStatus::default();
        status.replica_mut("x").duplicate_of = Some("y".into());
        assert!(is_down(&status.replicas["x"]));
        status.replica_mut("z").connected = true;
        assert!(!is_down(&status.replicas["z"]));
    }

    #[test]
    fn the_agent_key_is_the_certificate_id() {
        use tether_common::pki::{Ca, IssueOptions};
        let ca = Ca::generate("placement").expect("a CA");
        let leaf = ca
            .issue_agent("edge-7", &IssueOptions::default())
            .expect("a leaf");
        let chain = tether_common::tls::certs_from_pem(&leaf.cert_pem).expect("PEM");
        assert_eq!(agent_key(&chain, "inst"), "edge-7");
        assert_eq!(agent_key(&[], "inst"), "inst");
    }
}
