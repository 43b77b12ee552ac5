//! `tether status` over several server replicas: every admin URL given (or every address of an
//! admin host name), each client's sessions per replica, and the replicas a client is missing
//! on, or, with peering, where each client is placed (`status_placement`).

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::Duration;

use anyhow::{Context, bail};
use tether_server::ClientsResponse;

use crate::status_cmd::{AdminUrl, CLIENTS_PATH, counted, fetch_within, table};
use crate::status_placement::Placement;

/// Most replicas one `tether status` queries.
const MAX_REPLICAS: usize = 64;

/// The admin URLs to query: each of `admins`, and for a host name with several addresses,
/// one per address (a headless Service's name lists every replica).
pub(crate) async fn expand(admins: &[String]) -> anyhow::Result<Vec<AdminUrl>> {
    let mut urls = Vec::new();
    for admin in admins {
        let url = AdminUrl::parse(admin)?;
        if url.host.parse::<IpAddr>().is_ok() || url.host == "localhost" {
            urls.push(url);
            continue;
        }
        let addrs: BTreeSet<IpAddr> = tokio::net::lookup_host((url.host.as_str(), url.port))
            .await
            .with_context(|| format!("--admin {admin}: cannot resolve {}", url.host))?
            .map(|a| a.ip())
            .collect();
        if addrs.len() <= 1 {
            urls.push(url);
            continue;
        }
        for ip in addrs {
            urls.push(AdminUrl {
                host: ip.to_string(),
                ..url.clone()
            });
        }
    }
    if urls.len() > MAX_REPLICAS {
        bail!("{} admin addresses; at most {MAX_REPLICAS}", urls.len());
    }
    Ok(urls)
}

/// One replica's answer.
struct Replica {
    admin: String,
    listing: Result<ClientsResponse, String>,
}

impl Replica {
    fn name(&self) -> String {
        match &self.listing {
            Ok(listing) => listing.server_id.clone(),
            Err(_) => self.admin.clone(),
        }
    }
}

/// Queries every replica within `timeout` (all at once) and prints the per-replica table (or
/// the answers as JSON). Fails when a replica did not answer, after printing the others.
pub(crate) async fn run(urls: &[AdminUrl], json: bool, timeout: Duration) -> anyhow::Result<()> {
    // All at once; the set is owned here, so leaving early aborts whatever is left.
    let mut queries = tokio::task::JoinSet::new();
    for (index, url) in urls.iter().cloned().enumerate() {
        queries.spawn(async move {
            let listing = match fetch_within(&url, CLIENTS_PATH, timeout).await {
                Err(err) => Err(format!("{err:#}")),
                Ok(body) => serde_json::from_str::<ClientsResponse>(&body)
                    .map_err(|err| format!("not a client listing: {err}")),
            };
            (
                index,
                Replica {
                    admin: url.display(),
                    listing,
                },
            )
        });
    }
    let mut answers: Vec<(usize, Replica)> = Vec::with_capacity(urls.len());
    while let Some(answer) = queries.join_next().await {
        answers.push(answer.context("a status query failed")?);
    }
    answers.sort_by_key(|(index, _)| *index);
    let answers: Vec<Replica> = answers.into_iter().map(|(_, replica)| replica).collect();
    if json {
        let replicas: Vec<serde_json::Value> = answers
            .iter()
            .map(|r| match &r.listing {
                Ok(listing) => serde_json::json!({ "admin": r.admin, "listing": listing }),
                Err(error) => serde_json::json!({ "admin": r.admin, "error": error }),
            })
            .collect();
        println!("{}", serde_json::json!({ "replicas": replicas }));
    } else {
        print!("{}", render(&answers));
    }
    let failed = answers.iter().filter(|r| r.listing.is_err()).count();
    if failed > 0 {
        bail!("{failed} of {} replicas did not answer", answers.len());
    }
    Ok(())
}

/// One row per client: its sessions on each replica, then where it is placed (with `peers:`,
/// whose replicas report their members) or else the replicas it is missing on (every agent
/// keeps a session to every replica); then the replicas that did not answer, and a summary.
fn render(replicas: &[Replica]) -> String {
    let clients: BTreeSet<&str> = replicas
        .iter()
        .filter_map(|r| r.listing.as_ref().ok())
        .flat_map(|l| l.clients.iter().map(|c| c.client.as_str()))
        .collect();
    let names: Vec<String> = replicas.iter().map(Replica::name).collect();
    let placement = Placement::gather(
        replicas
            .iter()
            .zip(&names)
            .filter_map(|(r, name)| r.listing.as_ref().ok().map(|l| (name.as_str(), l))),
    );
    let mut header: Vec<&str> = vec!["CLIENT"];
    header.extend(names.iter().map(String::as_str));
    header.push(if placement.is_some() {
        "PLACED (RANK ORDER, * = SESSION)"
    } else {
        "MISSING ON"
    });
    let mut incomplete = 0;
    let rows = clients
        .iter()
        .map(|client| {
            let cells: Vec<Option<usize>> = replicas
                .iter()
                .map(|r| r.listing.as_ref().ok().map(|l| sessions_of(l, client)))
                .collect();
            let missing: Vec<&str> = names
                .iter()
                .zip(&cells)
                .filter(|(_, n)| **n == Some(0))
                .map(|(name, _)| name.as_str())
                .collect();
            let last = match &placement {
                Some(placement) => placement.ranked(client, |name| {
                    let at = names.iter().position(|n| n == name)?;
                    cells[at].map(|n| n > 0)
                }),
                None if missing.is_empty() => "-".to_owned(),
                None => missing.join(","),
            };
            // Placed on k of the replicas, a client is missing on the rest by design: only
            // one with no session anywhere is news then.
            let news = match &placement {
                Some(_) => cells.iter().all(|n| n.is_none_or(|n| n == 0)),
                None => !missing.is_empty(),
            };
            if news {
                incomplete += 1;
            }
            let mut row = vec![(*client).to_owned()];
            row.extend(
                cells
                    .iter()
                    .map(|n| n.map_or("?".to_owned(), |n| n.to_string())),
            );
            row.push(last);
            row
        })
        .collect();
    let mut out = table(&header, rows);
    if let Some(placement) = &placement {
        out.push_str(&placement.disagreements());
    }
    for replica in replicas {
        if let Err(error) = &replica.listing {
            out.push_str(&format!("replica {}: {error}\n", replica.admin));
        }
    }
    let answered = replicas.iter().filter(|r| r.listing.is_ok()).count();
    out.push_str(&format!(
        "{} answered of {}, {}, {} {}\n",
        counted(answered, "replica", "replicas"),
        replicas.len(),
        counted(clients.len(), "client", "clients"),
        incomplete,
        if placement.is_some() {
            "without a session on any replica"
        } else {
            "missing on some replica"
        }
    ));
    out
}

/// The client's live sessions in one replica's listing.
fn sessions_of(listing: &ClientsResponse, client: &str) -> usize {
    listing
        .clients
        .iter()
        .find(|c| c.client == client)
        .map_or(0, |c| c.sessions.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listing(server_id: &str, clients: &[(&str, usize)]) -> ClientsResponse {
        let clients: Vec<serde_json::Value> = clients
            .iter()
            .map(|(id, n)| {
                let sessions: Vec<serde_json::Value> = (0..*n)
                    .map(|i| {
                        serde_json::json!({
                            "session_id": i, "instance": "i", "peer_addr": "127.0.0.1:1",
                            "connected_since": "2026-01-01T00:00:00Z", "connected_seconds": 1.0,
                            "rtt_seconds": null, "healthy": true, "streams": 0,
                            "bytes_rx": 0, "bytes_tx": 0, "protocol": "tether"
                        })
                    })
                    .collect();
                serde_json::json!({ "client": id, "sessions": sessions })
            })
            .collect();
        serde_json::from_value(serde_json::json!({ "server_id": server_id, "clients": clients }))
            .unwrap()
    }

    #[test]
    fn a_client_missing_on_a_replica_is_marked() {
        let replicas = vec![
            Replica {
                admin: "http://127.0.0.1:9090".into(),
                listing: Ok(listing("r1", &[("edge-1", 1), ("edge-2", 1)])),
            },
            Replica {
                admin: "http://127.0.0.2:9090".into(),
                listing: Ok(listing("r2", &[("edge-1", 1), ("edge-2", 0)])),
            },
            Replica {
                admin: "http://127.0.0.3:9090".into(),
                listing: Err("no answer from the admin listener within 5s".into()),
            },
        ];
        let text = render(&replicas);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("CLIENT"), "{text}");
        assert!(lines[0].contains("r1") && lines[0].contains("r2"), "{text}");
        assert!(lines[0].contains("http://127.0.0.3:9090"), "{text}");
        let edge1: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(edge1, ["edge-1", "1", "1", "?", "-"], "{text}");
        let edge2: Vec<&str> = lines[2].split_whitespace().collect();
        assert_eq!(edge2, ["edge-2", "1", "0", "?", "r2"], "{text}");
        assert!(
            text.contains("replica http://127.0.0.3:9090: no answer from the admin listener"),
            "{text}"
        );
        assert!(
            text.contains("2 replicas answered of 3, 2 clients, 1 missing on some replica"),
            "{text}"
        );
    }

    #[test]
    fn with_peering_each_client_shows_its_ranking_and_only_unconnected_ones_are_news() {
        let members = ["10.0.0.1", "10.0.0.2"];
        let with_view = |id: &str, ip: &str, clients: &[(&str, usize)]| {
            let mut listing = listing(id, clients);
            listing.placement = Some(tether_server::PlacementView {
                members: members.iter().map(|m| (*m).to_owned()).collect(),
                this_replica: vec![ip.into()],
                linked: Default::default(),
            });
            listing
        };
        let replicas = vec![
            Replica {
                admin: "http://127.0.0.1:9090".into(),
                listing: Ok(with_view("r1", "10.0.0.1", &[("edge-1", 1), ("edge-2", 0)])),
            },
            Replica {
                admin: "http://127.0.0.2:9090".into(),
                listing: Ok(with_view("r2", "10.0.0.2", &[("edge-1", 0), ("edge-2", 0)])),
            },
        ];
        let text = render(&replicas);
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[0].contains("PLACED (RANK ORDER, * = SESSION)"),
            "{text}"
        );
        let order: Vec<&str> = tether_common::placement::rank("edge-1", &members)
            .into_iter()
            .map(|ip| if *ip == "10.0.0.1" { "r1*" } else { "r2" })
            .collect();
        let edge1: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(
            edge1,
            ["edge-1", "1", "0", order.join(",").as_str()],
            "{text}"
        );
        assert!(
            text.contains(
                "2 replicas answered of 2, 2 clients, 1 without a session on any replica"
            ),
            "{text}"
        );
    }
}
