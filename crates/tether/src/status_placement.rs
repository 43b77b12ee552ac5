//! Where each client is placed, for `tether status` over several replicas: the replicas in the
//! client's rendezvous ranking over the members the replicas report, marked where a session is.

use std::collections::{BTreeMap, BTreeSet};

use tether_common::placement;
use tether_server::ClientsResponse;

/// The membership gathered from the replicas' listings.
#[derive(Debug, Default)]
pub(crate) struct Placement {
    /// Every member address some replica reports.
    members: Vec<String>,
    /// Member address -> the server id answering for it (the address itself when unknown).
    names: BTreeMap<String, String>,
    /// Replicas whose member list differs from the first one's: (server id, its members).
    disagreeing: Vec<(String, Vec<String>)>,
}

impl Placement {
    /// The placement view of `listings` (server id, listing), `None` when no replica reports
    /// one (lone servers, or servers without `peers:`).
    pub(crate) fn gather<'a>(
        listings: impl IntoIterator<Item = (&'a str, &'a ClientsResponse)>,
    ) -> Option<Placement> {
        let mut out = Placement::default();
        let mut members = BTreeSet::new();
        let mut first: Option<Vec<String>> = None;
        let mut seen = false;
        for (server_id, listing) in listings {
            let Some(view) = &listing.placement else {
                continue;
            };
            seen = true;
            let mut own: Vec<String> = view.members.clone();
            own.sort();
            match &first {
                None => first = Some(own.clone()),
                Some(first) if *first != own => out.disagreeing.push((server_id.to_owned(), own)),
                Some(_) => {}
            }
            members.extend(view.members.iter().cloned());
            for ip in &view.this_replica {
                out.names.insert(ip.clone(), server_id.to_owned());
            }
            for (ip, id) in &view.linked {
                out.names.entry(ip.clone()).or_insert_with(|| id.clone());
            }
        }
        if !seen {
            return None;
        }
        out.members = members.into_iter().collect();
        Some(out)
    }

    /// The client's replicas in rank order, each `name*` where `sessions(name)` says it holds
    /// a session, `name?` where it is unknown (the replica did not answer), else `name`.
    pub(crate) fn ranked(&self, client: &str, sessions: impl Fn(&str) -> Option<bool>) -> String {
        placement::rank(client, &self.members)
            .into_iter()
            .map(|ip| {
                let name = self.names.get(ip).unwrap_or(ip);
                match sessions(name) {
                    Some(true) => format!("{name}*"),
                    Some(false) => name.clone(),
                    None => format!("{name}?"),
                }
            })
            .collect::<Vec<_>>()
            .join(",")
    }

    /// One line per replica whose member list differs from the others' (a split view: the
    /// replicas rank clients over different members until DNS agrees again).
    pub(crate) fn disagreements(&self) -> String {
        self.disagreeing
            .iter()
            .map(|(id, members)| {
                format!(
                    "replica {id} sees other members: {}\n",
                    if members.is_empty() {
                        "none".to_owned()
                    } else {
                        members.join(",")
                    }
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use tether_server::PlacementView;

    use super::*;

    fn listing(id: &str, members: &[&str], this: &str) -> ClientsResponse {
        ClientsResponse {
            server_id: id.into(),
            clients: Vec::new(),
            forwards: Vec::new(),
            frontends: Vec::new(),
            placement: Some(PlacementView {
                members: members.iter().map(|m| (*m).to_owned()).collect(),
                this_replica: vec![this.into()],
                linked: BTreeMap::new(),
            }),
        }
    }

    #[test]
    fn a_client_is_ranked_as_the_agents_rank_it_with_server_ids() {
        let members = ["10.0.0.1", "10.0.0.2", "10.0.0.3"];
        let a = listing("a", &members, "10.0.0.1");
        let b = listing("b", &members, "10.0.0.2");
        let c = listing("c", &members, "10.0.0.3");
        let view = Placement::gather([("a", &a), ("b", &b), ("c", &c)]).unwrap();
        let expected: Vec<String> = placement::rank("edge-7", &members)
            .into_iter()
            .map(|ip| match *ip {
                "10.0.0.1" => "a".to_owned(),
                "10.0.0.2" => "b*".to_owned(),
                _ => "c?".to_owned(),
            })
            .collect();
        let text = view.ranked("edge-7", |name| match name {
            "a" => Some(false),
            "b" => Some(true),
            _ => None,
        });
        assert_eq!(text, expected.join(","));
        assert_eq!(view.disagreements(), "");
    }

    #[test]
    fn a_split_view_is_reported_and_unnamed_members_show_their_address() {
        let a = listing("a", &["10.0.0.1", "10.0.0.2"], "10.0.0.1");
        let b = listing("b", &["10.0.0.2"], "10.0.0.2");
        let view = Placement::gather([("a", &a), ("b", &b)]).unwrap();
        assert_eq!(
            view.disagreements(),
            "replica b sees other members: 10.0.0.2\n"
        );
        let lone = ClientsResponse {
            placement: None,
            ..listing("z", &[], "")
        };
        assert!(Placement::gather([("z", &lone)]).is_none());
        let c = listing("c", &["10.0.0.9", "10.0.0.1"], "10.0.0.1");
        let view = Placement::gather([("c", &c)]).unwrap();
        let text = view.ranked("edge-1", |_| Some(false));
        assert!(text.contains("10.0.0.9") && text.contains('c'), "{text}");
    }
}
