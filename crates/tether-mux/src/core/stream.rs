//! One stream's state: where it is in its open handshake, its flow-control counters, how it
//! failed, and whether anything still refers to it.

use std::collections::VecDeque;
use std::io;

use tether_proto::{OpenErrorCode, ResetCode, StreamId};

use super::buffer::RecvBuf;
use super::event::Event;
use super::time::Time;
use crate::error::OpenError;
use crate::metrics::CloseReason;

/// Where a stream is in its open handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// We sent OPEN; `answered` once the opener was told the outcome.
    Opening { answered: bool },
    /// The peer sent OPEN; the application has not answered yet.
    Accepting,
    /// Data may flow.
    Open,
}

/// How a stream failed, replayed to its handle.
#[derive(Debug, Clone)]
pub(crate) struct StreamFailure {
    pub(crate) kind: io::ErrorKind,
    pub(crate) message: String,
    pub(crate) reason: CloseReason,
}

impl StreamFailure {
    pub(crate) fn new(
        kind: io::ErrorKind,
        message: impl Into<String>,
        reason: CloseReason,
    ) -> Self {
        Self {
            kind,
            message: message.into(),
            reason,
        }
    }

    /// This side resets the stream with `code`.
    pub(crate) fn reset_locally(code: ResetCode, message: &str) -> Self {
        Self::new(
            io::ErrorKind::ConnectionReset,
            format!("stream reset locally ({}): {message}", code.label()),
            CloseReason::Reset,
        )
    }

    pub(crate) fn to_io(&self) -> io::Error {
        io::Error::new(self.kind, self.message.clone())
    }
}

/// The error of an operation on a stream that is gone with its session.
pub(crate) fn session_closed() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, "tunnel session closed")
}

/// What a stream failed locally tells the peer (nothing once the session has ended).
#[derive(Debug)]
pub(crate) enum Answer {
    /// RST now; the stream's DATA still queued is dropped, never sent after it.
    Rst(ResetCode, String),
    /// RST after the DATA and FIN already queued for the stream (a dropped handle).
    RstAfterData(ResetCode),
    /// OPEN_ERR (a refused incoming open).
    OpenErr(OpenErrorCode, String),
}

/// One stream's state.
pub(crate) struct Stream {
    pub(super) phase: Phase,
    pub(super) recv_buf: RecvBuf,
    /// The receive window granted to the peer so far (starts at the configured window and
    /// grows while the peer is window-limited): allowance + buffered + unacked.
    pub(super) recv_window: u64,
    /// When this side last granted credit back (WINDOW), for the growth test.
    pub(super) last_grant: Option<Time>,
    /// Bytes the peer may still send before it needs a WINDOW.
    pub(super) recv_allowance: u64,
    /// Bytes consumed by the reader and not yet granted back.
    pub(super) unacked: u64,
    pub(super) recv_fin: bool,
    /// Bytes we may still send.
    pub(super) send_credit: u64,
    /// Credit this side had before OPEN_OK on a stream it opened with early data (the
    /// peer's negotiated early-data allowance); 0 otherwise.
    pub(super) early_credit: u64,
    pub(super) send_fin: bool,
    /// This stream's frames waiting in the shell's data queue.
    pub(super) queued: usize,
    pub(super) failure: Option<StreamFailure>,
    pub(super) handle_dropped: bool,
    /// Send RST once the frames already queued for this stream are written.
    pub(super) rst_after_drain: Option<ResetCode>,
    /// The shell attached a socket the reader may write received bytes into.
    pub(super) sink_attached: bool,
    /// The consumer holds bytes it took and has not finished writing: a direct write now
    /// would overtake them.
    pub(super) pump_holds: bool,
    /// The reader is writing into the attached socket (outside the lock).
    pub(super) direct_writing: bool,
    /// Bytes the reader wrote into the attached socket.
    pub(super) direct_bytes: u64,
    /// A read found nothing and waits: the next bytes, FIN or failure wake it (once).
    pub(super) read_waiting: bool,
    /// A write found no credit and waits: the next credit or failure wakes it (once).
    pub(super) write_waiting: bool,
}

impl Stream {
    pub(super) fn new(phase: Phase, window: u32, send_credit: u64) -> Self {
        Self {
            phase,
            recv_buf: RecvBuf::default(),
            recv_window: u64::from(window),
            last_grant: None,
            recv_allowance: u64::from(window),
            unacked: 0,
            recv_fin: false,
            send_credit,
            early_credit: 0,
            send_fin: false,
            queued: 0,
            failure: None,
            handle_dropped: false,
            rst_after_drain: None,
            sink_attached: false,
            pump_holds: false,
            direct_writing: false,
            direct_bytes: 0,
            read_waiting: false,
            write_waiting: false,
        }
    }

    /// Wakes a waiting reader.
    pub(super) fn wake_reader(&mut self, id: StreamId, events: &mut VecDeque<Event>) {
        if std::mem::take(&mut self.read_waiting) {
            events.push_back(Event::Readable(id));
        }
    }

    /// Wakes a waiting writer.
    pub(super) fn wake_writer(&mut self, id: StreamId, events: &mut VecDeque<Event>) {
        if std::mem::take(&mut self.write_waiting) {
            events.push_back(Event::Writable(id));
        }
    }

    /// Whether the reader may write a payload into the stream's socket now: one is attached,
    /// and no byte received before is buffered, held by the consumer, or being written.
    pub(super) fn can_deliver_directly(&self) -> bool {
        self.sink_attached && self.recv_buf.is_empty() && !self.pump_holds && !self.direct_writing
    }

    /// Tells the opener how its OPEN ended, once.
    pub(super) fn answer_open(
        &mut self,
        id: StreamId,
        result: Result<(), OpenError>,
        events: &mut VecDeque<Event>,
    ) {
        if let Phase::Opening { answered } = &mut self.phase
            && !*answered
        {
            *answered = true;
            events.push_back(Event::Opened(id, result));
        }
    }

    /// Marks the stream failed (the first failure wins) and wakes its reader, writer and
    /// opener.
    pub(super) fn fail(
        &mut self,
        id: StreamId,
        failure: StreamFailure,
        events: &mut VecDeque<Event>,
    ) {
        if self.failure.is_none() {
            self.failure = Some(failure);
        }
        // Buffered bytes are kept so that data received before the failure can still be read.
        self.wake_reader(id, events);
        self.wake_writer(id, events);
        self.answer_open(id, Err(OpenError::Reset), events);
    }

    pub(super) fn close_reason(&self) -> CloseReason {
        match &self.failure {
            Some(failure) => failure.reason,
            None if self.recv_fin && self.send_fin => CloseReason::Fin,
            None => CloseReason::Reset,
        }
    }

    /// Whether the stream still counts as open on the wire (listed in SYNC).
    pub(super) fn is_live(&self) -> bool {
        self.failure.is_none() && !(self.recv_fin && self.send_fin && self.queued == 0)
    }

    /// Whether both directions finished with FIN.
    pub(super) fn finished(&self) -> bool {
        self.recv_fin && self.send_fin
    }
}
