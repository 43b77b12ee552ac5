//! `Session`: the cloneable handle to a session (open, ping, goaway, close, stats), a thin
//! caller of the core through [`Shared::act`].

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tether_proto::{GoAwayCode, TargetAddr};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::DropGuard;

use crate::config::{MuxConfig, Role};
use crate::driver::SessionDriver;
use crate::early_open::OpenAnswer;
use crate::error::{OpenError, SessionEnd};
use crate::incoming::Incoming;
use crate::metrics::MuxMetrics;
use crate::shared::{Shared, new_shared};
use crate::stream::MuxStream;
use crate::transport::FrameTransport;

/// A handle to a session. Clones share it; when the last clone is dropped the session ends and
/// every stream on it fails.
#[derive(Clone)]
pub struct Session {
    inner: Arc<Handle>,
}

struct Handle {
    shared: Arc<Shared>,
    _close_on_drop: DropGuard,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").finish_non_exhaustive()
    }
}

/// Counters of one session.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionStats {
    /// Streams in the table (open, opening, or finishing).
    pub streams: usize,
    /// Payload bytes received.
    pub bytes_rx: u64,
    /// Payload bytes sent.
    pub bytes_tx: u64,
    /// The last measured round-trip time.
    pub rtt: Option<Duration>,
    /// The receive windows granted to the peer, all streams together (bytes): the most this
    /// side may have to buffer for the session (see `MuxConfig::window_budget`).
    pub granted: u64,
}

impl Session {
    /// Creates a session over `transport`. Returns the handle, the queue of streams the peer
    /// opens, and the driver future that must be spawned.
    pub fn new<T: FrameTransport>(
        transport: T,
        role: Role,
        config: MuxConfig,
        metrics: MuxMetrics,
    ) -> (Session, Incoming, SessionDriver) {
        let backlog = config.accept_backlog.max(1);
        let (shared, data_rx) = new_shared(role, config, metrics);
        let (incoming_tx, incoming_rx) = mpsc::channel(backlog);
        let session = Session {
            inner: Arc::new(Handle {
                shared: shared.clone(),
                _close_on_drop: shared.cancel.clone().drop_guard(),
            }),
        };
        let driver = SessionDriver::new(shared, Box::new(transport), data_rx, incoming_tx);
        (session, Incoming { rx: incoming_rx }, driver)
    }

    fn shared(&self) -> &Arc<Shared> {
        &self.inner.shared
    }

    /// Opens a stream to `target` on the far side, waiting for OPEN_OK.
    pub async fn open(&self, target: TargetAddr) -> Result<MuxStream, OpenError> {
        self.open_with_timeout(target, self.shared().config.dial_timeout)
            .await
    }

    /// Opens a stream, asking the far side to give up dialing after `dial_timeout`.
    pub async fn open_with_timeout(
        &self,
        target: TargetAddr,
        dial_timeout: Duration,
    ) -> Result<MuxStream, OpenError> {
        let shared = self.shared();
        let (reply_tx, reply_rx) = oneshot::channel();
        let id = shared.act(|conn, waiters| {
            let id = conn.open(target, dial_timeout, false)?;
            waiters.wait_open(id, reply_tx);
            Ok::<_, OpenError>(id)
        })?;
        // From here the guard owns the slot: any early return or cancellation resets it.
        let mut guard = OpenGuard {
            shared: shared.clone(),
            id,
            armed: true,
        };
        let wait = dial_timeout + shared.config.open_grace;
        match tokio::time::timeout(wait, reply_rx).await {
            Ok(Ok(Ok(()))) => {
                guard.armed = false;
                Ok(MuxStream::new(shared.clone(), id))
            }
            Ok(Ok(Err(err))) => Err(err),
            Ok(Err(_)) => Err(OpenError::SessionClosed),
            Err(_) => Err(OpenError::Timeout(wait)),
        }
    }

    /// Opens a stream without waiting for the far side's answer when the peer negotiated the
    /// one-round-trip open (`MuxConfig::peer_early_data`): the stream may carry that many
    /// bytes at once, which the far side buffers until its target is connected. If the open
    /// fails, the stream's reads and writes fail with the refusal (`ConnectionRefused`, "open
    /// refused (code): ...") and the bytes sent early are dropped; the [`OpenAnswer`] tells
    /// how the open ended. Without the capability this is [`Self::open_with_timeout`] and the
    /// answer is known at once.
    pub async fn open_early(
        &self,
        target: TargetAddr,
        dial_timeout: Duration,
    ) -> Result<(MuxStream, OpenAnswer), OpenError> {
        let shared = self.shared();
        let (reply_tx, reply_rx) = oneshot::channel();
        let opened = shared.act(|conn, waiters| {
            if !conn.early_data() {
                return Ok(None);
            }
            let id = conn.open(target.clone(), dial_timeout, true)?;
            waiters.wait_open(id, reply_tx);
            Ok::<_, OpenError>(Some(id))
        })?;
        match opened {
            Some(id) => {
                let wait = dial_timeout + shared.config.open_grace;
                let answer = OpenAnswer::waiting(shared.clone(), id, reply_rx, wait);
                Ok((MuxStream::new(shared.clone(), id), answer))
            }
            None => {
                let stream = self.open_with_timeout(target, dial_timeout).await?;
                Ok((stream, OpenAnswer::answered()))
            }
        }
    }

    /// Whether [`Self::open_early`] opens in one round trip on this session (the peer
    /// negotiated it).
    pub fn early_data(&self) -> bool {
        self.shared().read(|conn| conn.early_data())
    }

    /// Sends a PING and waits for its PONG; returns the round-trip time. The caller bounds the
    /// wait with its own timeout.
    pub async fn ping(&self) -> Result<Duration, OpenError> {
        let (tx, rx) = oneshot::channel();
        let now = self.shared().now();
        self.shared().act(|conn, waiters| {
            let nonce = conn.ping(now)?;
            waiters.wait_pong(nonce, tx);
            Ok::<_, OpenError>(())
        })?;
        rx.await.map_err(|_| OpenError::SessionClosed)
    }

    /// Sends GOAWAY: this side takes no new streams; existing ones carry on.
    pub fn goaway(&self, code: GoAwayCode, message: &str) {
        self.shared().act(|conn, _| conn.goaway(code, message));
    }

    /// Ends the session now: streams fail, the transport is closed.
    pub fn close(&self) {
        self.shared().finish(SessionEnd::Local);
    }

    /// Resolves once the session has ended.
    pub async fn closed(&self) {
        self.shared().cancel.cancelled().await;
    }

    /// Whether the session has ended.
    pub fn is_closed(&self) -> bool {
        self.shared().cancel.is_cancelled()
    }

    /// Why the session ended, once it has.
    pub fn end_reason(&self) -> Option<SessionEnd> {
        self.shared().ended()
    }

    /// The peer's GOAWAY, if it sent one.
    pub fn peer_goaway(&self) -> Option<(GoAwayCode, String)> {
        self.shared().read(|conn| conn.peer_goaway().cloned())
    }

    /// Live counters.
    pub fn stats(&self) -> SessionStats {
        let shared = self.shared();
        let bytes_tx = shared.bytes_tx.load(Ordering::Relaxed);
        shared.read(|conn| SessionStats {
            streams: conn.stream_count(),
            bytes_rx: conn.bytes_rx(),
            bytes_tx,
            rtt: conn.rtt(),
            granted: conn.granted(),
        })
    }

    /// How long ago the session was created.
    pub fn age(&self) -> Duration {
        self.shared().age()
    }
}

/// Resets a stream whose open was abandoned (timeout, error, or the caller's future dropped).
struct OpenGuard {
    shared: Arc<Shared>,
    id: u64,
    armed: bool,
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        if self.armed {
            let id = self.id;
            self.shared.act(|conn, _| conn.abandon_open(id));
        }
    }
}
