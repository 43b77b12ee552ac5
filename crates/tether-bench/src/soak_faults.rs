//! The soak's faults: which one comes next, and how many of each were injected.

use std::fmt;

/// One injected fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fault {
    /// The second agent killed with SIGKILL and started again.
    AgentKill,
    /// The server stopped with SIGTERM (GOAWAY, drain) and started again on the same ports.
    ServerTerm,
    /// The server killed with SIGKILL and started again on the same ports.
    ServerKill,
    /// The link between the agents and the server black-holed for a while, then healed.
    Partition,
    /// The server reloads its config (SIGHUP).
    Reload,
}

/// The order faults come in; server restarts are replaced by agent kills once the run is past
/// the point after which the server must live to the end (its last life needs a baseline).
const CYCLE: [Fault; 8] = [
    Fault::ServerTerm,
    Fault::Partition,
    Fault::ServerKill,
    Fault::AgentKill,
    Fault::Reload,
    Fault::Partition,
    Fault::AgentKill,
    Fault::Reload,
];

/// The `n`th fault (from 0).
pub(crate) fn nth(n: u32, server_restarts_allowed: bool) -> Fault {
    match CYCLE[n as usize % CYCLE.len()] {
        Fault::ServerTerm | Fault::ServerKill if !server_restarts_allowed => Fault::AgentKill,
        fault => fault,
    }
}

/// Faults injected, by kind.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct FaultCounts {
    pub(crate) agent_kills: u32,
    pub(crate) server_terms: u32,
    pub(crate) server_kills: u32,
    pub(crate) partitions: u32,
    pub(crate) reloads: u32,
}

impl FaultCounts {
    pub(crate) fn count(&mut self, fault: Fault) {
        let slot = match fault {
            Fault::AgentKill => &mut self.agent_kills,
            Fault::ServerTerm => &mut self.server_terms,
            Fault::ServerKill => &mut self.server_kills,
            Fault::Partition => &mut self.partitions,
            Fault::Reload => &mut self.reloads,
        };
        *slot += 1;
    }

    pub(crate) fn total(&self) -> u32 {
        self.agent_kills + self.server_terms + self.server_kills + self.partitions + self.reloads
    }
}

impl fmt::Display for FaultCounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} faults: {} agent SIGKILL + restart, {} server SIGTERM + restart, {} server SIGKILL + restart, {} partitions, {} reloads (SIGHUP)",
            self.total(),
            self.agent_kills,
            self.server_terms,
            self.server_kills,
            self.partitions,
            self.reloads
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_comes_within_one_cycle_and_restarts_stop_when_not_allowed() {
        let kinds: Vec<Fault> = (0..8).map(|n| nth(n, true)).collect();
        for kind in [
            Fault::AgentKill,
            Fault::ServerTerm,
            Fault::ServerKill,
            Fault::Partition,
            Fault::Reload,
        ] {
            assert!(kinds.contains(&kind), "{kind:?} missing");
        }
        assert!(
            (0..8)
                .map(|n| nth(n, false))
                .all(|f| !matches!(f, Fault::ServerTerm | Fault::ServerKill))
        );
    }
}
