//! An agent whose certificate has expired says so on `/readyz` (503, with the expiry), and the
//! server refuses its handshakes.

#![allow(clippy::unwrap_used)]

mod support;

use support::{TestAgent, TestServer};
use tether_common::pki::IssueOptions;
use tether_testkit::TestPki;
use tether_testkit::http_get;

#[tokio::test]
async fn readyz_says_when_the_agent_certificate_has_expired() {
    let pki = TestPki::new();
    let server = TestServer::start(&pki).await;
    let expired = pki.agent_with("edge-1", IssueOptions::expired());
    let mut agent = TestAgent::start(&pki, &expired, server.addr, "{}", true).await;
    // It tries (and fails) to connect; /readyz names the expired certificate, not the attempts.
    agent.wait_for(|s| s.attempts >= 1).await;
    let (code, body) = http_get(agent.admin.unwrap(), "/readyz").await;
    assert_eq!(code, 503, "{body}");
    assert!(
        body.starts_with("the agent certificate expired at "),
        "{body}"
    );
    assert_eq!(http_get(agent.admin.unwrap(), "/healthz").await.0, 200);
    agent.stop().await.unwrap();
}
