//! Per client id, the last refused connection attempt and the last session end, with their
//! reasons: the answer to "why can't I reach edge-7?" in one place (`GET /v1/clients/{id}`,
//! `tether status CLIENT`). Bounded: at most [`MAX_CLIENTS`] ids, the least recently updated
//! one is forgotten first. Refusals of peers whose identity could not be read (no certificate,
//! an unparsable one, a client that refused the server's certificate) are kept apart, by source
//! address, in a table of at most [`MAX_SOURCES`]: a scan from many addresses cannot push out
//! what is known about real clients.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Mutex, MutexGuard};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::rfc3339::rfc3339;

/// Most client ids remembered.
pub const MAX_CLIENTS: usize = 4096;
/// Most source addresses remembered (refusals without a readable identity).
pub const MAX_SOURCES: usize = 1024;
/// Longest detail text kept.
const MAX_DETAIL: usize = 300;

/// A connection attempt the server refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Refusal {
    /// When, RFC 3339 UTC.
    pub at: String,
    /// A closed-set reason, as in `tether_auth_failures_total` (`not_allowed`, `max_agents`,
    /// ...).
    pub reason: String,
    /// What the agent was told, or why, in words.
    pub detail: String,
    /// Where the attempt came from.
    pub peer_addr: String,
}

/// How a session of the client ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionEndRecord {
    /// When, RFC 3339 UTC.
    pub at: String,
    /// The session's id.
    pub session_id: u64,
    /// A closed-set reason (`tether_sessions_closed_total` style: `peer_goaway`, `idle_timeout`,
    /// `transport`, ...).
    pub reason: String,
    /// The session's end in words.
    pub detail: String,
    /// How long the session lived, seconds.
    pub lived_seconds: f64,
}

/// What is remembered about one client id.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClientRecord {
    /// The last refused attempt, if any.
    pub last_refusal: Option<Refusal>,
    /// The last session end, if any.
    pub last_session_end: Option<SessionEndRecord>,
}

/// The bounded table. Cheap operations under a short lock; never held across `.await`.
#[derive(Debug, Default)]
pub struct ClientHistory {
    inner: Mutex<Table>,
    /// Keyed by source IP address, at most [`MAX_SOURCES`].
    sources: Mutex<Table>,
}

#[derive(Debug, Default)]
struct Table {
    records: HashMap<String, (u64, ClientRecord)>,
    /// Update counter: the smallest stamp is the least recently updated record.
    stamp: u64,
}

fn lock(table: &Mutex<Table>) -> MutexGuard<'_, Table> {
    // Records are replaced whole: a panic elsewhere cannot leave one half-written.
    table.lock().unwrap_or_else(|e| e.into_inner())
}

impl ClientHistory {
    fn update(&self, client: &str, change: impl FnOnce(&mut ClientRecord)) {
        update(&self.inner, MAX_CLIENTS, client, change);
    }

    /// Remembers a refused attempt of a peer whose identity could not be read, under its
    /// source address (`GET /v1/clients/{address}` shows it).
    pub fn refused_source(&self, source: IpAddr, reason: &str, detail: &str, peer_addr: &str) {
        let refusal = Refusal {
            at: rfc3339(SystemTime::now()),
            reason: reason.to_owned(),
            detail: clip(detail),
            peer_addr: peer_addr.to_owned(),
        };
        update(&self.sources, MAX_SOURCES, &source.to_string(), |r| {
            r.last_refusal = Some(refusal);
        });
    }
}

fn update(table: &Mutex<Table>, max: usize, key: &str, change: impl FnOnce(&mut ClientRecord)) {
    let mut table = lock(table);
    table.stamp += 1;
    let stamp = table.stamp;
    if !table.records.contains_key(key) && table.records.len() >= max {
        let oldest = table
            .records
            .iter()
            .min_by_key(|(_, (stamp, _))| *stamp)
            .map(|(k, _)| k.clone());
        if let Some(oldest) = oldest {
            table.records.remove(&oldest);
        }
    }
    let entry = table.records.entry(key.to_owned()).or_default();
    entry.0 = stamp;
    change(&mut entry.1);
}

impl ClientHistory {
    /// Remembers a refused attempt of `client`.
    pub fn refused(&self, client: &str, reason: &str, detail: &str, peer_addr: &str) {
        let refusal = Refusal {
            at: rfc3339(SystemTime::now()),
            reason: reason.to_owned(),
            detail: clip(detail),
            peer_addr: peer_addr.to_owned(),
        };
        self.update(client, |r| r.last_refusal = Some(refusal));
    }

    /// Remembers how a session of `client` ended.
    pub fn session_ended(
        &self,
        client: &str,
        session_id: u64,
        reason: &str,
        detail: &str,
        lived_seconds: f64,
    ) {
        let end = SessionEndRecord {
            at: rfc3339(SystemTime::now()),
            session_id,
            reason: reason.to_owned(),
            detail: clip(detail),
            lived_seconds,
        };
        self.update(client, |r| r.last_session_end = Some(end));
    }

    /// What is remembered about `client` (a client id, else a source address).
    pub fn get(&self, client: &str) -> Option<ClientRecord> {
        let by_id = lock(&self.inner)
            .records
            .get(client)
            .map(|(_, r)| r.clone());
        by_id.or_else(|| {
            let source: IpAddr = client.parse().ok()?;
            let sources = lock(&self.sources);
            sources
                .records
                .get(&source.to_string())
                .map(|(_, r)| r.clone())
        })
    }

    /// How many ids are remembered.
    pub fn len(&self) -> usize {
        lock(&self.inner).records.len()
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn clip(text: &str) -> String {
    text.chars()
        .filter(|c| !c.is_control())
        .take(MAX_DETAIL)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_the_last_of_each_and_stays_bounded() {
        let history = ClientHistory::default();
        history.refused("edge-7", "not_allowed", "first", "10.0.0.1:1");
        history.refused("edge-7", "max_agents", "second\n", "10.0.0.1:2");
        history.session_ended("edge-7", 3, "idle_timeout", "no frames for 45s", 12.5);
        let record = history.get("edge-7").unwrap();
        let refusal = record.last_refusal.unwrap();
        assert_eq!(
            (refusal.reason.as_str(), refusal.detail.as_str()),
            ("max_agents", "second")
        );
        assert_eq!(record.last_session_end.unwrap().session_id, 3);
        assert!(history.get("edge-8").is_none());

        for i in 0..MAX_CLIENTS + 10 {
            history.refused(&format!("c{i}"), "not_allowed", "", "");
        }
        assert_eq!(history.len(), MAX_CLIENTS);
        assert!(
            history.get("edge-7").is_none(),
            "the oldest record went first"
        );
        assert!(history.get(&format!("c{}", MAX_CLIENTS + 9)).is_some());
    }

    #[test]
    fn sources_are_kept_apart_and_bounded() {
        let history = ClientHistory::default();
        history.refused("edge-1", "expired", "old", "10.0.0.1:1");
        for i in 0..MAX_SOURCES + 5 {
            let ip = IpAddr::from([10, 1, (i / 256) as u8, (i % 256) as u8]);
            history.refused_source(ip, "unknown_issuer", "scan", &format!("{ip}:9"));
        }
        assert!(history.get("edge-1").is_some(), "sources never evict ids");
        assert_eq!(history.len(), 1);
        assert!(
            history.get("10.1.0.0").is_none(),
            "the oldest source went first"
        );
        let last = history.get("10.1.4.4").unwrap().last_refusal.unwrap();
        assert_eq!(last.reason, "unknown_issuer");
        assert!(history.get("not-an-address").is_none());
    }
}
