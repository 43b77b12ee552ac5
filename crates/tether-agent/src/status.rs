//! `AgentStatus`: what the agent is doing right now (connected or not, why not, to which
//! server replicas), published on a `watch` channel for `/readyz`, `tether status` and tests.

use std::collections::BTreeMap;

/// A snapshot of the agent's connection state (also the body of the admin `GET /v1/status`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct AgentStatus {
    /// This process's random instance id (`X-Tether-Instance`).
    pub instance_id: String,
    /// Whether a session to the server (to at least one replica) is up.
    pub connected: bool,
    /// Every endpoint (server URL and address) discovered, by its display form.
    pub replicas: BTreeMap<String, ReplicaStatus>,
    /// Replicas that must be connected for the agent to be ready (`discovery.min_connected`).
    pub min_connected: usize,
    /// The local id of the current (or last) session: `<instance>.<n>`.
    pub session_id: Option<String>,
    /// The server's `X-Tether-Server` id of the current (or last) session.
    pub server_id: Option<String>,
    /// Failed connection attempts since the last session was established.
    pub attempts: u32,
    /// Sessions established since the process started.
    pub sessions: u64,
    /// The last connection failure or session end, for humans.
    pub last_error: Option<String>,
    /// A closed-set label of `last_error`: a `ConnectError::label` (`tcp`, `tls`, `http`,
    /// `protocol`, `timeout`) or `session_<end>` for a session that ended.
    pub last_error_kind: Option<&'static str>,
    /// Whether the agent is shutting down (no more attempts).
    pub stopping: bool,
    /// Why the activation gate keeps the agent idle; `None` while it is enabled.
    pub gate_disabled: Option<String>,
}

/// One discovered endpoint of the replica set.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ReplicaStatus {
    /// Whether a session through this endpoint is up.
    pub connected: bool,
    /// Whether the agent's placement holds (or seeks) a session here; with
    /// `placement.replicas_per_agent` unset, every discovered endpoint is placed.
    pub placed: bool,
    /// The replica's `X-Tether-Server` id, once it answered.
    pub server_id: Option<String>,
    /// Another endpoint that already holds a session to the same replica: this one stays idle
    /// while that session lives.
    pub duplicate_of: Option<String>,
    /// Failed attempts since its last session.
    pub attempts: u32,
    /// Its last failure or session end, for humans.
    pub last_error: Option<String>,
}

impl AgentStatus {
    /// Replicas with a session up.
    pub fn connected_replicas(&self) -> usize {
        self.replicas.values().filter(|r| r.connected).count()
    }

    /// The entry of endpoint `key`, created if missing.
    pub(crate) fn replica_mut(&mut self, key: &str) -> &mut ReplicaStatus {
        self.replicas.entry(key.to_owned()).or_default()
    }

    /// Recomputes `connected` from the replicas.
    pub(crate) fn recount(&mut self) {
        self.connected = self.connected_replicas() > 0;
    }

    /// Why the agent is not ready, or `None` when it is (`min_connected` replicas are up).
    /// A gated-off agent is ready: idle is its correct state (see [`idle_reason`](Self::idle_reason)).
    pub fn not_ready_reason(&self) -> Option<String> {
        if self.stopping {
            return Some("shutting down".to_owned());
        }
        if self.gate_disabled.is_some() {
            return None;
        }
        let connected = self.connected_replicas();
        let needed = self.min_connected.max(1);
        if self.connected && connected >= needed {
            return None;
        }
        if self.connected {
            return Some(format!(
                "{connected} of {} server replicas connected; {needed} needed",
                self.replicas.len()
            ));
        }
        Some(match self.last_error_kind {
            Some(kind) => format!(
                "not connected to the server (attempts: {}, last error: {kind})",
                self.attempts
            ),
            None => "not connected to the server yet".to_owned(),
        })
    }

    /// Why the agent is correctly idle (the activation gate is disabled), or `None`.
    pub fn idle_reason(&self) -> Option<String> {
        self.gate_disabled
            .as_ref()
            .map(|reason| format!("idle: activation gate disabled: {reason}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_replicas(connected: &[bool], min_connected: usize) -> AgentStatus {
        let mut status = AgentStatus {
            min_connected,
            ..AgentStatus::default()
        };
        for (i, up) in connected.iter().enumerate() {
            status.replica_mut(&format!("r{i}")).connected = *up;
        }
        status.recount();
        status
    }

    #[test]
    fn ready_once_min_connected_replicas_are_up() {
        assert_eq!(
            with_replicas(&[true, false, false], 1).not_ready_reason(),
            None
        );
        let reason = with_replicas(&[true, false, false], 2).not_ready_reason();
        assert_eq!(
            reason.as_deref(),
            Some("1 of 3 server replicas connected; 2 needed")
        );
        assert_eq!(
            with_replicas(&[true, true, false], 2).not_ready_reason(),
            None
        );
        let none = with_replicas(&[false, false], 1);
        assert!(!none.connected);
        assert!(
            none.not_ready_reason()
                .is_some_and(|r| r.starts_with("not connected to the server"))
        );
        // A closed gate is a correct idle state, replicas or not.
        let mut gated = with_replicas(&[false], 2);
        gated.gate_disabled = Some("role".into());
        assert_eq!(gated.not_ready_reason(), None);
    }
}
