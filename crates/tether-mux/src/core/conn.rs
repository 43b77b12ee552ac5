//! `Conn`: one session's state machine. Peer frames go in through [`Conn::handle_frame`], local
//! actions through one method each; frames to send come out of [`Conn::poll_transmit`] (the
//! control queue; DATA and FIN wait in the shell's queue and pass [`Conn::dequeued`]), and what
//! happened out of [`Conn::poll_event`].

use std::collections::VecDeque;
use std::time::Duration;

use tether_proto::{Frame, GoAwayCode, OpenErrorCode, ProtoError, StreamId};

use super::event::{Applied, Event};
use super::stream::StreamFailure;
use super::streams::Streams;
use super::time::Time;
use crate::config::{MuxConfig, Role};
use crate::error::{OpenError, SessionEnd};
use crate::metrics::{CloseReason, MuxMetrics};

/// One session's state.
pub(crate) struct Conn {
    pub(super) streams: Streams,
    pub(super) next_id: StreamId,
    /// Highest stream id the peer has opened.
    pub(super) max_peer_id: StreamId,
    pub(super) role: Role,
    /// Frames written before any queued DATA: OPEN*, WINDOW, RST, PING, PONG, SYNC, GOAWAY.
    pub(super) control: VecDeque<Frame>,
    /// Control frames queued so far (the shell wakes its writer when this moved).
    control_pushed: u64,
    pub(super) end: Option<SessionEnd>,
    pub(super) ctl: Control,
    pub(super) events: VecDeque<Event>,
    pub(super) config: MuxConfig,
    pub(super) metrics: MuxMetrics,
    /// Payload bytes received.
    pub(super) bytes_rx: u64,
    /// The receive windows of every stream in the table, summed (bounded by `window_budget`
    /// for growth; each new stream adds the configured window).
    pub(super) granted: u64,
}

impl Conn {
    pub(crate) fn new(role: Role, config: MuxConfig, metrics: MuxMetrics, now: Time) -> Self {
        Self {
            streams: Streams::default(),
            next_id: role.first_id(),
            max_peer_id: 0,
            role,
            control: VecDeque::new(),
            control_pushed: 0,
            end: None,
            ctl: Control::new(now),
            events: VecDeque::new(),
            config,
            metrics,
            bytes_rx: 0,
            granted: 0,
        }
    }

    // === what the shell reads ===

    pub(crate) fn ended(&self) -> Option<&SessionEnd> {
        self.end.as_ref()
    }

    pub(crate) fn peer_goaway(&self) -> Option<&(GoAwayCode, String)> {
        self.ctl.peer_goaway.as_ref()
    }

    pub(crate) fn stream_count(&self) -> usize {
        self.streams.len()
    }

    pub(crate) fn rtt(&self) -> Option<Duration> {
        self.ctl.rtt
    }

    pub(crate) fn bytes_rx(&self) -> u64 {
        self.bytes_rx
    }

    /// The receive windows granted on this session, all streams together.
    pub(crate) fn granted(&self) -> u64 {
        self.granted
    }

    /// Whether streams this side opens may carry DATA before the peer's OPEN_OK.
    pub(crate) fn early_data(&self) -> bool {
        self.config.peer_early_data.is_some()
    }

    /// Control frames queued since the session started (compare to see whether any was).
    pub(crate) fn control_pushed(&self) -> u64 {
        self.control_pushed
    }

    /// The next thing that happened, for the shell to act on.
    pub(crate) fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The next control frame to send. Control goes before any DATA queued after it. (The
    /// shell moves them in batches with [`Self::transmit_into`].)
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn poll_transmit(&mut self) -> Option<Frame> {
        self.control.pop_front()
    }

    /// Moves every queued control frame to the back of `out`, in order (one lock for many).
    pub(crate) fn transmit_into(&mut self, out: &mut VecDeque<Frame>) {
        if out.is_empty() {
            std::mem::swap(out, &mut self.control);
        } else {
            out.append(&mut self.control);
        }
    }

    pub(crate) fn has_control(&self) -> bool {
        !self.control.is_empty()
    }

    // === queues ===

    /// Queues a frame the session must send (never dropped).
    pub(super) fn push_control(&mut self, frame: Frame) {
        self.control.push_back(frame);
        self.control_pushed += 1;
    }

    /// Queues a reply the peer provoked (PONG, RST for an unknown stream); dropped when the
    /// queue is over its bound, so a flooding peer cannot grow it.
    pub(super) fn push_reply(&mut self, frame: Frame) {
        if self.control.len() < self.config.max_control_queue {
            self.push_control(frame);
        }
    }

    pub(super) fn protocol_error(&self, kind: &str) {
        self.metrics
            .protocol_errors
            .with_label_values(&[kind])
            .inc();
    }

    // === peer frames ===

    /// Applies one received frame, at `now`.
    pub(crate) fn handle_frame(&mut self, frame: Frame, now: Time) -> Result<Applied, SessionEnd> {
        self.ctl.last_rx = now;
        match frame {
            Frame::Data { stream, payload } => return Ok(self.on_data(stream, payload)),
            Frame::Window { stream, increment } => self.on_window(stream, increment),
            Frame::Fin { stream } => self.on_fin(stream),
            Frame::Rst {
                stream,
                code,
                message,
            } => self.on_rst(stream, code, &message),
            Frame::Open {
                stream,
                window,
                timeout_ms,
                target,
            } => return self.on_open(stream, window, timeout_ms, target),
            Frame::OpenOk { stream, window } => self.on_open_ok(stream, window),
            Frame::OpenErr {
                stream,
                code,
                message,
            } => self.on_open_err(stream, code, message),
            Frame::Ping { nonce } => self.push_reply(Frame::Pong { nonce }),
            Frame::Pong { nonce } => self.on_pong(nonce, now),
            Frame::Sync { high, open } => self.on_sync(high, &open),
            Frame::GoAway { code, message } => self.ctl.peer_goaway = Some((code, message)),
            Frame::Unknown { .. } => {}
        }
        Ok(Applied::Done)
    }

    /// Handles a frame that failed to decode, at `now`: reset its stream if it has one we
    /// know, refuse a new OPEN with a bad target, and end the session otherwise.
    pub(crate) fn handle_malformed(
        &mut self,
        err: &ProtoError,
        now: Time,
    ) -> Result<(), SessionEnd> {
        use tether_proto::FrameType;
        self.ctl.last_rx = now;
        self.protocol_error(err.kind.label());
        let is_open = err.frame_type == Some(FrameType::Open as u8);
        match err.stream {
            Some(id) if id != 0 && self.streams.contains(id) => {
                self.reset_for_violation(id, tether_proto::ResetCode::Protocol, "malformed frame");
                Ok(())
            }
            Some(id) if is_open && self.check_new_peer_id(id).is_ok() => {
                self.max_peer_id = id;
                self.metrics.stream_opened();
                self.metrics.stream_closed(CloseReason::Refused);
                self.push_reply(Frame::OpenErr {
                    stream: id,
                    code: OpenErrorCode::Unsupported,
                    message: err.kind.to_string(),
                });
                Ok(())
            }
            // A stream frame that names a stream that is not open: answered as a valid one
            // would be (RST for DATA and FIN, nothing for the rest), the session goes on.
            Some(id) if id != 0 && !is_open && is_stream_frame(err.frame_type) => {
                let answers = [FrameType::Data as u8, FrameType::Fin as u8];
                if err.frame_type.is_some_and(|t| answers.contains(&t)) {
                    self.reply_unknown_stream(id);
                }
                Ok(())
            }
            _ => Err(SessionEnd::Protocol(err.to_string())),
        }
    }

    // === the end ===

    /// Records the end of the session (the first reason wins) and fails every stream. Frames
    /// still queued are never written.
    pub(crate) fn end_session(&mut self, reason: SessionEnd) {
        if self.end.is_some() {
            return;
        }
        let message = format!("tunnel session lost: {reason}");
        self.end = Some(reason);
        for id in self.streams.ids() {
            if let Some(slot) = self.streams.get_mut(id) {
                // Answer a pending open first: `fail` would report it as a stream reset.
                slot.answer_open(id, Err(OpenError::SessionClosed), &mut self.events);
                let failure = StreamFailure::new(
                    std::io::ErrorKind::ConnectionAborted,
                    message.clone(),
                    CloseReason::SessionLost,
                );
                slot.fail(id, failure, &mut self.events);
                // The writer is gone: nothing queued will be written.
                slot.queued = 0;
            }
            self.maybe_remove(id);
        }
        self.forget_pings();
    }

    /// The control frames still queued, for the writer's last flush.
    pub(crate) fn drain_control(&mut self) -> Vec<Frame> {
        self.control.drain(..).collect()
    }
}

/// Control state: pings in flight, timers, GOAWAY both ways.
pub(super) struct Control {
    /// Our pings in flight: nonce and when it was sent.
    pub(super) pings: VecDeque<(u64, Time)>,
    pub(super) next_nonce: u64,
    pub(super) rtt: Option<Duration>,
    pub(super) local_goaway: bool,
    pub(super) peer_goaway: Option<(GoAwayCode, String)>,
    /// When the last frame (well-formed or not) arrived.
    pub(super) last_rx: Time,
    pub(super) last_ping: Time,
    pub(super) last_sync: Time,
}

impl Control {
    pub(super) fn new(now: Time) -> Self {
        Self {
            pings: VecDeque::new(),
            next_nonce: 1,
            rtt: None,
            local_goaway: false,
            peer_goaway: None,
            last_rx: now,
            last_ping: now,
            last_sync: now,
        }
    }
}

/// True for the frame types that belong to one stream (a malformed one of these with a
/// stream id names the stream it concerns).
fn is_stream_frame(frame_type: Option<u8>) -> bool {
    use tether_proto::FrameType;
    frame_type.is_some_and(|t| {
        [
            FrameType::OpenOk,
            FrameType::OpenErr,
            FrameType::Data,
            FrameType::Window,
            FrameType::Fin,
            FrameType::Rst,
        ]
        .iter()
        .any(|k| *k as u8 == t)
    })
}
