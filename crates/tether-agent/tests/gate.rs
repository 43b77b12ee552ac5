//! The activation gate (DESIGN.md lesson 1) against a counting test server: a gated-off agent
//! opens no TCP connection and logs its decision once; flipping the watched role file enables
//! it (a session appears), flipping back closes the session; an unreadable role file keeps it
//! idle with the reason on `/readyz`.

// Helpers outside #[test] functions panic on failure too; that is what a test wants.
#![allow(clippy::unwrap_used)]

mod support;

use std::io::Write;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::{TestServer, WAIT, agent_config};
use tether_agent::{Agent, AgentListeners};
use tether_testkit::TestPki;
use tether_testkit::http_get;
use tether_testkit::metrics::metric_sum;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn count(&self, needle: &str) -> usize {
        let text = String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned();
        text.lines().filter(|l| l.contains(needle)).count()
    }
}

/// Replaces `path` atomically, as a ConfigMap update does (a reader never sees half a file).
fn replace(path: &std::path::Path, text: &str) {
    let staged = path.with_extension("new");
    std::fs::write(&staged, text).unwrap();
    std::fs::rename(&staged, path).unwrap();
}

/// How long a gated-off agent is watched for connection attempts.
const IDLE_WATCH: Duration = Duration::from_secs(10);
/// The bound on noticing a role-file change (the gate polls every second).
const GATE_REACTION: Duration = Duration::from_secs(2);

// Single-threaded runtime: every agent task runs on this thread and sees the test subscriber.
#[tokio::test(flavor = "current_thread")]
async fn gated_off_agent_stays_idle_and_follows_the_role_file() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::INFO)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let pki = TestPki::new();
    let cert = pki.agent("edge-1");
    let mut server = TestServer::start(&pki).await;
    let roles = tempfile::tempdir().unwrap();
    let role_file = roles.path().join("cluster.yaml");
    std::fs::write(&role_file, "role: downstream\nfeatures: [mcm]\n").unwrap();
    let yaml = format!(
        "server_url: \"wss://{}/v1/connect\"\n\
         tls: {{ cert: \"{}\", key: \"{}\", server_ca: ca.pem }}\n\
         reconnect: {{ min_delay: 10ms, max_delay: 50ms }}\n\
         activation:\n  require_role: [upstream]\n  require_features: [mcm]\n  \
         source: {{ from: file, file: \"{}\" }}\n  poll_interval: 1s\n",
        server.addr,
        cert.cert_path.display(),
        cert.key_path.display(),
        role_file.display(),
    );
    let registry = prometheus::Registry::new();
    let agent = Agent::new(agent_config(&yaml, &pki), &registry).unwrap();
    let mut status = agent.status();
    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin_addr = admin.local_addr().unwrap();
    let token = CancellationToken::new();
    let run = tokio::spawn(agent.run(AgentListeners { admin: Some(admin) }, token.clone()));

    // Gated off: idle, healthy, and never a single TCP connection to the server.
    tokio::time::timeout(WAIT, status.wait_for(|s| s.gate_disabled.is_some()))
        .await
        .unwrap()
        .unwrap();
    tokio::time::sleep(IDLE_WATCH).await;
    assert_eq!(server.tcp_accepted.load(Ordering::SeqCst), 0);
    assert_eq!(captured.count("activation gate disabled"), 1);
    assert_eq!(http_get(admin_addr, "/healthz").await.0, 200);
    let (code, body) = http_get(admin_addr, "/readyz").await;
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains("idle: activation gate disabled: cluster role `downstream`"),
        "{body}"
    );
    let gate = |state| metric_sum(&registry, "tether_agent_gate", &[("state", state)]);
    assert_eq!((gate("enabled"), gate("disabled")), (0.0, 1.0));

    // The role file now matches: the gate opens within the bound and a session appears.
    replace(&role_file, "role: upstream\nfeatures: [mcm, other]\n");
    tokio::time::timeout(
        GATE_REACTION,
        status.wait_for(|s| s.gate_disabled.is_none()),
    )
    .await
    .expect("gate noticed the role file within 2 s")
    .unwrap();
    let session = server.next_session().await;
    tokio::time::timeout(WAIT, status.wait_for(|s| s.connected))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((gate("enabled"), gate("disabled")), (1.0, 0.0));
    assert_eq!(http_get(admin_addr, "/readyz").await.1, "ready\n");

    // And back: the session is closed gracefully (GOAWAY), and no new connection follows.
    replace(&role_file, "role: downstream\n");
    tokio::time::timeout(GATE_REACTION + WAIT, session.closed())
        .await
        .expect("session closed after the gate closed");
    assert!(session.peer_goaway().is_some(), "closed with GOAWAY");
    let dialed = server.tcp_accepted.load(Ordering::SeqCst);
    assert_eq!(dialed, 1);

    // An unreadable role source is a reason, shown on /readyz; still no connection.
    std::fs::remove_file(&role_file).unwrap();
    tokio::time::timeout(
        WAIT,
        status.wait_for(|s| {
            s.gate_disabled
                .as_deref()
                .is_some_and(|r| r.contains("cannot read role file"))
        }),
    )
    .await
    .unwrap()
    .unwrap();
    let (code, body) = http_get(admin_addr, "/readyz").await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("cannot read role file"), "{body}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(server.tcp_accepted.load(Ordering::SeqCst), dialed);
    // Each decision was logged once: disabled, enabled, disabled, disabled (unreadable).
    assert_eq!(captured.count("activation gate disabled"), 3);
    assert_eq!(
        captured.count("activation gate enabled"),
        1,
        "{}",
        String::from_utf8_lossy(&captured.0.lock().unwrap())
    );

    token.cancel();
    run.await.unwrap().unwrap();
}
