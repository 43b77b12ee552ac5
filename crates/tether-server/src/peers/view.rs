//! What a replica reports of its peering for `tether status`: the member addresses it ranks
//! clients over, which of them are itself, and which peers it holds a session to.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The replica's view of the membership (the `placement` of `GET /v1/clients`).
///
/// Agents rank the replicas by their IP addresses (`tether_common::placement`), so the same
/// ranking over `members` tells where each client is placed.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PlacementView {
    /// Every member address of the last resolution of `peers.members`, this replica's too.
    pub members: Vec<String>,
    /// The member addresses that turned out to be this replica.
    pub this_replica: Vec<String>,
    /// The peers this replica holds a live session to: member address -> server id.
    pub linked: BTreeMap<String, String>,
}
