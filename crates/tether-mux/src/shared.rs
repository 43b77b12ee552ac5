//! The async shell around the core: the one lock over the [`Conn`], the wakers, oneshots and
//! attached sockets the core's events are for, and [`Shared::act`], the one place that locks,
//! changes the core, wakes whoever its events name and gets queued frames on their way.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tether_proto::{Frame, StreamId};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{MuxConfig, Role};
use crate::core::{Conn, Event, Time};
use crate::error::{OpenError, SessionEnd};
use crate::io::DeliverSink;
use crate::metrics::MuxMetrics;
use crate::writer::{FrameSource, Next, WriterCore};

/// Everything the session's tasks and handles share.
pub(crate) struct Shared {
    locked: Mutex<Locked>,
    /// Wakes the writer task (frames queued that no handle could write inline).
    pub(crate) writer_notify: Notify,
    /// The writer's state, installed by the session driver (see `writer.rs`).
    pub(crate) writer: Mutex<Option<WriterCore>>,
    pub(crate) config: MuxConfig,
    pub(crate) metrics: MuxMetrics,
    /// Cancelled when the session ends, for any reason.
    pub(crate) cancel: CancellationToken,
    /// DATA and FIN frames from stream handles, in write order.
    pub(crate) data_tx: mpsc::Sender<Frame>,
    pub(crate) bytes_tx: AtomicU64,
    /// The core's time is measured from here.
    epoch: Instant,
}

/// What the lock guards: the core and the parties waiting on it.
struct Locked {
    conn: Conn,
    waiters: Waiters,
}

/// Who waits for what the core reports, by stream and by ping.
#[derive(Default)]
pub(crate) struct Waiters {
    streams: HashMap<StreamId, StreamWaiters>,
    pings: HashMap<u64, oneshot::Sender<Duration>>,
}

#[derive(Default)]
struct StreamWaiters {
    read: Option<Waker>,
    write: Option<Waker>,
    open: Option<oneshot::Sender<Result<(), OpenError>>>,
    sink: Option<Arc<dyn DeliverSink>>,
}

impl Waiters {
    fn stream(&mut self, id: StreamId) -> &mut StreamWaiters {
        self.streams.entry(id).or_default()
    }

    /// The stream's reader waits for bytes, FIN or a failure.
    pub(crate) fn wait_read(&mut self, id: StreamId, waker: &Waker) {
        set_waker(&mut self.stream(id).read, waker);
    }

    /// The stream's writer waits for credit or a failure.
    pub(crate) fn wait_write(&mut self, id: StreamId, waker: &Waker) {
        set_waker(&mut self.stream(id).write, waker);
    }

    /// The opener of `id` waits for the answer to its OPEN.
    pub(crate) fn wait_open(
        &mut self,
        id: StreamId,
        reply: oneshot::Sender<Result<(), OpenError>>,
    ) {
        self.stream(id).open = Some(reply);
    }

    /// A caller of `Session::ping` waits for PONG `nonce`.
    pub(crate) fn wait_pong(&mut self, nonce: u64, reply: oneshot::Sender<Duration>) {
        self.pings.insert(nonce, reply);
    }

    /// The socket the reader may deliver `id`'s bytes into, if one is attached.
    pub(crate) fn sink(&self, id: StreamId) -> Option<Arc<dyn DeliverSink>> {
        self.streams.get(&id)?.sink.clone()
    }

    pub(crate) fn set_sink(&mut self, id: StreamId, sink: Option<Arc<dyn DeliverSink>>) {
        match sink {
            Some(sink) => self.stream(id).sink = Some(sink),
            None => {
                if let Some(waiters) = self.streams.get_mut(&id) {
                    waiters.sink = None;
                }
            }
        }
    }

    /// Turns one core event into the wake-ups and answers it asks for.
    fn dispatch(&mut self, event: Event, wake: &mut Vec<Waker>) {
        match event {
            Event::Readable(id) => {
                if let Some(waker) = self.streams.get_mut(&id).and_then(|w| w.read.take()) {
                    wake.push(waker);
                }
            }
            Event::Writable(id) => {
                if let Some(waker) = self.streams.get_mut(&id).and_then(|w| w.write.take()) {
                    wake.push(waker);
                }
            }
            Event::Opened(id, result) => {
                if let Some(reply) = self.streams.get_mut(&id).and_then(|w| w.open.take()) {
                    let _ = reply.send(result);
                }
            }
            Event::Pong { nonce, rtt } => {
                let reply = self.pings.remove(&nonce);
                if let (Some(reply), Some(rtt)) = (reply, rtt) {
                    let _ = reply.send(rtt);
                }
            }
            Event::Removed(id) => {
                self.streams.remove(&id);
            }
        }
    }
}

/// Keeps the waker of the latest poll, without cloning when it is the same task's.
fn set_waker(slot: &mut Option<Waker>, waker: &Waker) {
    match slot {
        Some(old) if old.will_wake(waker) => {}
        _ => *slot = Some(waker.clone()),
    }
}

impl Shared {
    fn new(
        role: Role,
        config: MuxConfig,
        metrics: MuxMetrics,
        data_tx: mpsc::Sender<Frame>,
    ) -> Self {
        let conn = Conn::new(role, config.clone(), metrics.clone(), Time::ZERO);
        Self {
            locked: Mutex::new(Locked {
                conn,
                waiters: Waiters::default(),
            }),
            writer_notify: Notify::new(),
            writer: Mutex::new(None),
            config,
            metrics,
            cancel: CancellationToken::new(),
            data_tx,
            bytes_tx: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    /// Locks the state. A poisoned lock means a panic elsewhere already broke an invariant;
    /// the state is still structurally valid, so keep going rather than cascade the panic.
    fn lock(&self) -> MutexGuard<'_, Locked> {
        self.locked
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The core's time now.
    pub(crate) fn now(&self) -> Time {
        Time::from_epoch(self.epoch.elapsed())
    }

    /// The shell's clock at the core's `time`.
    pub(crate) fn instant(&self, time: Time) -> Instant {
        self.epoch + time.since_epoch()
    }

    pub(crate) fn age(&self) -> Duration {
        self.epoch.elapsed()
    }

    /// Changes the core under the lock, then (lock released) wakes every party its events name
    /// and, if control frames were queued, gets them on their way.
    pub(crate) fn act<R>(&self, change: impl FnOnce(&mut Conn, &mut Waiters) -> R) -> R {
        let (result, queued) = self.change(|conn, waiters| {
            let before = conn.control_pushed();
            let result = change(conn, waiters);
            (result, conn.control_pushed() != before)
        });
        if queued {
            self.kick_writer();
        }
        result
    }

    /// The lock, the change and the wake-ups of [`Self::act`], without the writer's kick (for
    /// the writer itself).
    fn change<R>(&self, change: impl FnOnce(&mut Conn, &mut Waiters) -> R) -> R {
        let mut wake = Vec::new();
        let result = {
            let mut guard = self.lock();
            let Locked { conn, waiters } = &mut *guard;
            let result = change(conn, waiters);
            while let Some(event) = conn.poll_event() {
                waiters.dispatch(event, &mut wake);
            }
            result
        };
        for waker in wake {
            waker.wake();
        }
        result
    }

    /// Reads the core under the lock.
    pub(crate) fn read<R>(&self, look: impl FnOnce(&Conn) -> R) -> R {
        look(&self.lock().conn)
    }

    /// Records the end of the session (the first reason wins), fails every stream and stops the
    /// tasks.
    pub(crate) fn finish(&self, reason: SessionEnd) {
        self.act(|conn, _| conn.end_session(reason));
        self.cancel.cancel();
        self.writer_notify.notify_one();
    }

    pub(crate) fn ended(&self) -> Option<SessionEnd> {
        self.read(|conn| conn.ended().cloned())
    }

    /// Gets frames just queued on their way: written here and now if the writer is idle and the
    /// transport takes them without waiting, otherwise by the writer task. Call with the state
    /// lock released.
    pub(crate) fn kick_writer(&self) {
        if let Ok(mut slot) = self.writer.try_lock()
            && let Some(core) = slot.as_mut()
            && !core.is_busy()
        {
            // A pass that finishes registers no waker anywhere; one that cannot finish leaves
            // the rest to the writer task, which polls again with its own waker.
            let mut cx = Context::from_waker(Waker::noop());
            match core.poll_drain(self, &mut cx) {
                Poll::Ready(Ok(())) => return,
                Poll::Ready(Err(err)) => {
                    drop(slot);
                    self.finish(err.into());
                    return;
                }
                // `busy` is set now: the writer task takes over with its own waker.
                Poll::Pending => {}
            }
        }
        self.writer_notify.notify_one();
    }
}

impl FrameSource for Shared {
    fn closing(&self) -> bool {
        self.cancel.is_cancelled()
    }

    fn next_frames(
        &self,
        control: &mut VecDeque<Frame>,
        data_rx: &mut mpsc::Receiver<Frame>,
    ) -> Next {
        self.change(|conn, _| {
            if conn.has_control() {
                conn.transmit_into(control);
                return Next::Again;
            }
            let Ok(frame) = data_rx.try_recv() else {
                return Next::Nothing;
            };
            // Anything queued before this frame was produced (an OPEN_OK for its stream) is in
            // the control queue by now, and goes out first; a RST queued behind it goes after
            // it. Removing the stream on the way leaves an event: the shell forgets its waiters.
            conn.transmit_into(control);
            conn.dequeued(frame).map_or(Next::Again, Next::Data)
        })
    }

    fn last_control(&self) -> Vec<Frame> {
        self.lock().conn.drain_control()
    }
}

/// Creates the shared state for a new session.
pub(crate) fn new_shared(
    role: Role,
    config: MuxConfig,
    metrics: MuxMetrics,
) -> (Arc<Shared>, mpsc::Receiver<Frame>) {
    let (data_tx, data_rx) = mpsc::channel(config.write_queue.max(1));
    (
        Arc::new(Shared::new(role, config, metrics, data_tx)),
        data_rx,
    )
}
