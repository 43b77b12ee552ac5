//! `accept`: one step of an accept loop that only accepts: transient errors (out of file
//! descriptors, a connection reset before accept) are logged once per window and waited out.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use tether_common::log_throttle::LogThrottle;

/// Pause after a failed accept, so that a persistent error (EMFILE) does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// The next connection, or `None` once `stop` is cancelled.
pub(crate) async fn accept(
    listener: &TcpListener,
    stop: &CancellationToken,
    log: &LogThrottle,
) -> Option<(TcpStream, SocketAddr)> {
    loop {
        let result = tokio::select! {
            _ = stop.cancelled() => return None,
            result = listener.accept() => result,
        };
        match result {
            Ok(conn) => return Some(conn),
            Err(err) => {
                match log.check("accept") {
                    Some(suppressed) => warn!(error = %err, suppressed, "accept failed"),
                    None => debug!(error = %err, "accept failed"),
                }
                tokio::select! {
                    _ = stop.cancelled() => return None,
                    _ = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => {}
                }
            }
        }
    }
}
