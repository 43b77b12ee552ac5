//! Session-level control: PING and PONG (round-trip time), the keepalive and idle timers,
//! SYNC (reaping streams the peer no longer knows), and GOAWAY.

use std::io;

use tether_proto::{Frame, GoAwayCode, StreamId};

use super::conn::Conn;
use super::event::Event;
use super::stream::StreamFailure;
use super::time::Time;
use crate::error::{OpenError, SessionEnd};
use crate::metrics::CloseReason;

/// Most unanswered pings remembered for RTT measurement.
const MAX_PENDING_PINGS: usize = 16;

impl Conn {
    /// Sends a PING; its outcome comes as [`Event::Pong`] with the returned nonce.
    pub(crate) fn ping(&mut self, now: Time) -> Result<u64, OpenError> {
        if self.end.is_some() {
            return Err(OpenError::SessionClosed);
        }
        Ok(self.send_ping(now))
    }

    /// Measures the round trip with a PING of our own unless one is in flight already.
    pub(super) fn probe_rtt(&mut self, now: Time) {
        if self.ctl.pings.is_empty() && self.end.is_none() {
            self.send_ping(now);
        }
    }

    fn send_ping(&mut self, now: Time) -> u64 {
        let nonce = self.ctl.next_nonce;
        self.ctl.next_nonce = self.ctl.next_nonce.wrapping_add(1);
        if self.ctl.pings.len() >= MAX_PENDING_PINGS
            && let Some((forgotten, _)) = self.ctl.pings.pop_front()
        {
            self.events.push_back(Event::Pong {
                nonce: forgotten,
                rtt: None,
            });
        }
        self.ctl.pings.push_back((nonce, now));
        self.push_control(Frame::Ping { nonce });
        nonce
    }

    /// Forgets every ping in flight (the session ended).
    pub(super) fn forget_pings(&mut self) {
        for (nonce, _) in self.ctl.pings.drain(..) {
            self.events.push_back(Event::Pong { nonce, rtt: None });
        }
    }

    /// PONG from the peer.
    pub(super) fn on_pong(&mut self, nonce: u64, now: Time) {
        if let Some(pos) = self.ctl.pings.iter().position(|(n, _)| *n == nonce)
            && let Some((_, sent)) = self.ctl.pings.remove(pos)
        {
            let rtt = now.since(sent);
            self.ctl.rtt = Some(rtt);
            self.events.push_back(Event::Pong {
                nonce,
                rtt: Some(rtt),
            });
        }
    }

    /// Sends GOAWAY: this side takes no new streams; existing ones carry on.
    pub(crate) fn goaway(&mut self, code: GoAwayCode, message: &str) {
        if self.ctl.local_goaway || self.end.is_some() {
            return;
        }
        self.ctl.local_goaway = true;
        self.push_control(Frame::GoAway {
            code,
            message: message.to_owned(),
        });
    }

    /// When [`Self::handle_timeout`] must run next: the earliest of the idle deadline, the
    /// next PING and the next SYNC. Frames arriving move the idle deadline later only, so a
    /// shell may keep a timer armed at an earlier value and just call again when it fires.
    pub(crate) fn poll_timeout(&self) -> Time {
        let c = &self.config;
        let mut next =
            (self.ctl.last_rx + c.idle_timeout).min(self.ctl.last_ping + c.ping_interval);
        if let Some(every) = c.sync_interval {
            next = next.min(self.ctl.last_sync + every);
        }
        next
    }

    /// Runs the timers due at `now`: ends the session after `idle_timeout` without a frame,
    /// sends PING every `ping_interval` and SYNC every `sync_interval`.
    pub(crate) fn handle_timeout(&mut self, now: Time) -> Result<(), SessionEnd> {
        if now.since(self.ctl.last_rx) >= self.config.idle_timeout {
            return Err(SessionEnd::IdleTimeout);
        }
        if now.since(self.ctl.last_ping) >= self.config.ping_interval {
            self.ctl.last_ping = now;
            self.send_ping(now);
        }
        if let Some(every) = self.config.sync_interval
            && now.since(self.ctl.last_sync) >= every
        {
            self.ctl.last_sync = now;
            let sync = self.sync_frame();
            let fits =
                tether_proto::codec::encoded_len(&sync) <= self.config.limits().max_message_len();
            if fits {
                self.push_control(sync);
            }
        }
        Ok(())
    }

    /// The SYNC this side would send now: the highest peer id seen, and our live streams.
    pub(crate) fn sync_frame(&self) -> Frame {
        let mut open: Vec<StreamId> = self
            .streams
            .iter()
            .filter(|(_, slot)| slot.is_live())
            .map(|(id, _)| id)
            .collect();
        open.sort_unstable();
        Frame::Sync {
            high: self.max_peer_id,
            open,
        }
    }

    /// SYNC from the peer: fails our streams up to `high` that the peer does not list.
    pub(super) fn on_sync(&mut self, high: StreamId, open: &[StreamId]) {
        let stale: Vec<StreamId> = self
            .streams
            .iter()
            .filter(|(id, slot)| {
                // A stream finished both ways is legitimately gone from the peer's list;
                // resetting it here would throw away bytes not yet read.
                *id <= high
                    && slot.failure.is_none()
                    && !slot.finished()
                    && open.binary_search(id).is_err()
            })
            .map(|(id, _)| id)
            .collect();
        for id in stale {
            self.protocol_error("sync_reaped");
            if let Some(slot) = self.streams.get_mut(id) {
                let failure = StreamFailure::new(
                    io::ErrorKind::ConnectionReset,
                    "stream unknown to the peer (reaped by SYNC)",
                    CloseReason::Reset,
                );
                slot.fail(id, failure, &mut self.events);
            }
        }
    }
}
