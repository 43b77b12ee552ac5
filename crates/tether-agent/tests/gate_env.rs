//! The activation gate's `from: env` source: with the required role in the (injected)
//! environment, the agent dials. In its own test binary so that the log-capturing gate test
//! runs alone in its process (tracing's per-callsite interest cache and parallel tests with
//! thread-local subscribers can drop events).

// Helpers outside #[test] functions panic on failure too; that is what a test wants.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;

use support::{TestServer, agent_config};
use tether_agent::{Agent, AgentListeners};
use tether_testkit::TestPki;
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn env_source_enables_the_gate() {
    let pki = TestPki::new();
    let cert = pki.agent("edge-1");
    let mut server = TestServer::start(&pki).await;
    let yaml = format!(
        "server_url: \"wss://{}/v1/connect\"\n\
         tls: {{ cert: \"{}\", key: \"{}\", server_ca: ca.pem }}\n\
         admin_listen: \"\"\n\
         activation: {{ require_role: [upstream], source: {{ from: env, role_env: MY_ROLE }} }}\n",
        server.addr,
        cert.cert_path.display(),
        cert.key_path.display(),
    );
    let agent = Agent::new(agent_config(&yaml, &pki), &prometheus::Registry::new())
        .unwrap()
        .with_env(Arc::new(|var| {
            (var == "MY_ROLE").then(|| "upstream".to_owned())
        }));
    let token = CancellationToken::new();
    let run = tokio::spawn(agent.run(AgentListeners::default(), token.clone()));
    let _session = server.next_session().await;
    token.cancel();
    run.await.unwrap().unwrap();
}
