//! What the admin routes read (`AdminState`) and the lifecycle phase `/readyz` reports.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use crate::agents::registry::SessionRegistry;
use crate::peers::links::Links;
use crate::reload::ServerReloader;

/// What `/readyz` answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Listeners are being started.
    Starting,
    /// Every listener serves.
    Ready,
    /// Shutdown started.
    Draining,
}

/// Lifecycle phase reported by `/readyz`.
#[derive(Debug)]
pub(crate) struct Readiness(AtomicU8);

const STARTING: u8 = 0;
const READY: u8 = 1;
const DRAINING: u8 = 2;

impl Default for Readiness {
    fn default() -> Self {
        Self(AtomicU8::new(STARTING))
    }
}

impl Readiness {
    pub(crate) fn set_ready(&self) {
        self.0.store(READY, Ordering::Release);
    }

    pub(crate) fn set_draining(&self) {
        self.0.store(DRAINING, Ordering::Release);
    }

    /// The phase now.
    pub(crate) fn phase(&self) -> Phase {
        match self.0.load(Ordering::Acquire) {
            READY => Phase::Ready,
            DRAINING => Phase::Draining,
            _ => Phase::Starting,
        }
    }
}

/// What the admin routes read.
#[derive(Debug)]
pub(crate) struct AdminState {
    pub(crate) registry: Arc<SessionRegistry>,
    pub(crate) prometheus: prometheus::Registry,
    pub(crate) readiness: Arc<Readiness>,
    pub(crate) server_id: String,
    /// The running config and forwards, for the listing's `forwards` and `frontends`.
    pub(crate) reloader: ServerReloader,
    /// The peer sessions, with `peers:` set (the listing's `placement`).
    pub(crate) peers: Option<Arc<Links>>,
}
