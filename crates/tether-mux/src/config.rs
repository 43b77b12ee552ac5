//! Session settings: windows, frame sizes, stream caps and timers.

use std::time::Duration;

/// The least `max_data` the decoder is configured with, whatever [`MuxConfig::max_data`] says;
/// enough for the largest control frame.
pub const MIN_DECODE_DATA: u32 = 1024;

/// Which end of the session this is; it decides the parity of the stream ids it opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The server opens odd stream ids.
    Server,
    /// The agent opens even stream ids.
    Agent,
}

impl Role {
    /// The first id this role opens.
    pub(crate) fn first_id(self) -> u64 {
        match self {
            Role::Server => 1,
            Role::Agent => 2,
        }
    }

    /// Whether `id` has the parity of streams the *peer* opens.
    pub(crate) fn is_peer_id(self, id: u64) -> bool {
        match self {
            Role::Server => id % 2 == 0,
            Role::Agent => id % 2 == 1,
        }
    }
}

/// Settings of one session. Every queue and buffer is bounded by one of these.
#[derive(Debug, Clone)]
pub struct MuxConfig {
    /// Receive window per stream: the most bytes buffered for one stream (default 256 KiB).
    pub window: u32,
    /// Largest DATA payload sent and accepted (default 64 KiB).
    pub max_data: u32,
    /// Most streams open at once on the session, both directions together (default 1024).
    pub max_streams: usize,
    /// Most inbound OPENs waiting for the application to accept them (default 128).
    pub accept_backlog: usize,
    /// Frames queued towards the transport before stream writers wait (default 64).
    pub write_queue: usize,
    /// Most control frames (WINDOW, PONG, RST...) queued before new ones are dropped (default 4096).
    pub max_control_queue: usize,
    /// How often to PING the peer (default 15 s).
    pub ping_interval: Duration,
    /// A session with no frame received for this long is dead (default 45 s).
    pub idle_timeout: Duration,
    /// How often to send SYNC; `None` disables it (default 60 s).
    pub sync_interval: Option<Duration>,
    /// Dial timeout sent in OPEN frames this side sends (default 10 s).
    pub dial_timeout: Duration,
    /// Extra time an opener waits for OPEN_OK beyond the dial timeout (default 5 s).
    pub open_grace: Duration,
    /// Read bytes returned to the peer as WINDOW once this many accumulate; `None` means a
    /// quarter window (the default). The remotedialer mapping sets it low, because it derives
    /// Pause/Resume from the unreturned bytes.
    pub window_update: Option<u32>,
    /// Largest receive window a stream's window grows to when its sender is window-limited
    /// over about a round trip (bandwidth-delay probing; default 16 MiB). `window` or less
    /// turns the growth off.
    pub max_window: u32,
    /// Most bytes of receive window granted on one session, all streams together, beyond
    /// which no stream's window grows (default 32 MiB). New streams always get `window`.
    pub window_budget: u64,
    /// Bytes this side offers to accept on a stream the peer opens, after its OPEN and
    /// before this side's OPEN_OK (the one-round-trip open; default 64 KiB, at most
    /// `window`; 0 offers nothing). Only used once negotiated ([`Self::negotiate`]).
    pub early_data: u32,
    /// What the peer accepts before its OPEN_OK on streams this side opens: `Some` only once
    /// both sides offered the capability in the handshake. `None` (the default) is tether.v1
    /// as first specified: DATA waits for OPEN_OK.
    pub peer_early_data: Option<u32>,
    /// Accept DATA up to the window on a stream the peer opens before this side's OPEN_OK,
    /// without the capability (default false: such DATA is RST `flow_control`). The
    /// remotedialer mapping sets it: Go sends data right after its Connect, and the mapping
    /// delivers it before the application has accepted the stream.
    pub data_before_accept: bool,
}

impl Default for MuxConfig {
    fn default() -> Self {
        Self {
            window: 256 * 1024,
            max_data: tether_proto::codec::DEFAULT_MAX_DATA,
            max_streams: 1024,
            accept_backlog: 128,
            write_queue: 64,
            max_control_queue: 4096,
            ping_interval: Duration::from_secs(15),
            idle_timeout: Duration::from_secs(45),
            sync_interval: Some(Duration::from_secs(60)),
            dial_timeout: Duration::from_secs(10),
            open_grace: Duration::from_secs(5),
            window_update: None,
            max_window: 16 * 1024 * 1024,
            window_budget: 32 * 1024 * 1024,
            early_data: 64 * 1024,
            peer_early_data: None,
            data_before_accept: false,
        }
    }
}

impl MuxConfig {
    /// The capabilities this side offers in the handshake.
    pub fn offer(&self) -> tether_proto::Caps {
        let early = self.early_data.min(self.window);
        tether_proto::Caps {
            early_data: (early > 0).then_some(early),
        }
    }

    /// This configuration after the handshake in which the peer offered `peer` (and this side
    /// offered [`Self::offer`]): the one-round-trip open is on when both offered it.
    pub fn negotiate(mut self, peer: &tether_proto::Caps) -> Self {
        self.peer_early_data = match (self.offer().early_data, peer.early_data) {
            (Some(_), Some(theirs)) => Some(theirs),
            _ => None,
        };
        self
    }

    /// Bytes accepted before OPEN_OK on a stream the peer opens (0 unless negotiated).
    pub(crate) fn accept_early(&self) -> u64 {
        match self.peer_early_data {
            Some(_) => u64::from(self.early_data.min(self.window)),
            None if self.data_before_accept => u64::from(self.window),
            None => 0,
        }
    }

    /// The decoder limits matching this configuration.
    ///
    /// The decoder's message limit is derived from `max_data`, so it never goes below
    /// [`MIN_DECODE_DATA`]: a small `max_data` must not make OPEN, OPEN_ERR or RST frames
    /// (up to about 540 bytes) undecodable. DATA over `max_data` is still refused, by the
    /// session.
    pub fn limits(&self) -> tether_proto::Limits {
        tether_proto::Limits {
            max_data: self.max_data.max(MIN_DECODE_DATA),
        }
    }
}
