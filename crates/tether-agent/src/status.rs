//! `AgentStatus`: what the agent is doing right now (connected or not, why not), published on a
//! `watch` channel for `/readyz`, `tether status` and tests.

/// A snapshot of the agent's connection state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentStatus {
    /// This process's random instance id (`X-Tether-Instance`).
    pub instance_id: String,
    /// Whether a session to the server is up.
    pub connected: bool,
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
}

impl AgentStatus {
    /// Why the agent is not ready, or `None` when it is (a session is up).
    pub fn not_ready_reason(&self) -> Option<String> {
        if self.connected {
            return None;
        }
        if self.stopping {
            return Some("shutting down".to_owned());
        }
        Some(match self.last_error_kind {
            Some(kind) => format!(
                "not connected to the server (attempts: {}, last error: {kind})",
                self.attempts
            ),
            None => "not connected to the server yet".to_owned(),
        })
    }
}
