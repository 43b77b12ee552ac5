//! A deterministic two-`Conn` harness under a virtual clock: frames are carried between a server
//! and an agent core by hand, local actions are applied as the shell would apply them, and
//! the core's invariants are checked after every step. The core's tests, its property test
//! and the fuzz target drive it.

use std::collections::{HashSet, VecDeque};
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use tether_proto::{Frame, OpenErrorCode, ResetCode, StreamId, TargetAddr};

use super::conn::Conn;
use super::event::{Applied, Event};
use super::time::Time;
use crate::config::{MuxConfig, Role};
use crate::error::SessionEnd;
use crate::metrics::MuxMetrics;

/// One local action or delivery step.
#[derive(Debug, Clone)]
pub(crate) enum Action {
    /// `side` opens a stream; with `true`, early (a handle at once, DATA before OPEN_OK when
    /// negotiated).
    Open(usize, bool),
    /// `side` accepts one of the peer's opens waiting for it.
    Accept(usize, usize),
    /// `side` refuses one of the peer's opens waiting for it.
    Refuse(usize, usize),
    /// `side`'s opener gives up on one of its opens.
    Abandon(usize, usize),
    /// `side` writes up to `len` bytes on one of its streams.
    Write(usize, usize, usize),
    /// `side` shuts one of its streams down (FIN).
    Fin(usize, usize),
    /// `side` reads up to `max` bytes from one of its streams.
    Read(usize, usize, usize),
    /// `side` resets one of its streams.
    Reset(usize, usize),
    /// `side` drops one of its stream handles.
    Drop(usize, usize),
    /// `side`'s writer sends up to `n` queued frames onto the wire.
    Flush(usize, usize),
    /// Up to `n` frames on the wire towards `side` arrive.
    Deliver(usize, usize),
    /// `side` pings.
    Ping(usize),
    /// Time passes; timers due run.
    Advance(Duration),
}

impl Action {
    /// Decodes actions from fuzzer bytes (three bytes an action; the rest is ignored).
    pub(crate) fn decode(bytes: &[u8]) -> Vec<Action> {
        bytes
            .chunks_exact(3)
            .map(|c| {
                let side = usize::from(c[0] >> 7);
                let pick = usize::from(c[1]);
                let size = usize::from(c[2]) * 257 + usize::from(c[1]);
                match c[0] & 0x0f {
                    0 => Action::Open(side, pick % 2 == 1),
                    1 => Action::Accept(side, pick),
                    2 => Action::Refuse(side, pick),
                    3 => Action::Abandon(side, pick),
                    4 | 5 => Action::Write(side, pick, size),
                    6 => Action::Fin(side, pick),
                    7 | 8 => Action::Read(side, pick, size),
                    9 => Action::Reset(side, pick),
                    10 => Action::Drop(side, pick),
                    11 => Action::Flush(side, 1 + pick % 8),
                    12 | 13 => Action::Deliver(side, 1 + pick % 8),
                    14 => Action::Ping(side),
                    _ => Action::Advance(Duration::from_millis(size as u64)),
                }
            })
            .collect()
    }
}

/// One side: its core and what its shell would hold.
pub(crate) struct Side {
    pub(crate) conn: Conn,
    pub(crate) metrics: MuxMetrics,
    /// The shell's queue of DATA and FIN frames (bounded by `write_queue`).
    pub(crate) data: VecDeque<Frame>,
    /// Stream handles the application holds.
    pub(crate) handles: Vec<StreamId>,
    /// Our opens not answered yet.
    pub(crate) opening: Vec<StreamId>,
    /// The peer's opens waiting for the application.
    pub(crate) incoming: Vec<StreamId>,
    /// Streams that left the table.
    pub(crate) removed: HashSet<StreamId>,
    /// Streams this side sent RST for: no DATA or FIN of theirs may follow.
    pub(crate) rst_sent: HashSet<StreamId>,
    /// Frames this side sent, in order.
    pub(crate) sent: Vec<Frame>,
    /// Bytes read per stream.
    pub(crate) read: Vec<(StreamId, Bytes)>,
    pub(crate) ended: Option<SessionEnd>,
}

impl Side {
    fn new(role: Role, config: &MuxConfig) -> Self {
        let metrics = MuxMetrics::unregistered();
        Self {
            conn: Conn::new(role, config.clone(), metrics.clone(), Time::ZERO),
            metrics,
            data: VecDeque::new(),
            handles: Vec::new(),
            opening: Vec::new(),
            incoming: Vec::new(),
            removed: HashSet::new(),
            rst_sent: HashSet::new(),
            sent: Vec::new(),
            read: Vec::new(),
            ended: None,
        }
    }

    fn pick(list: &[StreamId], pick: usize) -> Option<StreamId> {
        (!list.is_empty()).then(|| list[pick % list.len()])
    }

    /// Takes the core's events as the shell would: an open that failed is abandoned.
    fn events(&mut self) {
        while let Some(event) = self.conn.poll_event() {
            match event {
                Event::Opened(id, result) => {
                    self.opening.retain(|s| *s != id);
                    // An early open's handle was taken already; it meets a failure itself.
                    let early = self.handles.contains(&id);
                    match result {
                        Ok(()) if !early => self.handles.push(id),
                        Err(_) if !early => self.conn.abandon_open(id),
                        _ => {}
                    }
                }
                Event::Removed(id) => {
                    assert!(self.removed.insert(id), "stream {id} removed twice");
                    self.handles.retain(|s| *s != id);
                    self.incoming.retain(|s| *s != id);
                }
                Event::Readable(_) | Event::Writable(_) | Event::Pong { .. } => {}
            }
        }
    }

    /// The next frame the writer sends: control first, then DATA and FIN in order.
    fn transmit(&mut self) -> Option<Frame> {
        loop {
            if let Some(frame) = self.conn.poll_transmit() {
                return Some(frame);
            }
            let frame = self.data.pop_front()?;
            if let Some(frame) = self.conn.dequeued(frame) {
                return Some(frame);
            }
        }
    }
}

/// Two cores joined by two wires, under a virtual clock.
pub(crate) struct Harness {
    pub(crate) sides: [Side; 2],
    /// `wires[i]`: frames on their way to side `i`.
    pub(crate) wires: [VecDeque<Frame>; 2],
    pub(crate) now: Time,
    pub(crate) config: MuxConfig,
}

/// The target every open asks for.
pub(crate) fn target() -> TargetAddr {
    "127.0.0.1:9".parse().expect("literal address")
}

impl Harness {
    /// A server (side 0) and an agent (side 1) with `config`.
    pub(crate) fn new(config: MuxConfig) -> Self {
        Self {
            sides: [
                Side::new(Role::Server, &config),
                Side::new(Role::Agent, &config),
            ],
            wires: [VecDeque::new(), VecDeque::new()],
            now: Time::ZERO,
            config,
        }
    }

    /// Small windows and frames, so that credit runs out often.
    pub(crate) fn small() -> Self {
        Self::new(MuxConfig {
            window: 4096,
            max_data: 1024,
            max_streams: 8,
            write_queue: 4,
            ping_interval: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(3600),
            sync_interval: Some(Duration::from_secs(2)),
            ..MuxConfig::default()
        })
    }

    /// Small windows that grow (up to 16 KiB, 24 KiB of growth per session) and the
    /// one-round-trip open negotiated (1 KiB of early data): the property tests and the fuzz
    /// target run on this one.
    pub(crate) fn tuned() -> Self {
        let mut h = Self::small();
        let config = MuxConfig {
            max_window: 16 * 1024,
            window_budget: 24 * 1024,
            early_data: 1024,
            peer_early_data: Some(1024),
            ..h.config.clone()
        };
        h.sides = [
            Side::new(Role::Server, &config),
            Side::new(Role::Agent, &config),
        ];
        h.config = config;
        h
    }

    /// Applies `action`, then checks the invariants.
    pub(crate) fn step(&mut self, action: &Action) {
        let before: [u64; 2] = [0, 1].map(|i| self.sides[i].conn.control_pushed());
        let removed_before: [HashSet<StreamId>; 2] = [0, 1].map(|i| self.sides[i].removed.clone());
        self.apply(action);
        for i in 0..2 {
            self.sides[i].events();
            self.check_new_control(i, before[i], &removed_before[i]);
        }
        self.check();
    }

    fn apply(&mut self, action: &Action) {
        let now = self.now;
        match *action {
            Action::Open(i, early) => {
                let side = &mut self.sides[i];
                let early = early && side.conn.early_data();
                if let Ok(id) = side.conn.open(target(), Duration::from_secs(10), early) {
                    side.opening.push(id);
                    if early {
                        side.handles.push(id);
                    }
                }
            }
            Action::Accept(i, pick) => {
                let side = &mut self.sides[i];
                if let Some(id) = Side::pick(&side.incoming, pick) {
                    side.incoming.retain(|s| *s != id);
                    if side.conn.accept(id).is_ok() {
                        side.handles.push(id);
                    }
                }
            }
            Action::Refuse(i, pick) => {
                let side = &mut self.sides[i];
                if let Some(id) = Side::pick(&side.incoming, pick) {
                    side.incoming.retain(|s| *s != id);
                    side.conn.refuse(id, OpenErrorCode::Unreachable, "refused");
                }
            }
            Action::Abandon(i, pick) => {
                let side = &mut self.sides[i];
                if let Some(id) = Side::pick(&side.opening, pick) {
                    side.opening.retain(|s| *s != id);
                    side.conn.abandon_open(id);
                }
            }
            Action::Write(i, pick, len) => self.write(i, pick, len.max(1)),
            Action::Fin(i, pick) => self.fin(i, pick),
            Action::Read(i, pick, max) => self.read(i, pick, max.max(1)),
            Action::Reset(i, pick) => {
                let side = &mut self.sides[i];
                if let Some(id) = Side::pick(&side.handles, pick) {
                    side.conn.reset(id, ResetCode::Cancelled, "reset");
                }
            }
            Action::Drop(i, pick) => {
                let side = &mut self.sides[i];
                if let Some(id) = Side::pick(&side.handles, pick) {
                    side.handles.retain(|s| *s != id);
                    side.conn.drop_handle(id);
                }
            }
            Action::Flush(i, n) => self.flush(i, n),
            Action::Deliver(i, n) => self.deliver(i, n),
            Action::Ping(i) => {
                let _ = self.sides[i].conn.ping(now);
            }
            Action::Advance(by) => self.advance(by),
        }
    }

    /// Writes as the shell does: credit, a free slot in the data queue, then the DATA frame.
    fn write(&mut self, i: usize, pick: usize, len: usize) {
        let cap = self.config.write_queue;
        let side = &mut self.sides[i];
        let Some(id) = Side::pick(&side.handles, pick) else {
            return;
        };
        if side.data.len() >= cap {
            return;
        }
        if let Poll::Ready(Ok(n)) = side.conn.send_credit(id, len, true) {
            let payload = Bytes::from(vec![(id % 251) as u8; n]);
            side.data.push_back(Frame::Data {
                stream: id,
                payload,
            });
        }
    }

    fn fin(&mut self, i: usize, pick: usize) {
        let cap = self.config.write_queue;
        let side = &mut self.sides[i];
        let Some(id) = Side::pick(&side.handles, pick) else {
            return;
        };
        if side.data.len() >= cap || side.conn.fin_state(id).unwrap_or(true) {
            return;
        }
        if side.conn.reserve_fin(id).is_ok() {
            side.data.push_back(Frame::Fin { stream: id });
        }
    }

    fn read(&mut self, i: usize, pick: usize, max: usize) {
        let now = self.now;
        let side = &mut self.sides[i];
        let Some(id) = Side::pick(&side.handles, pick) else {
            return;
        };
        if let Poll::Ready(Ok(Some(bytes))) = side.conn.consume(
            id,
            |buf| {
                let chunk = buf.take_chunk(max);
                let n = chunk.len();
                (chunk, n)
            },
            false,
            now,
        ) {
            side.read.push((id, bytes));
        }
    }

    /// Side `i`'s writer sends up to `n` frames.
    pub(crate) fn flush(&mut self, i: usize, n: usize) {
        for _ in 0..n {
            let Some(frame) = self.sides[i].transmit() else {
                return;
            };
            self.check_sent(i, &frame);
            self.sides[i].sent.push(frame.clone());
            self.wires[1 - i].push_back(frame);
        }
    }

    /// Up to `n` frames on the wire towards side `i` arrive.
    pub(crate) fn deliver(&mut self, i: usize, n: usize) {
        for _ in 0..n {
            if self.sides[i].ended.is_some() {
                self.wires[i].clear();
                return;
            }
            let Some(frame) = self.wires[i].pop_front() else {
                return;
            };
            self.receive(i, frame);
        }
    }

    /// Side `i` receives `frame`.
    pub(crate) fn receive(&mut self, i: usize, frame: Frame) {
        let sync = match &frame {
            Frame::Sync { .. } => Some((self.live_streams(i), self.failed(i))),
            _ => None,
        };
        let now = self.now;
        match self.sides[i].conn.handle_frame(frame, now) {
            Ok(Applied::Incoming { stream, .. }) => self.sides[i].incoming.push(stream),
            Ok(Applied::Deliver { .. }) => unreachable!("no socket is attached"),
            Ok(Applied::Done) => {}
            Err(end) => self.end(i, end),
        }
        if let Some((peer_live, failed)) = sync {
            self.check_reaped(i, &peer_live, &failed);
        }
    }

    fn end(&mut self, i: usize, end: SessionEnd) {
        let side = &mut self.sides[i];
        side.conn.end_session(end.clone());
        side.ended = Some(end);
        side.data.clear();
        // The transport closes: the peer's session ends too.
        let peer = &mut self.sides[1 - i];
        if peer.ended.is_none() {
            peer.conn.end_session(SessionEnd::PeerClosed);
            peer.ended = Some(SessionEnd::PeerClosed);
            peer.data.clear();
        }
        self.wires = [VecDeque::new(), VecDeque::new()];
    }

    /// Time passes by `by`; each side's due timers run.
    pub(crate) fn advance(&mut self, by: Duration) {
        self.now = self.now + by;
        for i in 0..2 {
            if self.sides[i].ended.is_some() {
                continue;
            }
            while self.sides[i].conn.poll_timeout() <= self.now {
                if let Err(end) = self.sides[i].conn.handle_timeout(self.now) {
                    self.end(i, end);
                    break;
                }
            }
        }
    }

    /// The application of side `i` lets go of every handle, open and pending open.
    fn release_all(&mut self, i: usize) {
        let side = &mut self.sides[i];
        side.events();
        for id in std::mem::take(&mut side.handles) {
            side.conn.drop_handle(id);
        }
        for id in std::mem::take(&mut side.incoming) {
            side.conn.refuse(id, OpenErrorCode::Internal, "dropped");
        }
        for id in std::mem::take(&mut side.opening) {
            side.conn.abandon_open(id);
        }
        side.events();
    }

    /// The application lets go of everything and both writers drain: the state at rest.
    pub(crate) fn settle(&mut self) {
        // Each round can only shrink what is left; bounded all the same.
        for _ in 0..10_000 {
            for i in 0..2 {
                self.release_all(i);
                self.flush(i, usize::MAX);
                self.deliver(1 - i, usize::MAX);
            }
            for i in 0..2 {
                self.release_all(i);
            }
            let idle = (0..2).all(|i| {
                let side = &self.sides[i];
                self.wires[i].is_empty() && side.data.is_empty() && !side.conn.has_control()
            });
            if idle {
                break;
            }
        }
        self.check();
        self.check_at_rest();
    }

    // === invariants ===

    /// Credit: a sender never holds more credit than the receiver granted, and a receiver's
    /// allowance, buffered and unreturned bytes always add up to its stream's window; windows
    /// grow only up to `max_window` and within the session's `window_budget`; early data
    /// stays within the negotiated allowance.
    fn check(&self) {
        let window = u64::from(self.config.window);
        let max = window.max(u64::from(self.config.max_window));
        for (i, side) in self.sides.iter().enumerate() {
            let mut granted = 0;
            let mut growth = 0;
            for (id, s) in side.conn.streams.iter() {
                granted += s.recv_window;
                growth += s.recv_window - window;
                assert!(
                    s.send_credit <= max && s.recv_window <= max,
                    "side {i} stream {id}: credit {} or window {} over {max}",
                    s.send_credit,
                    s.recv_window
                );
                let total = s.recv_allowance + s.recv_buf.len() as u64 + s.unacked;
                assert_eq!(
                    total,
                    s.recv_window,
                    "side {i} stream {id}: allowance {} + buffered {} + unacked {} is not the window",
                    s.recv_allowance,
                    s.recv_buf.len(),
                    s.unacked
                );
                self.check_credit(i, id, s);
            }
            assert_eq!(granted, side.conn.granted, "side {i}: granted");
            assert!(
                growth <= self.config.window_budget,
                "side {i}: windows grew by {growth}, over the budget"
            );
        }
    }

    /// What the sender of `id` on side `i` may still send fits in what the receiver still
    /// allows: its window once open, the early-data allowance before OPEN_OK.
    fn check_credit(&self, i: usize, id: StreamId, s: &super::stream::Stream) {
        use super::stream::Phase;
        let peer = &self.sides[1 - i].conn;
        let Some(theirs) = peer.streams.get(id) else {
            return;
        };
        if s.failure.is_some() || theirs.failure.is_some() {
            return;
        }
        let in_flight = self.data_in_flight(i, id);
        match (s.phase, theirs.phase) {
            (Phase::Opening { .. }, Phase::Accepting) => {
                let received = theirs.recv_window - theirs.recv_allowance;
                assert!(
                    s.send_credit + in_flight + received <= peer.config.accept_early(),
                    "side {i} stream {id}: early credit {} + in flight {in_flight} + received {received} over the early allowance",
                    s.send_credit
                );
            }
            (Phase::Opening { .. }, _) => {}
            _ => assert!(
                s.send_credit + in_flight <= theirs.recv_allowance,
                "side {i} stream {id}: credit {} + in flight {in_flight} over the peer's allowance {}",
                s.send_credit,
                theirs.recv_allowance
            ),
        }
    }

    /// DATA bytes of `id` that side `i` queued or sent and the peer did not receive yet.
    fn data_in_flight(&self, i: usize, id: StreamId) -> u64 {
        let queued = self.sides[i].data.iter();
        let wire = self.wires[1 - i].iter();
        queued
            .chain(wire)
            .map(|f| match f {
                Frame::Data { stream, payload } if *stream == id => payload.len() as u64,
                _ => 0,
            })
            .sum()
    }

    /// No frame is queued for a stream that already left the table, except the replies to a
    /// peer's frame for a stream this side does not know.
    fn check_new_control(&self, i: usize, before: u64, removed: &HashSet<StreamId>) {
        let conn = &self.sides[i].conn;
        let new = usize::try_from(conn.control_pushed() - before).unwrap_or(usize::MAX);
        let queued = conn.control.len();
        for frame in conn.control.iter().skip(queued.saturating_sub(new)) {
            let reply = matches!(
                frame,
                Frame::Rst {
                    code: ResetCode::UnknownStream,
                    ..
                } | Frame::OpenErr { .. }
            );
            let id = frame.stream();
            assert!(
                id == 0 || reply || !removed.contains(&id),
                "side {i} queued {frame:?} for stream {id}, removed before"
            );
        }
    }

    /// RST never overtakes the DATA or FIN queued before it: none follows it on the wire.
    fn check_sent(&mut self, i: usize, frame: &Frame) {
        let side = &mut self.sides[i];
        match frame {
            Frame::Rst { stream, code, .. } if *code != ResetCode::UnknownStream => {
                side.rst_sent.insert(*stream);
            }
            Frame::Data { stream, .. } | Frame::Fin { stream } => assert!(
                !side.rst_sent.contains(stream),
                "side {i} sent {} after RST for stream {stream}",
                if matches!(frame, Frame::Fin { .. }) {
                    "FIN"
                } else {
                    "DATA"
                }
            ),
            _ => {}
        }
    }

    /// The streams of side `1 - i` that its SYNC would list now.
    fn live_streams(&self, i: usize) -> Vec<StreamId> {
        match self.sides[1 - i].conn.sync_frame() {
            Frame::Sync { open, .. } => open,
            _ => Vec::new(),
        }
    }

    /// The streams of side `i` that have failed.
    fn failed(&self, i: usize) -> HashSet<StreamId> {
        let streams = self.sides[i].conn.streams.iter();
        streams
            .filter(|(_, s)| s.failure.is_some())
            .map(|(id, _)| id)
            .collect()
    }

    /// SYNC never reaps a stream the peer still lists: every stream the SYNC failed
    /// (`failed`: those failed before) is absent from `peer_live`, the peer's list at delivery.
    fn check_reaped(&self, i: usize, peer_live: &[StreamId], failed: &HashSet<StreamId>) {
        for id in self.failed(i) {
            if !failed.contains(&id) {
                assert!(
                    !peer_live.contains(&id),
                    "side {i} reaped stream {id}, which the peer still lists"
                );
            }
        }
    }

    /// At rest: every table empty, every stream counted as opened counted as closed.
    fn check_at_rest(&self) {
        for (i, side) in self.sides.iter().enumerate() {
            let left: Vec<StreamId> = side.conn.streams.iter().map(|(id, _)| id).collect();
            assert!(left.is_empty(), "side {i}: streams {left:?} left at rest");
            let opened = side.metrics.opened.get();
            let closed = side.metrics.closed_total();
            assert_eq!(opened, closed, "side {i}: {opened} opened, {closed} closed");
            assert_eq!(
                side.metrics.active.get(),
                0,
                "side {i}: streams still active"
            );
        }
    }
}

/// Runs `actions` on a small-window harness with growth and early data, then settles it (the fuzz target's body).
pub(crate) fn run_actions(actions: &[Action]) {
    let mut h = Harness::tuned();
    for action in actions {
        h.step(action);
        // Honest peers: no side ever sees DATA beyond what it granted.
        for (i, side) in h.sides.iter().enumerate() {
            let errors = side
                .metrics
                .protocol_errors
                .with_label_values(&["flow_control"]);
            assert_eq!(errors.get(), 0, "side {i}: DATA beyond the window");
        }
    }
    h.settle();
}
