//! A repeating connection failure is a warning once, then one line per backoff step (attempts
//! 2, 4, 8, ...) with the attempt count and next delay, and debug otherwise: never a warning per
//! attempt (DESIGN.md lesson 1).

// Helpers outside #[test] functions panic on failure too; that is what a test wants.
#![allow(clippy::unwrap_used)]

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex};

use support::{TestServer, WAIT, agent_config};
use tether_agent::{Agent, AgentListeners};
use tether_testkit::TestPki;
use tokio_util::sync::CancellationToken;

/// The tests here capture logs with thread-local subscribers; run one at a time so that
/// tracing's per-callsite interest cache never sees them race.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

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

// Single-threaded runtime: every agent task runs on this thread and sees the test subscriber.
#[tokio::test(flavor = "current_thread")]
async fn a_failure_streak_warns_once_and_logs_per_doubling() {
    let _serial = SERIAL.lock().await;
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
    let server = TestServer::start_impostor(&pki).await;
    let yaml = format!(
        "server_url: \"wss://{}/v1/connect\"\n\
         tls: {{ cert: \"{}\", key: \"{}\", server_ca: ca.pem }}\n\
         admin_listen: \"\"\n\
         reconnect: {{ min_delay: 10ms, max_delay: 20ms }}\n",
        server.addr,
        cert.cert_path.display(),
        cert.key_path.display(),
    );
    let agent = Agent::new(agent_config(&yaml, &pki), &prometheus::Registry::new()).unwrap();
    let mut status = agent.status();
    let token = CancellationToken::new();
    let run = tokio::spawn(agent.run(AgentListeners::default(), token.clone()));
    tokio::time::timeout(WAIT, status.wait_for(|s| s.attempts >= 10))
        .await
        .unwrap()
        .unwrap();
    token.cancel();
    run.await.unwrap().unwrap();

    let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let retries: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("cannot keep a session to the server"))
        .collect();
    let warnings: Vec<&&str> = retries.iter().filter(|l| l.contains(" WARN ")).collect();
    assert_eq!(warnings.len(), 1, "{text}");
    assert!(warnings[0].contains("attempt=1"), "{text}");
    assert!(warnings[0].contains("next_delay="), "{text}");
    assert!(warnings[0].contains("reason=\"tls\""), "{text}");
    // Attempts 2, 4 and 8 at info; nothing else above debug.
    let infos: Vec<&&str> = retries.iter().filter(|l| l.contains(" INFO ")).collect();
    for (line, attempt) in infos.iter().zip([2, 4, 8]) {
        assert!(line.contains(&format!("attempt={attempt} ")), "{text}");
    }
    assert_eq!(infos.len(), 3, "{text}");
}

/// A 60 s outage at 50x compression (backoff 10 ms..1.2 s instead of 0.5 s..60 s, watched for
/// 1.2 s): the agent tries several times but writes at most 10 lines at the default level.
#[tokio::test(flavor = "current_thread")]
async fn a_long_outage_writes_a_handful_of_lines() {
    let _serial = SERIAL.lock().await;
    const COMPRESSION: u32 = 50;
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::INFO)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    // A "server" that accepts and hangs up at once: every attempt fails.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let attempts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = attempts.clone();
    let refuser = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            drop(tcp);
        }
    });
    let pki = TestPki::new();
    let cert = pki.agent("edge-1");
    let yaml = format!(
        "server_url: \"wss://{addr}/v1/connect\"\n\
         tls: {{ cert: \"{}\", key: \"{}\", server_ca: ca.pem }}\n\
         admin_listen: \"\"\n\
         reconnect: {{ min_delay: 10ms, max_delay: 1200ms }}\n",
        cert.cert_path.display(),
        cert.key_path.display(),
    );
    let agent = Agent::new(agent_config(&yaml, &pki), &prometheus::Registry::new()).unwrap();
    let token = CancellationToken::new();
    let run = tokio::spawn(agent.run(AgentListeners::default(), token.clone()));
    tokio::time::sleep(std::time::Duration::from_secs(60) / COMPRESSION).await;
    token.cancel();
    run.await.unwrap().unwrap();
    refuser.abort();

    let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let tried = attempts.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        tried >= 5,
        "the agent kept trying ({tried} attempts)\n{text}"
    );
    let lines = text.lines().count();
    eprintln!("{tried} attempts, {lines} log lines");
    assert!(lines <= 10, "{lines} lines for {tried} attempts:\n{text}");
}
