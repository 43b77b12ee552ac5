//! Streams the peer opens: a bounded queue of `PendingOpen`s that the application accepts
//! (OPEN_OK) or rejects (OPEN_ERR); a pending open that is dropped is rejected.

use std::sync::Arc;
use std::time::Duration;

use tether_proto::{Frame, OpenErrorCode, StreamId, TargetAddr};
use tokio::sync::mpsc;

use crate::error::OpenError;
use crate::metrics::CloseReason;
use crate::state::{Phase, Shared, StreamFailure, Wakers};
use crate::stream::MuxStream;

/// The receiving end of the peer's OPENs.
#[derive(Debug)]
pub struct Incoming {
    pub(crate) rx: mpsc::Receiver<PendingOpen>,
}

impl Incoming {
    /// The next stream the peer opened, or `None` once the session has ended.
    pub async fn accept(&mut self) -> Option<PendingOpen> {
        self.rx.recv().await
    }
}

/// A stream the peer asked to open, waiting for the application's answer.
pub struct PendingOpen {
    shared: Arc<Shared>,
    id: StreamId,
    target: TargetAddr,
    timeout: Duration,
    answered: bool,
}

impl std::fmt::Debug for PendingOpen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingOpen")
            .field("id", &self.id)
            .field("target", &self.target)
            .finish()
    }
}

impl PendingOpen {
    pub(crate) fn new(
        shared: Arc<Shared>,
        id: StreamId,
        target: TargetAddr,
        timeout_ms: u32,
    ) -> Self {
        Self {
            shared,
            id,
            target,
            timeout: Duration::from_millis(u64::from(timeout_ms)),
            answered: false,
        }
    }

    /// Where the peer wants to connect.
    pub fn target(&self) -> &TargetAddr {
        &self.target
    }

    /// How long the peer allows for the dial (from its OPEN).
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The stream id.
    pub fn id(&self) -> StreamId {
        self.id
    }

    /// Answers OPEN_OK and returns the stream. Fails if the peer gave up meanwhile (RST) or the
    /// session ended.
    pub fn accept(mut self) -> Result<MuxStream, OpenError> {
        self.answered = true;
        {
            let mut state = self.shared.lock();
            if state.end.is_some() {
                drop(state);
                self.release();
                return Err(OpenError::SessionClosed);
            }
            let window = self.shared.config.window;
            let Some(slot) = state.streams.get_mut(&self.id) else {
                return Err(OpenError::SessionClosed);
            };
            if slot.failure.is_some() {
                drop(state);
                self.release();
                return Err(OpenError::Reset);
            }
            slot.phase = Phase::Open;
            state.push_control(Frame::OpenOk {
                stream: self.id,
                window,
            });
        }
        self.shared.kick_writer();
        Ok(MuxStream::new(self.shared.clone(), self.id))
    }

    /// Answers OPEN_ERR with `code` and `message`.
    pub fn reject(mut self, code: OpenErrorCode, message: &str) {
        self.answered = true;
        self.refuse(code, message);
    }

    fn refuse(&mut self, code: OpenErrorCode, message: &str) {
        let mut wakers = Wakers::default();
        {
            let mut state = self.shared.lock();
            if let Some(slot) = state.streams.get_mut(&self.id) {
                let already_failed = slot.failure.is_some();
                slot.fail(
                    StreamFailure {
                        kind: std::io::ErrorKind::ConnectionRefused,
                        message: message.to_owned(),
                        reason: CloseReason::Refused,
                    },
                    &mut wakers,
                );
                slot.handle_dropped = true;
                if !already_failed && state.end.is_none() {
                    state.push_control(Frame::OpenErr {
                        stream: self.id,
                        code,
                        message: message.to_owned(),
                    });
                }
                state.maybe_remove(self.id, &self.shared.metrics);
            }
        }
        wakers.wake_all();
        self.shared.kick_writer();
    }

    /// Drops the slot without answering (the peer already reset it, or the session is gone).
    fn release(&mut self) {
        let mut state = self.shared.lock();
        if let Some(slot) = state.streams.get_mut(&self.id) {
            slot.handle_dropped = true;
        }
        state.maybe_remove(self.id, &self.shared.metrics);
    }
}

impl Drop for PendingOpen {
    fn drop(&mut self) {
        if !self.answered {
            self.refuse(OpenErrorCode::Internal, "open request dropped unanswered");
        }
    }
}
