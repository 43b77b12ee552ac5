//! The answer to a one-round-trip open ([`crate::Session::open_early`]): the stream is in the
//! caller's hands already, and this resolves once the far side has answered the OPEN (or the
//! wait for it timed out, which resets the stream).

use std::sync::Arc;
use std::time::Duration;

use tether_proto::StreamId;
use tokio::sync::oneshot;

use crate::error::OpenError;
use crate::shared::Shared;

/// How an early open ended; see [`OpenAnswer::outcome`].
#[must_use = "the answer is the only place an early open's refusal and timeout show"]
pub struct OpenAnswer {
    waiting: Option<Waiting>,
}

struct Waiting {
    shared: Arc<Shared>,
    id: StreamId,
    reply: oneshot::Receiver<Result<(), OpenError>>,
    wait: Duration,
}

impl std::fmt::Debug for OpenAnswer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenAnswer")
            .field("stream", &self.waiting.as_ref().map(|w| w.id))
            .finish()
    }
}

impl OpenAnswer {
    /// An open that was answered before the stream was handed out.
    pub(crate) fn answered() -> Self {
        Self { waiting: None }
    }

    pub(crate) fn waiting(
        shared: Arc<Shared>,
        id: StreamId,
        reply: oneshot::Receiver<Result<(), OpenError>>,
        wait: Duration,
    ) -> Self {
        Self {
            waiting: Some(Waiting {
                shared,
                id,
                reply,
                wait,
            }),
        }
    }

    /// Waits for the far side's answer: `Some(Ok)` once its target is connected, `Some(Err)`
    /// when it refused (the stream failed with the refusal) or did not answer within the dial
    /// timeout plus grace (the stream is reset then), `None` when the stream went away first
    /// (its handle dropped). Without this wait, an unanswered early open is only bounded by
    /// the far side's own dial timeout.
    pub async fn outcome(self) -> Option<Result<(), OpenError>> {
        let Some(Waiting {
            shared,
            id,
            reply,
            wait,
        }) = self.waiting
        else {
            return Some(Ok(()));
        };
        match tokio::time::timeout(wait, reply).await {
            Ok(Ok(result)) => Some(result),
            Ok(Err(_)) => None,
            Err(_) => {
                shared.act(|conn, _| conn.expire_open(id, wait));
                Some(Err(OpenError::Timeout(wait)))
            }
        }
    }
}
