//! Splicing a consumer socket onto a dialed stream until both directions end, one side fails
//! or the server's hard stop; a failure on one side becomes a reset on the other.

use std::io;

use tether_mux::direct::{DirectTcp, pipe_direct_until};
use tether_mux::pipe::{PipeError, PipeSide, PipeTotals};
use tether_proto::ResetCode;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::consumers::dial::DialedStream;

/// How a splice ended: the bytes moved and a close reason for the audit log.
#[derive(Debug)]
pub(crate) struct SpliceEnd {
    pub(crate) totals: PipeTotals,
    /// `closed` (both directions finished), `consumer_error`, `tunnel_error` or `shutdown`.
    pub(crate) reason: &'static str,
    /// The failure, if any.
    pub(crate) error: Option<String>,
}

/// Pumps bytes between `tcp` and the tunnel stream until both directions end, one side fails,
/// or `hard_stop` fires. A failure on one side becomes a reset on the other, never a clean EOF.
pub(crate) async fn splice(
    mut conn: DialedStream,
    tcp: TcpStream,
    hard_stop: &CancellationToken,
) -> SpliceEnd {
    let mut tcp = DirectTcp::new(tcp);
    let stop = async {
        hard_stop.cancelled().await;
        PipeError {
            side: PipeSide::Tunnel,
            source: io::Error::new(io::ErrorKind::ConnectionAborted, SHUTTING_DOWN),
        }
    };
    let end = pipe_direct_until(&mut conn.stream, &mut tcp, stop).await;
    let totals = end.totals;
    match end.result {
        Ok(()) => {
            debug!(
                to_tunnel = totals.to_tunnel,
                to_local = totals.to_local,
                "stream finished"
            );
            SpliceEnd {
                totals,
                reason: "closed",
                error: None,
            }
        }
        Err(err) => {
            debug!(side = ?err.side, error = %err.source, "stream failed");
            let reason = if hard_stop.is_cancelled() {
                "shutdown"
            } else {
                match err.side {
                    PipeSide::Tunnel => "tunnel_error",
                    PipeSide::Local => "consumer_error",
                }
            };
            match err.side {
                PipeSide::Tunnel => reset(tcp.get_ref()),
                PipeSide::Local => conn
                    .stream
                    .reset(ResetCode::TargetReset, "consumer connection failed"),
            }
            SpliceEnd {
                totals,
                reason,
                error: Some(err.source.to_string()),
            }
        }
    }
}

/// The error a splice ends with at the server's hard stop.
const SHUTTING_DOWN: &str = "server shutting down";

/// Makes closing the consumer's socket (when it is dropped) send RST, so the consumer sees an
/// error rather than a clean EOF.
pub(crate) fn reset(tcp: &TcpStream) {
    let _ = tcp.set_zero_linger();
}
