//! The sending side of a stream: credit from the peer's WINDOW frames, reserving credit for a
//! DATA frame, FIN, and the accounting of DATA and FIN frames as they leave the data queue
//! (a RST waiting for them goes out right after the last one).

use std::io;
use std::task::Poll;

use tether_proto::{Frame, ResetCode, StreamId};

use super::conn::Conn;
use super::stream::session_closed;

impl Conn {
    /// WINDOW from the peer.
    pub(super) fn on_window(&mut self, stream: StreamId, increment: u32) {
        let Some(slot) = self.streams.get_mut(stream) else {
            return;
        };
        slot.send_credit = slot.send_credit.saturating_add(u64::from(increment));
        if slot.send_credit > u64::from(u32::MAX) {
            self.protocol_error("window_overflow");
            self.reset_for_violation(stream, ResetCode::FlowControl, "window overflow");
        } else {
            slot.wake_writer(stream, &mut self.events);
        }
    }

    /// How many of `want` bytes `id` may send in its next DATA frame. With `reserve`, they are
    /// taken from the credit and a frame is counted as queued: the caller must queue the DATA
    /// frame. `Pending`: no credit (the shell registers the writer's waker).
    pub(crate) fn send_credit(
        &mut self,
        id: StreamId,
        want: usize,
        reserve: bool,
    ) -> Poll<io::Result<usize>> {
        let max_data = self.config.max_data as usize;
        let Some(slot) = self.streams.get_mut(id) else {
            return Poll::Ready(Err(session_closed()));
        };
        if let Some(failure) = &slot.failure {
            return Poll::Ready(Err(failure.to_io()));
        }
        if slot.send_fin {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "write after shutdown",
            )));
        }
        if slot.send_credit == 0 {
            slot.write_waiting = true;
            return Poll::Pending;
        }
        let n = want
            .min(usize::try_from(slot.send_credit).unwrap_or(usize::MAX))
            .min(max_data);
        if reserve {
            slot.send_credit -= n as u64;
            slot.queued += 1;
        }
        Poll::Ready(Ok(n))
    }

    /// Whether `id` may send FIN: `Ok(true)` if it already did, an error if it failed.
    pub(crate) fn fin_state(&self, id: StreamId) -> io::Result<bool> {
        let Some(slot) = self.streams.get(id) else {
            return Err(session_closed());
        };
        if let Some(failure) = &slot.failure {
            return Err(failure.to_io());
        }
        Ok(slot.send_fin)
    }

    /// Marks FIN as sent and counts it as queued: the caller must queue the FIN frame.
    pub(crate) fn reserve_fin(&mut self, id: StreamId) -> io::Result<()> {
        let Some(slot) = self.streams.get_mut(id) else {
            return Err(session_closed());
        };
        if let Some(failure) = &slot.failure {
            return Err(failure.to_io());
        }
        slot.send_fin = true;
        slot.queued += 1;
        Ok(())
    }

    /// A DATA or FIN frame leaves the shell's data queue: returns it if it is still to be sent
    /// (not when its stream was reset meanwhile). A RST waiting for it is queued as control,
    /// which the writer sends next, so the peer sees the data, then the reset.
    pub(crate) fn dequeued(&mut self, frame: Frame) -> Option<Frame> {
        let id = frame.stream();
        let slot = self.streams.get_mut(id)?;
        slot.queued = slot.queued.saturating_sub(1);
        let keep = slot.failure.is_none() || slot.rst_after_drain.is_some();
        if slot.queued == 0
            && let Some(code) = slot.rst_after_drain.take()
        {
            self.push_control(Frame::Rst {
                stream: id,
                code,
                message: String::new(),
            });
        }
        self.maybe_remove(id);
        keep.then_some(frame)
    }
}
