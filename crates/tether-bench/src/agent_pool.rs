//! The in-process agents of the `agents` benchmarks: their certificates issued up front, and
//! their orderly stop.

use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use tether_common::pki::{Ca, IssueOptions, write_file_private, write_file_public};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Stops the in-process agents: cancels them, waits up to a minute for them to close their
/// sessions, aborts the rest.
pub(crate) async fn stop_agents<T: 'static>(stop: &CancellationToken, agents: &mut JoinSet<T>) {
    stop.cancel();
    let drained = tokio::time::timeout(Duration::from_secs(60), async {
        while agents.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        agents.abort_all();
    }
}

/// Issues `count` agent certificates (`agent-a<i>.pem`) with the CA in `dir`.
pub(crate) fn issue_agents(dir: &Path, count: usize) -> Result<Vec<String>> {
    let ca_cert = std::fs::read_to_string(dir.join("ca.pem"))?;
    let ca_key = std::fs::read_to_string(dir.join("ca-key.pem"))?;
    let ca = Ca::from_pem(&ca_cert, &ca_key)?;
    let options = IssueOptions::default();
    (0..count)
        .map(|i| {
            let id = format!("a{i:05}");
            let issued = ca.issue_agent(&id, &options)?;
            write_file_private(&dir.join(format!("agent-{id}-key.pem")), &issued.key_pem)?;
            write_file_public(&dir.join(format!("agent-{id}.pem")), &issued.cert_pem)?;
            Ok(id)
        })
        .collect()
}
