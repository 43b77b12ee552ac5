//! The `session:` section shared by both daemons' configs: windows, frame size, stream cap and
//! keepalive timers of the multiplexed tunnel session.

use serde::{Deserialize, Serialize};

use crate::config_error::ConfigErrors;
use crate::duration::HumanDuration;

/// Initial read buffer of a session's WebSocket (both daemons). tungstenite's default is
/// 128 KiB, zero-filled on the first read, so every idle session kept 128 KiB resident in each
/// daemon. A TLS record carries at most 16 KiB, so reads of more gain little; a larger frame
/// grows the buffer while it arrives.
pub const WS_READ_BUFFER: usize = 16 * 1024;

/// Settings of each tunnel session (see DESIGN.md section 3).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SessionSettings {
    /// Receive window per stream, bytes.
    pub window: u32,
    /// Largest DATA payload, bytes.
    pub max_frame: u32,
    /// Most streams open at once on one session.
    pub max_streams: usize,
    /// How often to ping the peer.
    pub ping_interval: HumanDuration,
    /// A session silent for this long is dead.
    pub idle_timeout: HumanDuration,
    /// How often to send SYNC reconciliation.
    pub sync_interval: HumanDuration,
    /// Largest receive window a stream's window grows to on a long, fat path, bytes
    /// (`window` or less turns the growth off).
    pub max_window: u32,
    /// Most receive window granted on one session, all streams together, beyond which no
    /// window grows, bytes.
    pub window_budget: u64,
    /// Bytes accepted on a stream the peer opens before this side's OPEN_OK (the
    /// one-round-trip open, offered in the handshake; 0 turns it off).
    pub early_data: u32,
}

impl Default for SessionSettings {
    fn default() -> Self {
        Self {
            window: 256 * 1024,
            max_frame: 64 * 1024,
            max_streams: 1024,
            ping_interval: HumanDuration::secs(15),
            idle_timeout: HumanDuration::secs(45),
            sync_interval: HumanDuration::secs(60),
            max_window: 16 * 1024 * 1024,
            window_budget: 32 * 1024 * 1024,
            early_data: 64 * 1024,
        }
    }
}

impl SessionSettings {
    /// Adds every problem to `errors`, with key paths under `prefix`.
    pub fn validate(&self, prefix: &str, errors: &mut ConfigErrors) {
        if !(16 * 1024..=64 * 1024 * 1024).contains(&self.window) {
            errors.push(
                format!("{prefix}.window"),
                format!("{} is outside 16384..=67108864 bytes", self.window),
            );
        }
        if !(1024..=1024 * 1024).contains(&self.max_frame) {
            errors.push(
                format!("{prefix}.max_frame"),
                format!("{} is outside 1024..=1048576 bytes", self.max_frame),
            );
        }
        if self.max_window > 1024 * 1024 * 1024 {
            errors.push(
                format!("{prefix}.max_window"),
                format!("{} is over 1073741824 bytes", self.max_window),
            );
        }
        if self.early_data > self.window {
            errors.push(
                format!("{prefix}.early_data"),
                format!("{} is over window ({})", self.early_data, self.window),
            );
        }
        if self.max_streams == 0 || self.max_streams > 1_000_000 {
            errors.push(
                format!("{prefix}.max_streams"),
                format!("{} is outside 1..=1000000", self.max_streams),
            );
        }
        if self.ping_interval.0.is_zero() {
            errors.push(format!("{prefix}.ping_interval"), "must be above zero");
        }
        if self.idle_timeout.0 <= self.ping_interval.0 {
            errors.push(
                format!("{prefix}.idle_timeout"),
                format!(
                    "{} must be longer than ping_interval ({})",
                    self.idle_timeout, self.ping_interval
                ),
            );
        }
    }
}
