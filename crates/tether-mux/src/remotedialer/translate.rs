//! The sans-IO heart of the remotedialer mode: a table of connections that turns remotedialer
//! messages into the tether.v1 frames the multiplexer understands, and the multiplexer's frames
//! into remotedialer messages (optimistic dial, `EOF` close once both directions are done,
//! Pause/Resume from buffered bytes, SyncConnections and safe reaping).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tether_proto::remotedialer::{EOF_MESSAGE, MAX_CONNECT_LEN, RdMessage, msg_type};
use tether_proto::{Frame, OpenErrorCode, ProtoError, ResetCode, StreamId, TargetAddr};
use tokio::time::Instant;
use tracing::debug;

use super::error_text;
use crate::config::Role;

/// Settings of the remotedialer mapping.
#[derive(Debug, Clone)]
pub struct RdSettings {
    /// Send Pause once more than this many received bytes wait unread (Go: 2 MiB).
    pub pause_above: u64,
    /// Send Resume once the unread bytes drop below this (Go: 256 KiB).
    pub resume_below: u64,
    /// Bytes the local writer may have in flight before the mapping hands credit back: the
    /// most that can follow a peer's Pause (default 256 KiB).
    pub send_credit: u32,
    /// Largest DATA frame handed to the multiplexer; larger remotedialer Data is split.
    pub max_data: u32,
    /// Most connections in the table at once.
    pub max_conns: usize,
    /// As a server, connections younger than this are never reaped by SyncConnections (the
    /// client's list may predate their Connect).
    pub sync_grace: Duration,
    /// Dial timeout passed to the multiplexer for the peer's Connects (Go: 15 s legacy value).
    pub dial_timeout: Duration,
    /// After the peer's `EOF`, how long the local side may take to finish before the stream is
    /// reset (the peer has forgotten the connection; nothing else would end it). Likewise, on
    /// the server, after the local side's FIN, how long the peer may take to close before the
    /// connection is ended with `EOF` (no half-close exists to tell the peer).
    pub close_linger: Duration,
}

impl Default for RdSettings {
    fn default() -> Self {
        Self {
            pause_above: 2 * 1024 * 1024,
            resume_below: 256 * 1024,
            send_credit: 256 * 1024,
            max_data: tether_proto::codec::DEFAULT_MAX_DATA,
            max_conns: 1024,
            sync_grace: Duration::from_secs(10),
            dial_timeout: Duration::from_secs(15),
            close_linger: Duration::from_secs(30),
        }
    }
}

/// One virtual connection, both directions tracked apart.
#[derive(Debug)]
struct Conn {
    stream: StreamId,
    created: Instant,
    /// Local -> peer: the multiplexer sent FIN.
    local_fin: bool,
    /// When the multiplexer sent FIN.
    local_fin_at: Option<Instant>,
    /// When the peer last sent Data (or was resumed).
    last_rx: Instant,
    /// The peer has sent Data: its dial succeeded, an Error now is not a failed dial.
    peer_sent: bool,
    /// Local -> peer: the peer asked us to pause.
    peer_paused_us: bool,
    /// Local -> peer: credit withheld from the local writer while paused.
    owed: u64,
    /// Peer -> local: the peer closed (Error `EOF`); FIN was handed to the multiplexer.
    remote_done: bool,
    /// When the peer's `EOF` arrived.
    remote_done_at: Option<Instant>,
    /// Peer -> local: bytes handed to the multiplexer and not yet returned by WINDOW.
    unread: u64,
    /// Peer -> local: we asked the peer to pause.
    we_paused_peer: bool,
}

/// Counters of one session's mapping, shared with whoever keeps a handle (tests, logs).
#[derive(Debug, Default)]
pub struct RdCounters {
    /// Pause messages sent.
    pub pauses_sent: AtomicU64,
    /// Resume messages sent.
    pub resumes_sent: AtomicU64,
    /// Pause messages received.
    pub pauses_received: AtomicU64,
    /// Messages for unknown connection ids that were ignored.
    pub strays_ignored: AtomicU64,
    /// Connections reaped by SyncConnections.
    pub reaped: AtomicU64,
    /// Messages that failed to decode.
    pub malformed: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// The translation table of one session.
#[derive(Debug)]
pub struct Translator {
    role: Role,
    settings: RdSettings,
    conns: HashMap<u64, Conn>,
    by_stream: HashMap<StreamId, u64>,
    /// Server: the last connection id handed out (the first is 2, as in Go).
    last_conn: u64,
    /// Client: the next multiplexer stream id for a peer Connect (the peer is the "server").
    next_peer_stream: StreamId,
    /// When [`tick`](Self::tick) last ran.
    last_tick: Option<Instant>,
    /// Frames for the multiplexer, in order.
    pub to_mux: VecDeque<Frame>,
    /// Messages for the wire, in order.
    pub to_wire: VecDeque<RdMessage>,
    /// Counters.
    pub counters: Arc<RdCounters>,
}

impl Translator {
    /// A table for the side `role` of the session.
    pub fn new(role: Role, settings: RdSettings) -> Self {
        Self {
            role,
            settings,
            conns: HashMap::new(),
            by_stream: HashMap::new(),
            last_conn: 1,
            next_peer_stream: 1,
            last_tick: None,
            to_mux: VecDeque::new(),
            to_wire: VecDeque::new(),
            counters: Arc::default(),
        }
    }

    /// Live connection ids, ascending.
    pub fn conn_ids(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self.conns.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    fn remove(&mut self, conn: u64) {
        if let Some(c) = self.conns.remove(&conn) {
            self.by_stream.remove(&c.stream);
        }
    }

    fn stray(&mut self, what: &str, conn: u64) {
        bump(&self.counters.strays_ignored);
        debug!(
            conn,
            what, "remotedialer message for an unknown connection ignored"
        );
    }

    // === wire -> multiplexer ===

    /// Applies one message from the peer.
    pub fn from_wire(&mut self, message: RdMessage, now: Instant) {
        match message {
            RdMessage::Data { conn, payload } => self.wire_data(conn, payload, now),
            RdMessage::Connect {
                conn,
                proto,
                address,
            } => self.wire_connect(conn, &proto, &address, now),
            RdMessage::Error { conn, message } => self.wire_error(conn, &message, now),
            RdMessage::Pause { conn } => match self.conns.get_mut(&conn) {
                Some(c) => {
                    bump(&self.counters.pauses_received);
                    c.peer_paused_us = true;
                }
                None => self.stray("Pause", conn),
            },
            RdMessage::Resume { conn } => match self.conns.get_mut(&conn) {
                Some(c) => {
                    c.peer_paused_us = false;
                    let owed = std::mem::take(&mut c.owed);
                    let stream = c.stream;
                    self.grant(stream, owed);
                }
                None => self.stray("Resume", conn),
            },
            RdMessage::SyncConnections { mut conns } => {
                if self.role == Role::Server {
                    conns.sort_unstable();
                    self.reap(&conns, now);
                }
            }
            // Peer-session announcements and types we do not know: ignored, as Go does.
            RdMessage::AddClient { .. }
            | RdMessage::RemoveClient { .. }
            | RdMessage::Unknown { .. } => {}
        }
    }

    /// Applies a message that failed to decode: only its connection suffers, never the session.
    pub fn from_wire_malformed(&mut self, err: &ProtoError) {
        bump(&self.counters.malformed);
        let Some(conn) = err.stream.filter(|c| *c != 0) else {
            debug!(error = %err, "undecodable remotedialer message ignored");
            return;
        };
        let is_connect = err.frame_type.map(i64::from) == Some(msg_type::CONNECT);
        if let Some(c) = self.conns.get(&conn) {
            let stream = c.stream;
            self.to_mux.push_back(Frame::Rst {
                stream,
                code: ResetCode::Protocol,
                message: err.kind.to_string(),
            });
            self.to_wire
                .push_back(RdMessage::error(conn, &err.kind.to_string()));
            self.remove(conn);
        } else if is_connect && self.role == Role::Agent {
            self.to_wire
                .push_back(RdMessage::error(conn, &err.kind.to_string()));
        } else {
            debug!(conn, error = %err, "undecodable remotedialer message ignored");
        }
    }

    fn wire_data(&mut self, conn: u64, payload: Bytes, now: Instant) {
        let max = self.settings.max_data.max(1) as usize;
        let pause_above = self.settings.pause_above;
        let Some(c) = self.conns.get_mut(&conn) else {
            self.stray("Data", conn);
            return;
        };
        if c.remote_done {
            return;
        }
        c.last_rx = now;
        c.peer_sent = true;
        c.unread += payload.len() as u64;
        let mut rest = payload;
        while !rest.is_empty() {
            let chunk = rest.split_to(rest.len().min(max));
            self.to_mux.push_back(Frame::Data {
                stream: c.stream,
                payload: chunk,
            });
        }
        if c.unread > pause_above && !c.we_paused_peer {
            c.we_paused_peer = true;
            bump(&self.counters.pauses_sent);
            self.to_wire.push_back(RdMessage::Pause { conn });
        }
    }

    fn wire_connect(&mut self, conn: u64, proto: &str, address: &str, now: Instant) {
        if self.role == Role::Server {
            // Client-initiated dials (Go's optional ClientConnectAuthorizer) are not offered.
            self.to_wire
                .push_back(RdMessage::error(conn, "connect not allowed"));
            return;
        }
        if conn == 0 || self.conns.contains_key(&conn) {
            debug!(
                conn,
                "remotedialer Connect for a connection id in use ignored"
            );
            return;
        }
        if self.conns.len() >= self.settings.max_conns {
            self.to_wire.push_back(RdMessage::error(
                conn,
                "too many connections on this session",
            ));
            return;
        }
        if proto != "tcp" {
            self.to_wire.push_back(RdMessage::error(
                conn,
                &format!("unsupported protocol {proto:?} (only tcp)"),
            ));
            return;
        }
        let target = match TargetAddr::parse_host_port(address) {
            Ok(target) => target,
            Err(err) => {
                self.to_wire
                    .push_back(RdMessage::error(conn, &format!("bad address: {err}")));
                return;
            }
        };
        let stream = self.next_peer_stream;
        self.next_peer_stream += 2;
        self.insert(conn, stream, now);
        self.to_mux.push_back(Frame::Open {
            stream,
            window: self.settings.send_credit,
            timeout_ms: u32::try_from(self.settings.dial_timeout.as_millis()).unwrap_or(u32::MAX),
            target,
        });
    }

    fn wire_error(&mut self, conn: u64, message: &str, now: Instant) {
        let Some(c) = self.conns.get_mut(&conn) else {
            // 2-3 Errors per close are normal from a Go peer.
            self.stray("Error", conn);
            return;
        };
        let stream = c.stream;
        if c.remote_done {
            // The peer forgot the connection at its EOF: what follows is Go's echo and its
            // pipe's socket error, strays by now.
            self.stray("Error after EOF", conn);
            return;
        }
        if message == EOF_MESSAGE {
            c.remote_done = true;
            c.remote_done_at = Some(now);
            self.to_mux.push_back(Frame::Fin { stream });
            if c.local_fin {
                self.to_wire.push_back(RdMessage::error(conn, EOF_MESSAGE));
                self.remove(conn);
            }
        } else {
            // A server's Connect that the peer never answered with Data and now fails reads
            // as its dial's failure: a refusal with the code of Go's words (counted `refused`).
            let dial_code = (self.role == Role::Server && !c.peer_sent)
                .then(|| error_text::dial_error_code(message))
                .flatten();
            self.to_mux.push_back(match dial_code {
                Some(code) => Frame::OpenErr {
                    stream,
                    code,
                    message: message.to_owned(),
                },
                None => Frame::Rst {
                    stream,
                    code: error_text::reset_code(message),
                    message: message.to_owned(),
                },
            });
            self.remove(conn);
        }
    }

    fn reap(&mut self, listed: &[u64], now: Instant) {
        let grace = self.settings.sync_grace;
        let stale: Vec<u64> = self
            .conns
            .iter()
            .filter(|(id, c)| {
                listed.binary_search(id).is_err() && now.duration_since(c.created) >= grace
            })
            .map(|(id, _)| *id)
            .collect();
        for conn in stale {
            if let Some(c) = self.conns.get(&conn) {
                self.to_mux.push_back(Frame::Rst {
                    stream: c.stream,
                    code: ResetCode::Cancelled,
                    message: "sync from client".into(),
                });
            }
            bump(&self.counters.reaped);
            self.remove(conn);
        }
    }

    fn insert(&mut self, conn: u64, stream: StreamId, now: Instant) {
        self.conns.insert(
            conn,
            Conn {
                stream,
                created: now,
                local_fin: false,
                peer_sent: false,
                local_fin_at: None,
                last_rx: now,
                peer_paused_us: false,
                owed: 0,
                remote_done: false,
                remote_done_at: None,
                unread: 0,
                we_paused_peer: false,
            },
        );
        self.by_stream.insert(stream, conn);
    }

    fn grant(&mut self, stream: StreamId, mut amount: u64) {
        while amount > 0 {
            let increment = amount.min(u64::from(u32::MAX));
            amount -= increment;
            self.to_mux.push_back(Frame::Window {
                stream,
                increment: increment as u32,
            });
        }
    }

    /// Runs [`tick`](Self::tick) if it has not run for a second (called on every message).
    pub fn maybe_tick(&mut self, now: Instant) {
        if self
            .last_tick
            .is_none_or(|at| now.duration_since(at) >= Duration::from_secs(1))
        {
            self.tick(now);
        }
    }

    /// Housekeeping, run on every keepalive tick: connections the peer closed whose local side
    /// did not finish within `close_linger` are reset.
    pub fn tick(&mut self, now: Instant) {
        self.last_tick = Some(now);
        let linger = self.settings.close_linger;
        let expired: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                c.remote_done_at
                    .is_some_and(|at| now.duration_since(at) >= linger)
            })
            .map(|(id, _)| *id)
            .collect();
        for conn in expired {
            if let Some(c) = self.conns.get(&conn) {
                self.to_mux.push_back(Frame::Rst {
                    stream: c.stream,
                    code: ResetCode::Cancelled,
                    message: "peer closed the connection (remotedialer has no half-close)".into(),
                });
            }
            self.remove(conn);
        }
        let unanswered: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                // Idle since our FIN, and nothing waiting for a slow local reader.
                !c.remote_done
                    && !c.we_paused_peer
                    && c.local_fin_at
                        .is_some_and(|at| now.duration_since(at.max(c.last_rx)) >= linger)
            })
            .map(|(id, _)| *id)
            .collect();
        for conn in unanswered {
            if let Some(c) = self.conns.get(&conn) {
                self.to_mux.push_back(Frame::Rst {
                    stream: c.stream,
                    code: ResetCode::Cancelled,
                    message: "the peer did not close after our half-close (remotedialer has \
                              no half-close)"
                        .into(),
                });
            }
            self.to_wire.push_back(RdMessage::error(conn, EOF_MESSAGE));
            self.remove(conn);
        }
    }

    // === multiplexer -> wire ===

    /// Applies one frame the multiplexer wants to send.
    pub fn from_mux(&mut self, frame: Frame, now: Instant) {
        match frame {
            Frame::Open { stream, target, .. } => self.mux_open(stream, &target, now),
            Frame::OpenOk { .. } => {
                // No acknowledgement exists in remotedialer: the peer already assumed success.
            }
            Frame::OpenErr {
                stream,
                code,
                message,
            } => {
                if let Some(conn) = self.by_stream.get(&stream).copied() {
                    let text = error_text::refusal_text(code, &message);
                    self.to_wire.push_back(RdMessage::error(conn, &text));
                    self.remove(conn);
                }
            }
            Frame::Data { stream, payload } => self.mux_data(stream, payload),
            Frame::Window { stream, increment } => self.mux_window(stream, increment, now),
            Frame::Fin { stream } => {
                let Some(conn) = self.by_stream.get(&stream).copied() else {
                    return;
                };
                let Some(c) = self.conns.get_mut(&conn) else {
                    return;
                };
                c.local_fin = true;
                c.local_fin_at = Some(now);
                if c.remote_done {
                    self.to_wire.push_back(RdMessage::error(conn, EOF_MESSAGE));
                    self.remove(conn);
                } else if self.role == Role::Agent {
                    // The target finished sending. Like Go's agent, the connection closes now:
                    // the server side decides when its consumer is done, the target side does
                    // not wait for a half-close that the protocol cannot carry.
                    self.to_wire.push_back(RdMessage::error(conn, EOF_MESSAGE));
                    self.to_mux.push_back(Frame::Fin { stream });
                    self.remove(conn);
                }
            }
            Frame::Rst {
                stream,
                code,
                message,
            } => {
                if let Some(conn) = self.by_stream.get(&stream).copied() {
                    let text = if message.is_empty() {
                        format!("stream reset ({})", code.label())
                    } else {
                        message
                    };
                    self.to_wire.push_back(RdMessage::error(conn, &text));
                    self.remove(conn);
                }
            }
            Frame::Sync { .. } => {
                // Only a client sends SyncConnections: a Go client would reap on receipt.
                if self.role == Role::Agent {
                    self.to_wire.push_back(RdMessage::SyncConnections {
                        conns: self.conn_ids(),
                    });
                }
            }
            // PING is carried as a WebSocket ping by the transport; the rest has no equivalent.
            Frame::Ping { .. }
            | Frame::Pong { .. }
            | Frame::GoAway { .. }
            | Frame::Unknown { .. } => {}
        }
    }

    fn mux_open(&mut self, stream: StreamId, target: &TargetAddr, now: Instant) {
        let refuse = |this: &mut Self, code: OpenErrorCode, message: String| {
            this.to_mux.push_back(Frame::OpenErr {
                stream,
                code,
                message,
            });
        };
        if self.role == Role::Agent {
            refuse(
                self,
                OpenErrorCode::Unsupported,
                "a remotedialer client cannot open connections".into(),
            );
            return;
        }
        if self.conns.len() >= self.settings.max_conns {
            refuse(
                self,
                OpenErrorCode::Limit,
                "too many connections on this session".into(),
            );
            return;
        }
        let address = target.to_string();
        if 4 + address.len() > MAX_CONNECT_LEN {
            refuse(
                self,
                OpenErrorCode::Unsupported,
                format!("target longer than the {MAX_CONNECT_LEN} bytes remotedialer accepts"),
            );
            return;
        }
        self.last_conn += 1;
        let conn = self.last_conn;
        self.insert(conn, stream, now);
        self.to_wire.push_back(RdMessage::Connect {
            conn,
            proto: "tcp".into(),
            address,
        });
        // Optimistic dial: the stream is open now; a failure arrives later as an Error.
        self.to_mux.push_back(Frame::OpenOk {
            stream,
            window: self.settings.send_credit,
        });
    }

    fn mux_data(&mut self, stream: StreamId, payload: Bytes) {
        let len = payload.len() as u64;
        let Some(conn) = self.by_stream.get(&stream).copied() else {
            return;
        };
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if c.remote_done {
            // The peer closed its side: no half-close in remotedialer, so these bytes have no
            // reader. Credit goes back so the local writer is never stuck.
            self.grant(stream, len);
            return;
        }
        self.to_wire.push_back(RdMessage::Data { conn, payload });
        if c.peer_paused_us {
            c.owed += len;
        } else {
            self.grant(stream, len);
        }
    }

    fn mux_window(&mut self, stream: StreamId, increment: u32, now: Instant) {
        let resume_below = self.settings.resume_below;
        let Some(conn) = self.by_stream.get(&stream).copied() else {
            return;
        };
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        c.unread = c.unread.saturating_sub(u64::from(increment));
        if c.we_paused_peer && c.unread < resume_below {
            c.we_paused_peer = false;
            // The peer's silence while paused was ours: the linger starts over.
            c.last_rx = now;
            bump(&self.counters.resumes_sent);
            self.to_wire.push_back(RdMessage::Resume { conn });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window_total(frames: &VecDeque<Frame>) -> u64 {
        frames
            .iter()
            .map(|f| match f {
                Frame::Window { increment, .. } => u64::from(*increment),
                _ => 0,
            })
            .sum()
    }

    /// Go's flaw 1: one flag for both directions. Here each direction keeps its own state.
    #[test]
    fn pause_states_of_the_two_directions_are_independent() {
        let now = Instant::now();
        let mut t = Translator::new(Role::Agent, RdSettings::default());
        t.from_wire(
            RdMessage::Connect {
                conn: 2,
                proto: "tcp".into(),
                address: "127.0.0.1:1".into(),
            },
            now,
        );
        let Some(Frame::Open { stream, .. }) = t.to_mux.pop_front() else {
            panic!("expected OPEN");
        };
        // Our receive side fills up: we pause the peer...
        for _ in 0..70 {
            t.from_wire(
                RdMessage::Data {
                    conn: 2,
                    payload: Bytes::from(vec![0u8; 32 * 1024]),
                },
                now,
            );
        }
        assert_eq!(t.to_wire.pop_front(), Some(RdMessage::Pause { conn: 2 }));
        t.to_mux.clear();
        // ...and our own sending is not held back by it.
        t.from_mux(
            Frame::Data {
                stream,
                payload: Bytes::from_static(b"abc"),
            },
            now,
        );
        assert!(matches!(
            t.to_wire.pop_front(),
            Some(RdMessage::Data { .. })
        ));
        assert_eq!(window_total(&t.to_mux), 3);
        t.to_mux.clear();
        // The peer pauses us: credit is withheld, not our Resume logic.
        t.from_wire(RdMessage::Pause { conn: 2 }, now);
        t.from_mux(
            Frame::Data {
                stream,
                payload: Bytes::from_static(b"defg"),
            },
            now,
        );
        t.to_wire.clear();
        assert_eq!(window_total(&t.to_mux), 0);
        // Our reader drains: Resume goes out although the peer still pauses us.
        t.from_mux(
            Frame::Window {
                stream,
                increment: 70 * 32 * 1024,
            },
            now,
        );
        assert_eq!(t.to_wire.pop_front(), Some(RdMessage::Resume { conn: 2 }));
        assert_eq!(window_total(&t.to_mux), 0);
        // The peer resumes us: the withheld credit comes back at once.
        t.from_wire(RdMessage::Resume { conn: 2 }, now);
        assert_eq!(window_total(&t.to_mux), 4);
        assert_eq!(t.counters.pauses_sent.load(Ordering::Relaxed), 1);
        assert_eq!(t.counters.resumes_sent.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn server_connect_ids_start_at_two_and_every_target_fits_go_limit() {
        let now = Instant::now();
        let mut t = Translator::new(Role::Server, RdSettings::default());
        let target: TargetAddr = "127.0.0.1:7007".parse().unwrap_or_else(|_| unreachable!());
        t.from_mux(
            Frame::Open {
                stream: 1,
                window: 1,
                timeout_ms: 1,
                target: target.clone(),
            },
            now,
        );
        assert_eq!(
            t.to_wire.pop_front(),
            Some(RdMessage::Connect {
                conn: 2,
                proto: "tcp".into(),
                address: "127.0.0.1:7007".into(),
            })
        );
        assert!(matches!(
            t.to_mux.pop_front(),
            Some(Frame::OpenOk { stream: 1, .. })
        ));
        // The longest target tether accepts (a 255-byte host) still fits Go's 266 bytes.
        let long: TargetAddr = format!("{}:65535", "a".repeat(255))
            .parse()
            .unwrap_or_else(|_| unreachable!());
        t.from_mux(
            Frame::Open {
                stream: 3,
                window: 1,
                timeout_ms: 1,
                target: long,
            },
            now,
        );
        assert!(matches!(
            t.to_wire.pop_front(),
            Some(RdMessage::Connect { conn: 3, .. })
        ));
    }
}
