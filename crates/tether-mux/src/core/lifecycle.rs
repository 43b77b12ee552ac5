//! Every stream's lifecycle: opening (ours and the peer's), accepting, refusing, resetting,
//! failing (in one place, [`Conn::fail_stream`]), and removal once nothing refers to a stream.

use std::io;
use std::time::Duration;

use tether_proto::{Frame, OpenErrorCode, ResetCode, StreamId, TargetAddr};

use super::conn::Conn;
use super::event::{Applied, Event};
use super::stream::{Answer, Phase, Stream, StreamFailure};
use crate::error::{OpenError, SessionEnd};
use crate::metrics::CloseReason;

impl Conn {
    /// Opens a stream to `target`: queues OPEN and returns the new id. The outcome comes as
    /// [`Event::Opened`]. With `early` (and the capability negotiated), the stream may send
    /// the peer's early-data allowance before OPEN_OK: the caller takes a handle at once.
    pub(crate) fn open(
        &mut self,
        target: TargetAddr,
        dial_timeout: Duration,
        early: bool,
    ) -> Result<StreamId, OpenError> {
        if self.end.is_some() {
            return Err(OpenError::SessionClosed);
        }
        if self.ctl.local_goaway || self.ctl.peer_goaway.is_some() {
            return Err(OpenError::Draining);
        }
        if self.streams.len() >= self.config.max_streams {
            return Err(OpenError::Limit);
        }
        let id = self.next_id;
        self.next_id += 2;
        let window = self.config.window;
        let early_credit = match self.config.peer_early_data {
            Some(allowed) if early => u64::from(allowed),
            _ => 0,
        };
        let mut stream = Stream::new(Phase::Opening { answered: false }, window, early_credit);
        stream.early_credit = early_credit;
        self.streams.insert(id, stream);
        self.granted += u64::from(window);
        self.metrics.stream_opened();
        self.push_control(Frame::Open {
            stream: id,
            window,
            timeout_ms: u32::try_from(dial_timeout.as_millis()).unwrap_or(u32::MAX),
            target,
        });
        Ok(id)
    }

    /// The opener gave up (timeout, error, or its future dropped) before taking the stream.
    pub(crate) fn abandon_open(&mut self, id: StreamId) {
        let failure = StreamFailure::new(
            io::ErrorKind::TimedOut,
            "open abandoned",
            CloseReason::Refused,
        );
        let answer = Answer::Rst(ResetCode::Cancelled, "open abandoned".into());
        self.fail_stream(id, failure, answer, true);
    }

    /// An early open (its handle already taken) was not answered within `waited`: the
    /// stream fails as timed out and the peer gets RST.
    pub(crate) fn expire_open(&mut self, id: StreamId, waited: Duration) {
        let Some(slot) = self.streams.get_mut(id) else {
            return;
        };
        if !matches!(slot.phase, Phase::Opening { .. }) {
            return;
        }
        slot.answer_open(id, Err(OpenError::Timeout(waited)), &mut self.events);
        let message = format!("no answer to OPEN within {waited:?}");
        let failure = StreamFailure::new(io::ErrorKind::TimedOut, &message, CloseReason::Refused);
        self.fail_stream(
            id,
            failure,
            Answer::Rst(ResetCode::Cancelled, message),
            false,
        );
    }

    /// The application accepts the peer's open: OPEN_OK. On an error the slot is released.
    pub(crate) fn accept(&mut self, id: StreamId) -> Result<(), OpenError> {
        if self.end.is_some() {
            self.release(id);
            return Err(OpenError::SessionClosed);
        }
        let window = self.config.window;
        let Some(slot) = self.streams.get_mut(id) else {
            return Err(OpenError::SessionClosed);
        };
        if slot.failure.is_some() {
            self.release(id);
            return Err(OpenError::Reset);
        }
        slot.phase = Phase::Open;
        self.push_control(Frame::OpenOk { stream: id, window });
        Ok(())
    }

    /// The application refuses the peer's open (or dropped it unanswered): OPEN_ERR.
    pub(crate) fn refuse(&mut self, id: StreamId, code: OpenErrorCode, message: &str) {
        let failure = StreamFailure::new(
            io::ErrorKind::ConnectionRefused,
            message,
            CloseReason::Refused,
        );
        self.fail_stream(id, failure, Answer::OpenErr(code, message.to_owned()), true);
    }

    /// The handle of `id` is gone without answering anything.
    pub(crate) fn release(&mut self, id: StreamId) {
        if let Some(slot) = self.streams.get_mut(id) {
            slot.handle_dropped = true;
        }
        self.maybe_remove(id);
    }

    /// The application resets the stream: both directions fail, the peer gets RST.
    pub(crate) fn reset(&mut self, id: StreamId, code: ResetCode, message: &str) {
        let failure = StreamFailure::reset_locally(code, message);
        self.fail_stream(id, failure, Answer::Rst(code, message.to_owned()), false);
    }

    /// The stream's handle was dropped: a stream not finished both ways is reset (after the
    /// frames it queued), and the slot goes once nothing refers to it.
    pub(crate) fn drop_handle(&mut self, id: StreamId) {
        let Some(slot) = self.streams.get_mut(id) else {
            return;
        };
        if slot.finished() || slot.failure.is_some() || self.end.is_some() {
            self.release(id);
            return;
        }
        let failure = StreamFailure::new(
            io::ErrorKind::ConnectionReset,
            "stream handle dropped",
            CloseReason::Reset,
        );
        self.fail_stream(
            id,
            failure,
            Answer::RstAfterData(ResetCode::Cancelled),
            true,
        );
    }

    /// The one way a stream fails locally: mark it failed (the first failure wins) and wake its
    /// parties, tell the peer (only for the first failure, and not after the session ended),
    /// and with `release` let the slot go once its queued frames are written. Returns whether
    /// this was the stream's first failure.
    pub(super) fn fail_stream(
        &mut self,
        id: StreamId,
        failure: StreamFailure,
        answer: Answer,
        release: bool,
    ) -> bool {
        let ended = self.end.is_some();
        let Some(slot) = self.streams.get_mut(id) else {
            return false;
        };
        let first = slot.failure.is_none();
        if release {
            slot.handle_dropped = true;
        }
        slot.fail(id, failure, &mut self.events);
        if first && !ended {
            match answer {
                Answer::Rst(code, message) => self.push_control(Frame::Rst {
                    stream: id,
                    code,
                    message,
                }),
                Answer::RstAfterData(code) if slot.queued > 0 => {
                    slot.rst_after_drain = Some(code);
                }
                Answer::RstAfterData(code) => self.push_control(Frame::Rst {
                    stream: id,
                    code,
                    message: String::new(),
                }),
                Answer::OpenErr(code, message) => self.push_control(Frame::OpenErr {
                    stream: id,
                    code,
                    message,
                }),
            }
        }
        if release {
            self.maybe_remove(id);
        }
        first
    }

    /// Removes the slot if nothing refers to it any more, counting the close.
    pub(super) fn maybe_remove(&mut self, id: StreamId) {
        let Some(slot) = self.streams.get(id) else {
            return;
        };
        if slot.handle_dropped && slot.queued == 0 {
            let reason = slot.close_reason();
            self.granted = self.granted.saturating_sub(slot.recv_window);
            self.streams.remove(id);
            self.metrics.stream_closed(reason);
            self.events.push_back(Event::Removed(id));
        }
    }

    /// OPEN from the peer.
    pub(super) fn on_open(
        &mut self,
        stream: StreamId,
        window: u32,
        timeout_ms: u32,
        target: TargetAddr,
    ) -> Result<Applied, SessionEnd> {
        self.check_new_peer_id(stream)?;
        self.max_peer_id = stream;
        let refusal = if self.ctl.local_goaway {
            Some((OpenErrorCode::Draining, "session is draining"))
        } else if self.streams.len() >= self.config.max_streams {
            Some((OpenErrorCode::Limit, "session stream limit reached"))
        } else {
            None
        };
        if let Some((code, message)) = refusal {
            self.metrics.stream_opened();
            self.metrics.stream_closed(CloseReason::Refused);
            // Bounded: a peer flooding OPENs cannot grow the control queue.
            self.push_reply(Frame::OpenErr {
                stream,
                code,
                message: message.into(),
            });
            return Ok(Applied::Done);
        }
        let ours = self.config.window;
        self.streams.insert(
            stream,
            Stream::new(Phase::Accepting, ours, u64::from(window)),
        );
        self.granted += u64::from(ours);
        self.metrics.stream_opened();
        Ok(Applied::Incoming {
            stream,
            target,
            timeout_ms,
        })
    }

    /// OPEN_OK from the peer.
    pub(super) fn on_open_ok(&mut self, stream: StreamId, window: u32) {
        if let Some(slot) = self.streams.get_mut(stream)
            && let Phase::Opening { .. } = slot.phase
        {
            slot.answer_open(stream, Ok(()), &mut self.events);
            slot.phase = Phase::Open;
            // Early data counts against the acceptor's window: what was sent (or reserved)
            // before OPEN_OK comes off it.
            let sent_early = slot.early_credit - slot.send_credit.min(slot.early_credit);
            slot.send_credit = u64::from(window).saturating_sub(sent_early);
            slot.early_credit = 0;
            slot.wake_writer(stream, &mut self.events);
        }
    }

    /// OPEN_ERR from the peer.
    pub(super) fn on_open_err(&mut self, stream: StreamId, code: OpenErrorCode, message: String) {
        let Some(slot) = self.streams.get_mut(stream) else {
            return;
        };
        let failure = StreamFailure::new(
            io::ErrorKind::ConnectionRefused,
            format!("open refused ({}): {message}", code.label()),
            CloseReason::Refused,
        );
        match slot.phase {
            Phase::Opening { .. } => {
                slot.answer_open(
                    stream,
                    Err(OpenError::Refused { code, message }),
                    &mut self.events,
                );
                // A handle taken early (one-round-trip open) is waiting: its reads and
                // writes fail with the refusal; what it sent early is dropped by the peer.
                slot.fail(stream, failure, &mut self.events);
            }
            // A refusal after the stream was opened: the remotedialer translation opens
            // optimistically and learns of a failed dial later. Counted as refused, like a
            // refusal in time.
            Phase::Open => slot.fail(stream, failure, &mut self.events),
            Phase::Accepting => {}
        }
    }

    /// RST from the peer.
    pub(super) fn on_rst(&mut self, stream: StreamId, code: ResetCode, message: &str) {
        if let Some(slot) = self.streams.get_mut(stream) {
            let reason = match slot.phase {
                Phase::Opening { .. } => CloseReason::Refused,
                _ => CloseReason::Reset,
            };
            let failure = StreamFailure::new(
                io::ErrorKind::ConnectionReset,
                format!("stream reset by peer ({}): {message}", code.label()),
                reason,
            );
            slot.fail(stream, failure, &mut self.events);
        }
    }

    pub(super) fn check_new_peer_id(&self, id: StreamId) -> Result<(), SessionEnd> {
        if !self.role.is_peer_id(id) {
            return Err(SessionEnd::Protocol(format!(
                "peer opened stream {id} with the wrong parity"
            )));
        }
        if id <= self.max_peer_id {
            return Err(SessionEnd::Protocol(format!(
                "peer reused stream id {id} (highest so far {})",
                self.max_peer_id
            )));
        }
        Ok(())
    }
}
