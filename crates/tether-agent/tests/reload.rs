//! `AgentReloader::reload` against the test server: an identical config, or one that differs
//! only in a value that falls back to the same effective value, touches nothing; a policy change
//! applies to new streams while an open stream keeps flowing; a server URL change reconnects;
//! an invalid config is rejected and the old one keeps running. Every result is counted.

// Helpers outside #[test] functions panic on failure too; that is what a test wants.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::atomic::Ordering;

use support::{TestServer, WAIT, agent_config};
use tether_agent::{Agent, AgentConfig, AgentListeners, AgentReloader, AgentStatus};
use tether_common::config_diff::ReloadResult;
use tether_proto::TargetAddr;
use tether_testkit::metrics::metric_sum;
use tether_testkit::{AgentCert, TestPki, echo_server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

fn yaml(server: &TestServer, cert: &AgentCert, server_name: &str, policy: &str) -> String {
    format!(
        "server_url: \"wss://{}/v1/connect\"\n\
         server_name: \"{server_name}\"\n\
         tls: {{ cert: \"{}\", key: \"{}\", server_ca: ca.pem }}\n\
         admin_listen: \"\"\n\
         reconnect: {{ min_delay: 10ms, max_delay: 50ms }}\n\
         policy: {policy}\n",
        server.addr,
        cert.cert_path.display(),
        cert.key_path.display(),
    )
}

struct Running {
    registry: prometheus::Registry,
    status: watch::Receiver<AgentStatus>,
    reloader: AgentReloader,
    token: CancellationToken,
    task: JoinHandle<Result<(), tether_agent::AgentError>>,
}

impl Running {
    fn start(config: AgentConfig) -> Running {
        let registry = prometheus::Registry::new();
        let agent = Agent::new(config, &registry).unwrap();
        let status = agent.status();
        let reloader = agent.reloader();
        let token = CancellationToken::new();
        let task = tokio::spawn(agent.run(AgentListeners::default(), token.clone()));
        Running {
            registry,
            status,
            reloader,
            token,
            task,
        }
    }

    fn reloads(&self, result: ReloadResult) -> f64 {
        metric_sum(
            &self.registry,
            "tether_config_reloads_total",
            &[("result", result.label())],
        )
    }

    async fn connected(&mut self) -> AgentStatus {
        tokio::time::timeout(WAIT, self.status.wait_for(|s| s.connected))
            .await
            .unwrap()
            .unwrap()
            .clone()
    }

    async fn stop(self) {
        self.token.cancel();
        self.task.await.unwrap().unwrap();
    }
}

#[tokio::test]
async fn identical_or_fallback_equivalent_config_changes_nothing() {
    let pki = TestPki::new();
    let cert = pki.agent("edge-1");
    let mut server = TestServer::start(&pki).await;
    let text = yaml(&server, &cert, "", "{}");
    let mut agent = Running::start(agent_config(&text, &pki));
    let session = server.next_session().await;
    let before = agent.connected().await;

    let outcome = agent.reloader.reload(agent_config(&text, &pki)).unwrap();
    assert_eq!(outcome.result, ReloadResult::Unchanged);
    assert!(outcome.changed.is_empty());
    // `server_name: ""` falls back to the URL's host: spelling the host out is no change.
    let spelled = yaml(&server, &cert, "127.0.0.1", "{}");
    let outcome = agent.reloader.reload(agent_config(&spelled, &pki)).unwrap();
    assert_eq!(outcome.result, ReloadResult::Unchanged, "{outcome:?}");
    assert_eq!(agent.reloads(ReloadResult::Unchanged), 2.0);
    // admin_listen acts only at the next start: reported as such, once.
    let mut moved = agent_config(&text, &pki);
    moved.admin_listen = "127.0.0.1:1".into();
    let outcome = agent.reloader.reload(moved.clone()).unwrap();
    assert_eq!(outcome.result, ReloadResult::RestartRequired, "{outcome:?}");
    assert_eq!(outcome.restart_required, ["admin_listen"]);
    let outcome = agent.reloader.reload(moved).unwrap();
    assert_eq!(outcome.result, ReloadResult::Unchanged, "{outcome:?}");

    // Same session on both sides; nothing reconnected.
    assert!(!session.is_closed());
    assert_eq!(server.established.load(Ordering::SeqCst), 1);
    let after = agent.status.borrow().clone();
    assert_eq!(after.session_id, before.session_id);
    assert_eq!(after.sessions, 1);
    agent.stop().await;
}

#[tokio::test]
async fn policy_change_applies_in_place_to_new_streams_only() {
    let pki = TestPki::new();
    let cert = pki.agent("edge-1");
    let (echo_addr, _echo) = echo_server().await;
    let mut server = TestServer::start(&pki).await;
    let allow = "{ allow: [ { cidrs: [\"127.0.0.1/32\"] } ] }";
    let mut agent = Running::start(agent_config(&yaml(&server, &cert, "", allow), &pki));
    let session = server.next_session().await;
    agent.connected().await;
    let target = TargetAddr::parse_host_port(&echo_addr.to_string()).unwrap();
    let mut open = session.open(target.clone()).await.unwrap();
    open.write_all(b"before").await.unwrap();
    let mut buf = [0u8; 6];
    open.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"before");

    let deny = "{ allow: [ { cidrs: [\"127.0.0.1/32\"], ports: [1] } ] }";
    let outcome = agent
        .reloader
        .reload(agent_config(&yaml(&server, &cert, "", deny), &pki))
        .unwrap();
    assert_eq!(outcome.result, ReloadResult::Applied);
    assert_eq!(outcome.changed, ["policy.allow"]);
    // The open stream keeps flowing; a new one is refused by the new policy.
    open.write_all(b"during").await.unwrap();
    open.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"during");
    let refused = session.open(target).await;
    assert!(
        refused.is_err(),
        "a new stream is evaluated under the new policy"
    );
    assert!(!session.is_closed());
    assert_eq!(server.established.load(Ordering::SeqCst), 1);
    assert_eq!(agent.reloads(ReloadResult::Applied), 1.0);
    agent.stop().await;
}

#[tokio::test]
async fn server_url_change_reconnects_and_invalid_config_keeps_the_old_one() {
    let pki = TestPki::new();
    let cert = pki.agent("edge-1");
    let mut first = TestServer::start(&pki).await;
    let mut second = TestServer::start(&pki).await;
    let mut agent = Running::start(agent_config(&yaml(&first, &cert, "", "{}"), &pki));
    let old = first.next_session().await;
    agent.connected().await;

    // Invalid: rejected with its errors, counted, and the session is untouched.
    let mut invalid = agent_config(&yaml(&second, &cert, "", "{}"), &pki);
    invalid.reconnect.min_delay = tether_common::duration::HumanDuration::millis(1);
    let errors = agent.reloader.reload(invalid).unwrap_err();
    assert!(
        errors.to_string().contains("reconnect.min_delay"),
        "{errors}"
    );
    assert_eq!(agent.reloads(ReloadResult::Invalid), 1.0);
    assert!(!old.is_closed());
    assert_eq!(second.tcp_accepted.load(Ordering::SeqCst), 0);

    let outcome = agent
        .reloader
        .reload(agent_config(&yaml(&second, &cert, "", "{}"), &pki))
        .unwrap();
    assert_eq!(outcome.result, ReloadResult::Reconnected);
    assert!(
        outcome.changed.contains(&"server_url".to_owned()),
        "{outcome:?}"
    );
    let _new = second.next_session().await;
    tokio::time::timeout(WAIT, old.closed()).await.unwrap();
    assert!(old.peer_goaway().is_some(), "the old session got a GOAWAY");
    assert_eq!(agent.reloads(ReloadResult::Reconnected), 1.0);
    assert_eq!(first.established.load(Ordering::SeqCst), 1);
    agent.stop().await;
}

#[tokio::test]
async fn replaced_certificate_files_apply_in_place_and_bad_ones_are_refused() {
    let pki = TestPki::new();
    let cert = pki.agent("edge-1");
    let mut server = TestServer::start(&pki).await;
    let text = yaml(&server, &cert, "", "{}");
    let mut agent = Running::start(agent_config(&text, &pki));
    let old = server.next_session().await;
    agent.connected().await;

    // A renewed certificate, written over the same files: same config text, new material,
    // applied without touching the session.
    let renewed = pki.agent("edge-1");
    std::fs::copy(&renewed.cert_path, &cert.cert_path).unwrap();
    std::fs::copy(&renewed.key_path, &cert.key_path).unwrap();
    let outcome = agent.reloader.reload(agent_config(&text, &pki)).unwrap();
    assert_eq!(outcome.result, ReloadResult::Applied);
    assert_eq!(outcome.changed, ["tls.material"]);
    assert!(!old.is_closed(), "the session stays");

    // A key for another certificate is refused; the material in force stays.
    let other = pki.agent("edge-2");
    let config = agent_config(&text, &pki);
    std::fs::copy(&other.key_path, &cert.key_path).unwrap();
    let err = agent.reloader.reload(config).unwrap_err();
    assert!(err.to_string().contains("tls"), "{err}");
    assert_eq!(agent.reloads(ReloadResult::Invalid), 1.0);
    assert!(!old.is_closed(), "the session stays");
    assert_eq!(server.established.load(Ordering::SeqCst), 1);

    // The next handshake (after the server closes the session) uses the renewed material.
    old.close();
    let _new = server.next_session().await;
    assert_eq!(server.established.load(Ordering::SeqCst), 2);
    agent.stop().await;
}
