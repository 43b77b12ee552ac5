//! Process signals: SIGTERM and SIGINT cancel the root token, a second one exits at once; SIGHUP
//! asks for a config reload.

use tokio_util::sync::CancellationToken;

/// Cancels `token` on the first SIGTERM/SIGINT; exits with code 130 on the second.
pub(crate) async fn cancel_on_signal(token: CancellationToken) {
    wait_for_termination().await;
    tracing::info!("shutdown requested; draining (send the signal again to exit at once)");
    token.cancel();
    wait_for_termination().await;
    tracing::warn!("second signal: exiting without draining");
    std::process::exit(130);
}

#[cfg(unix)]
async fn wait_for_termination() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(not(unix))]
async fn wait_for_termination() {
    let _ = tokio::signal::ctrl_c().await;
}

/// The stream of SIGHUPs: each `recv` resolves on the next one. `None` where SIGHUP cannot be
/// installed (then only file changes trigger reloads).
#[cfg(unix)]
pub(crate) fn sighup() -> Option<tokio::signal::unix::Signal> {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::hangup()) {
        Ok(stream) => Some(stream),
        Err(err) => {
            tracing::warn!(error = %err, "cannot install the SIGHUP handler; reload on file change only");
            None
        }
    }
}
