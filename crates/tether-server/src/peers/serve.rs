//! The replica that holds the agent: each stream a peer opens carries one relay request; it is
//! answered (after the dial through the local agent session, for a dial) and then spliced onto
//! the agent's stream.

use std::time::Duration;

use tether_mux::{Incoming, MuxStream, OpenError, PendingOpen};
use tether_proto::OpenErrorCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;

use super::metrics::PeerMetrics;
use super::splice::splice;
use super::wire::{Answer, MAX_REQUEST, Request};
use crate::consumers::dial::{AgentDialer as TunnelDialer, DialError};

/// What serving relayed streams needs.
#[derive(Debug, Clone)]
pub(crate) struct Served {
    /// Dials through this replica's own sessions only (a relayed dial is never relayed again).
    pub(crate) local: TunnelDialer,
    pub(crate) server_id: String,
    pub(crate) metrics: PeerMetrics,
    /// Bound on reading a request.
    pub(crate) request_timeout: Duration,
    pub(crate) tracker: TaskTracker,
}

impl Served {
    /// Serves the streams a peer opens on one session until it ends or `stop` fires.
    pub(crate) async fn accept_streams(&self, mut incoming: Incoming, stop: CancellationToken) {
        loop {
            let pending = tokio::select! {
                _ = stop.cancelled() => return,
                pending = incoming.accept() => match pending {
                    Some(pending) => pending,
                    None => return,
                },
            };
            let served = self.clone();
            self.tracker
                .spawn(async move { served.serve(pending).await });
        }
    }

    async fn serve(&self, pending: PendingOpen) {
        let Ok(mut stream) = pending.accept() else {
            return;
        };
        let request = tokio::time::timeout(self.request_timeout, read_request(&mut stream)).await;
        let request = match request {
            Ok(Ok(request)) => request,
            Ok(Err(reason)) => return self.bad_request(stream, reason).await,
            Err(_) => {
                return self
                    .bad_request(stream, "no request in time".to_owned())
                    .await;
            }
        };
        match request {
            Request::Whoami => {
                let _ = write_answer(&mut stream, &Answer::ServerId(self.server_id.clone())).await;
                let _ = stream.shutdown().await;
            }
            Request::Dial { client, target } => match self.local.dial(&client, &target).await {
                Ok(conn) => {
                    self.count("opened");
                    if write_answer(&mut stream, &Answer::Opened).await.is_ok() {
                        splice(stream, conn.stream).await;
                    }
                }
                Err(DialError::NoSession(_)) => {
                    self.count("no_session");
                    let _ = write_answer(&mut stream, &Answer::NoSession).await;
                    let _ = stream.shutdown().await;
                }
                Err(DialError::Open { source, .. }) => {
                    self.count("refused");
                    debug!(agent.id = %client, %target, error = %source, "relayed dial refused");
                    let answer = Answer::Refused {
                        code: refusal_code(&source),
                        reason: source.to_string(),
                    };
                    let _ = write_answer(&mut stream, &answer).await;
                    let _ = stream.shutdown().await;
                }
            },
        }
    }

    async fn bad_request(&self, mut stream: MuxStream, reason: String) {
        self.count("bad_request");
        debug!(%reason, "bad relay request from a peer");
        let _ = write_answer(&mut stream, &Answer::BadRequest(reason)).await;
        let _ = stream.shutdown().await;
    }

    fn count(&self, outcome: &str) {
        self.metrics.served.with_label_values(&[outcome]).inc();
    }
}

/// The code a relayed refusal carries back: the agent's own, or the nearest one.
fn refusal_code(err: &OpenError) -> OpenErrorCode {
    match err {
        OpenError::Refused { code, .. } => *code,
        OpenError::Timeout(_) => OpenErrorCode::TimedOut,
        OpenError::Limit => OpenErrorCode::Limit,
        OpenError::Draining => OpenErrorCode::Draining,
        OpenError::Reset | OpenError::SessionClosed => OpenErrorCode::Internal,
    }
}

/// Reads one request (nothing follows it before the answer: the opener waits).
async fn read_request(stream: &mut MuxStream) -> Result<Request, String> {
    let mut buf = Vec::with_capacity(64);
    loop {
        match Request::decode(&buf) {
            Ok(Some((request, used))) if used == buf.len() => return Ok(request),
            Ok(Some(_)) => return Err("bytes after the request, before its answer".to_owned()),
            Ok(None) => {}
            Err(err) => return Err(err.to_string()),
        }
        if buf.len() >= MAX_REQUEST {
            return Err(format!("request longer than {MAX_REQUEST} bytes"));
        }
        let mut chunk = [0u8; 256];
        let want = chunk.len().min(MAX_REQUEST - buf.len());
        let n = stream
            .read(&mut chunk[..want])
            .await
            .map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("the stream ended before the request was complete".to_owned());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Writes an answer.
pub(crate) async fn write_answer(stream: &mut MuxStream, answer: &Answer) -> std::io::Result<()> {
    stream.write_all(&answer.encode()).await?;
    stream.flush().await
}
