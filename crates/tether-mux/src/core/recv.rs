//! The receiving side of a stream: DATA and FIN from the peer, reads by the application,
//! direct delivery into an attached socket, and the WINDOW frames that grant credit back.

use std::io;
use std::task::Poll;

use bytes::Bytes;
use tether_proto::{Frame, ResetCode, StreamId};

use super::buffer::RecvBuf;
use super::conn::Conn;
use super::event::Applied;
use super::stream::{Answer, Phase, StreamFailure, session_closed};
use super::time::Time;

impl Conn {
    /// DATA from the peer.
    pub(super) fn on_data(&mut self, stream: StreamId, payload: Bytes) -> Applied {
        let len = payload.len() as u64;
        let max_data = u64::from(self.config.max_data);
        let Some(slot) = self.streams.get_mut(stream) else {
            // Usually a race with a reset we sent; answer so a confused peer learns.
            self.reply_unknown_stream(stream);
            return Applied::Done;
        };
        if slot.failure.is_some() {
            return Applied::Done;
        }
        let violation = if len > max_data {
            // Only reachable with `max_data` below the decoder's floor.
            Some(("too_large", ResetCode::Protocol, "DATA over max_data"))
        } else if slot.recv_fin {
            Some(("data_after_fin", ResetCode::Protocol, "DATA after FIN"))
        } else if len > slot.recv_allowance {
            Some((
                "flow_control",
                ResetCode::FlowControl,
                "DATA beyond the granted window",
            ))
        } else if slot.phase == Phase::Accepting
            && slot.recv_window - slot.recv_allowance + len > self.config.accept_early()
        {
            // Before our OPEN_OK only the negotiated early data may come (none without it).
            Some((
                "flow_control",
                ResetCode::FlowControl,
                "DATA before OPEN_OK beyond the early-data window",
            ))
        } else {
            None
        };
        if let Some((kind, code, message)) = violation {
            self.protocol_error(kind);
            self.reset_for_violation(stream, code, message);
            return Applied::Done;
        }
        if len == 0 {
            return Applied::Done;
        }
        slot.recv_allowance -= len;
        self.bytes_rx += len;
        self.metrics.bytes_rx.inc_by(len);
        if slot.can_deliver_directly() {
            slot.direct_writing = true;
            return Applied::Deliver { stream, payload };
        }
        slot.recv_buf.push(payload);
        slot.wake_reader(stream, &mut self.events);
        Applied::Done
    }

    /// FIN from the peer.
    pub(super) fn on_fin(&mut self, stream: StreamId) {
        match self.streams.get_mut(stream) {
            Some(slot) if slot.failure.is_none() => {
                if slot.recv_fin {
                    self.protocol_error("double_fin");
                    self.reset_for_violation(stream, ResetCode::Protocol, "FIN twice");
                } else {
                    slot.recv_fin = true;
                    slot.wake_reader(stream, &mut self.events);
                }
            }
            Some(_) => {}
            None => self.reply_unknown_stream(stream),
        }
    }

    /// The application reads: EOF (`None`), a failure, or `take` applied to the buffered bytes
    /// (not empty then), with the window credit granted back for what it took. `Pending`
    /// means nothing is buffered yet: the shell registers the reader's waker. `holds`: the
    /// caller keeps what it took unwritten until its next read (the pump), so no direct
    /// delivery may happen meanwhile.
    pub(crate) fn consume<R>(
        &mut self,
        id: StreamId,
        take: impl FnOnce(&mut RecvBuf) -> (R, usize),
        holds: bool,
        now: Time,
    ) -> Poll<io::Result<Option<R>>> {
        let Some(slot) = self.streams.get_mut(id) else {
            return Poll::Ready(Err(session_closed()));
        };
        // Whatever the pump took before was written: the reader may deliver directly again.
        slot.pump_holds = false;
        if let Some(failure) = &slot.failure
            && failure.kind == io::ErrorKind::ConnectionReset
        {
            // A reset discards what was buffered, as TCP does.
            return Poll::Ready(Err(failure.to_io()));
        }
        if slot.recv_buf.is_empty() {
            return if slot.recv_fin {
                // Every byte up to the peer's FIN was delivered; losing the session after
                // that does not make this direction incomplete.
                Poll::Ready(Ok(None))
            } else if let Some(failure) = &slot.failure {
                Poll::Ready(Err(failure.to_io()))
            } else {
                slot.read_waiting = true;
                Poll::Pending
            };
        }
        let (taken, copied) = take(&mut slot.recv_buf);
        // The caller holds the bytes until it asks again: a direct write by the session's
        // reader before then would overtake them.
        slot.pump_holds = holds;
        if let Some(window) = self.consumed(id, copied, now) {
            self.push_control(window);
        }
        Poll::Ready(Ok(Some(taken)))
    }

    /// Bytes received for `id` and not yet read.
    pub(crate) fn buffered(&self, id: StreamId) -> usize {
        self.streams.get(id).map_or(0, |slot| slot.recv_buf.len())
    }

    /// The shell attached a socket the reader may write `id`'s received bytes into.
    pub(crate) fn attach_sink(&mut self, id: StreamId) -> bool {
        match self.streams.get_mut(id) {
            Some(slot) => {
                slot.sink_attached = true;
                true
            }
            None => false,
        }
    }

    /// The shell detached the socket; returns the bytes delivered into it since the last call.
    pub(crate) fn detach_sink(&mut self, id: StreamId) -> u64 {
        match self.streams.get_mut(id) {
            Some(slot) => {
                slot.sink_attached = false;
                std::mem::take(&mut slot.direct_bytes)
            }
            None => 0,
        }
    }

    /// After an [`Applied::Deliver`]: `written` bytes reached the socket, `rest` did not (the
    /// socket was full or failed) and goes to the stream's buffer for its consumer, which
    /// writes it or meets the error itself.
    pub(crate) fn delivered(&mut self, id: StreamId, written: usize, rest: Bytes, now: Time) {
        let Some(slot) = self.streams.get_mut(id) else {
            return;
        };
        slot.direct_writing = false;
        slot.direct_bytes += written as u64;
        if !rest.is_empty() {
            slot.recv_buf.push(rest);
            slot.wake_reader(id, &mut self.events);
        }
        if let Some(window) = self.consumed(id, written, now) {
            self.push_control(window);
        }
    }

    /// Counts `n` bytes of `id` as consumed by the reader; returns the WINDOW frame that
    /// grants credit back once enough has been consumed (a quarter window by default, so the
    /// sender stays busy without a WINDOW frame per read), grown by [`Self::window_growth`].
    fn consumed(&mut self, id: StreamId, n: usize, now: Time) -> Option<Frame> {
        let every = self.config.window_update;
        let slot = self.streams.get_mut(id)?;
        slot.unacked += n as u64;
        let every = every.map_or(slot.recv_window / 4, u64::from).max(1);
        if slot.failure.is_some() || slot.recv_fin || slot.unacked < every {
            return None;
        }
        let (window, last) = (slot.recv_window, slot.last_grant.replace(now));
        let grow = self.window_growth(window, last, now);
        self.granted += grow;
        let slot = self.streams.get_mut(id)?;
        slot.recv_window += grow;
        let total = slot.unacked + grow;
        let increment = total.min(u64::from(u32::MAX));
        slot.unacked = total - increment;
        slot.recv_allowance += increment;
        Some(Frame::Window {
            stream: id,
            increment: increment as u32,
        })
    }

    /// How much a stream's receive `window` grows at a grant at `now` (the previous grant was
    /// at `last`): doubled (up to `max_window`, within the session's `window_budget`) when
    /// the last quarter window was consumed within two round trips, i.e. the peer sends at
    /// least about a window per round trip and is held back by the window, as HTTP/2 and QUIC
    /// stacks tune theirs. Without a round-trip time yet, a PING measures one.
    fn window_growth(&mut self, window: u64, last: Option<Time>, now: Time) -> u64 {
        let max = u64::from(self.config.max_window);
        // The remotedialer mapping sets its own update size: its windows stay fixed.
        if window >= max || self.config.window_update.is_some() {
            return 0;
        }
        let Some(rtt) = self.ctl.rtt else {
            self.probe_rtt(now);
            return 0;
        };
        let Some(last) = last else {
            return 0;
        };
        if now.since(last) >= rtt * 2 {
            return 0;
        }
        let room = self.config.window_budget.saturating_sub(self.granted);
        window.min(max - window).min(room)
    }

    /// Resets `id` for a protocol violation by the peer (once: a peer repeating the offending
    /// frame cannot grow the control queue).
    pub(super) fn reset_for_violation(&mut self, id: StreamId, code: ResetCode, message: &str) {
        self.fail_stream(
            id,
            StreamFailure::reset_locally(code, message),
            Answer::Rst(code, message.to_owned()),
            false,
        );
    }

    /// Answers a frame for a stream this side does not know with RST `unknown_stream`.
    pub(super) fn reply_unknown_stream(&mut self, stream: StreamId) {
        self.push_reply(Frame::Rst {
            stream,
            code: ResetCode::UnknownStream,
            message: String::new(),
        });
    }
}
