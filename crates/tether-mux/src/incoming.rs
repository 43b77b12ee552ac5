//! Streams the peer opens: a bounded queue of `PendingOpen`s that the application accepts
//! (OPEN_OK) or rejects (OPEN_ERR); a pending open that is dropped is rejected.

use std::sync::Arc;
use std::time::Duration;

use tether_proto::{OpenErrorCode, StreamId, TargetAddr};
use tokio::sync::mpsc;

use crate::error::OpenError;
use crate::shared::Shared;
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
        let id = self.id;
        self.shared.act(|conn, _| conn.accept(id))?;
        Ok(MuxStream::new(self.shared.clone(), id))
    }

    /// Answers OPEN_ERR with `code` and `message`.
    pub fn reject(mut self, code: OpenErrorCode, message: &str) {
        self.answered = true;
        self.refuse(code, message);
    }

    fn refuse(&mut self, code: OpenErrorCode, message: &str) {
        let id = self.id;
        self.shared.act(|conn, _| conn.refuse(id, code, message));
    }
}

impl Drop for PendingOpen {
    fn drop(&mut self) {
        if !self.answered {
            self.refuse(OpenErrorCode::Internal, "open request dropped unanswered");
        }
    }
}
