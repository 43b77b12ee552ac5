//! A minimal in-test tunnel server (TLS, `tether.v1` upgrade, mux session as the server) and
//! helpers to start an agent against it.
#![allow(
    dead_code,
    unreachable_pub,
    clippy::unwrap_used,
    clippy::result_large_err
)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tether_agent::ws_transport::WsTransport;
use tether_agent::{Agent, AgentConfig, AgentError, AgentListeners, AgentStatus};
use tether_common::pki::{CertifiedKeyPem, IssueOptions};
use tether_mux::{MuxConfig, MuxMetrics, Role, Session};
use tether_testkit::{AgentCert, TestPki};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderMap, HeaderValue, StatusCode};
use tokio_util::sync::CancellationToken;

/// Generous bound for anything a test waits for.
pub const WAIT: Duration = Duration::from_secs(10);

/// The test server: every agent connection that completes TLS and the upgrade becomes a
/// server-side session, handed to the test through `sessions`.
pub struct TestServer {
    pub addr: SocketAddr,
    pub sessions: mpsc::Receiver<Session>,
    /// TCP connections accepted.
    pub tcp_accepted: Arc<AtomicUsize>,
    /// Sessions established (TLS and upgrade done).
    pub established: Arc<AtomicUsize>,
    /// Request headers of every accepted upgrade.
    pub headers: Arc<Mutex<Vec<HeaderMap>>>,
    task: JoinHandle<()>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TestServer {
    /// A server with the PKI's `localhost`/`127.0.0.1` certificate.
    pub async fn start(pki: &TestPki) -> TestServer {
        Self::start_with(pki, pki.server_cert_pem(), pki.server_key_pem()).await
    }

    /// A server presenting a certificate from the unrelated CA (agents must refuse it).
    pub async fn start_impostor(pki: &TestPki) -> TestServer {
        let CertifiedKeyPem { cert_pem, key_pem } = pki
            .other_ca()
            .issue_server(
                &["localhost".to_owned()],
                &["127.0.0.1".parse().unwrap()],
                &IssueOptions::default(),
            )
            .unwrap();
        Self::start_with(pki, &cert_pem, &key_pem).await
    }

    async fn start_with(pki: &TestPki, cert_pem: &str, key_pem: &str) -> TestServer {
        let tls =
            tether_common::tls::server_config_from_pem(cert_pem, key_pem, pki.ca_pem()).unwrap();
        let listener = tether_testkit::bind_loopback().unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, sessions) = mpsc::channel(16);
        let tcp_accepted = Arc::new(AtomicUsize::new(0));
        let established = Arc::new(AtomicUsize::new(0));
        let headers = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn(accept_loop(
            listener,
            TlsAcceptor::from(tls),
            tx,
            tcp_accepted.clone(),
            established.clone(),
            headers.clone(),
        ));
        TestServer {
            addr,
            sessions,
            tcp_accepted,
            established,
            headers,
            task,
        }
    }

    /// The next session an agent establishes.
    pub async fn next_session(&mut self) -> Session {
        tokio::time::timeout(WAIT, self.sessions.recv())
            .await
            .expect("an agent connects in time")
            .expect("server running")
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    sessions: mpsc::Sender<Session>,
    tcp_accepted: Arc<AtomicUsize>,
    established: Arc<AtomicUsize>,
    headers: Arc<Mutex<Vec<HeaderMap>>>,
) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        tcp_accepted.fetch_add(1, Ordering::SeqCst);
        connections.spawn(serve_connection(
            tcp,
            acceptor.clone(),
            sessions.clone(),
            established.clone(),
            headers.clone(),
        ));
    }
}

async fn serve_connection(
    tcp: TcpStream,
    acceptor: TlsAcceptor,
    sessions: mpsc::Sender<Session>,
    established: Arc<AtomicUsize>,
    headers: Arc<Mutex<Vec<HeaderMap>>>,
) {
    let Ok(tls) = acceptor.accept(tcp).await else {
        return;
    };
    let seen = headers.clone();
    let callback = move |request: &Request, mut response: Response| {
        let offered = request
            .headers()
            .get("sec-websocket-protocol")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !offered.split(',').any(|p| p.trim() == "tether.v1") {
            let mut refusal = ErrorResponse::new(Some("tether.v1 required".into()));
            *refusal.status_mut() = StatusCode::BAD_REQUEST;
            return Err(refusal);
        }
        seen.lock().unwrap().push(request.headers().clone());
        response.headers_mut().insert(
            "sec-websocket-protocol",
            HeaderValue::from_static("tether.v1"),
        );
        response
            .headers_mut()
            .insert("x-tether-server", HeaderValue::from_static("test-server"));
        Ok(response)
    };
    let Ok(ws) = tokio_tungstenite::accept_hdr_async(tls, callback).await else {
        return;
    };
    established.fetch_add(1, Ordering::SeqCst);
    let config = MuxConfig::default();
    let transport = WsTransport::new(ws, config.limits());
    let (session, _incoming, driver) =
        Session::new(transport, Role::Server, config, MuxMetrics::unregistered());
    if sessions.send(session).await.is_err() {
        return;
    }
    driver.run().await;
}

/// An agent configured against `server_addr`, run in a task.
pub struct TestAgent {
    pub registry: prometheus::Registry,
    pub status: watch::Receiver<AgentStatus>,
    pub admin: Option<SocketAddr>,
    token: CancellationToken,
    task: JoinHandle<Result<(), AgentError>>,
}

impl TestAgent {
    /// Starts an agent whose `policy:` is `policy_yaml` (a flow mapping) and whose server CA
    /// is the PKI's CA; `admin` binds an admin listener on `127.0.0.1:0`.
    pub async fn start(
        pki: &TestPki,
        cert: &AgentCert,
        server_addr: SocketAddr,
        policy_yaml: &str,
        admin: bool,
    ) -> TestAgent {
        let yaml = format!(
            "version: 1\n\
             server_url: \"wss://{server_addr}/v1/connect\"\n\
             tls: {{ cert: \"{}\", key: \"{}\", server_ca: ca.pem }}\n\
             labels: {{ role: upstream, cluster: eu-1 }}\n\
             admin_listen: \"\"\n\
             connect_timeout: 2s\n\
             dial_timeout: 2s\n\
             reconnect: {{ min_delay: 50ms, max_delay: 200ms, reset_after: 30s }}\n\
             policy: {policy_yaml}\n",
            cert.cert_path.display(),
            cert.key_path.display(),
        );
        let config = agent_config(&yaml, pki);
        let registry = prometheus::Registry::new();
        let agent = Agent::new(config, &registry).expect("agent starts");
        let status = agent.status();
        let (listener, admin) = if admin {
            let listener = tether_testkit::bind_loopback().unwrap();
            let addr = listener.local_addr().unwrap();
            (Some(listener), Some(addr))
        } else {
            (None, None)
        };
        let token = CancellationToken::new();
        let task = tokio::spawn(agent.run(AgentListeners { admin: listener }, token.clone()));
        TestAgent {
            registry,
            status,
            admin,
            token,
            task,
        }
    }

    /// Waits until the status satisfies `f`.
    pub async fn wait_for(&mut self, f: impl FnMut(&AgentStatus) -> bool) -> AgentStatus {
        tokio::time::timeout(WAIT, self.status.wait_for(f))
            .await
            .expect("agent reaches the expected state in time")
            .expect("agent running")
            .clone()
    }

    /// Stops the agent and returns what `run` returned.
    pub async fn stop(self) -> Result<(), AgentError> {
        self.token.cancel();
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("agent stops in time")
            .expect("agent task did not panic")
    }
}

/// Parses `yaml` as agent.yaml in the PKI directory, resolves paths and validates.
pub fn agent_config(yaml: &str, pki: &TestPki) -> AgentConfig {
    let mut config: AgentConfig =
        tether_common::config_error::parse_yaml(yaml, "agent.yaml").expect("agent.yaml parses");
    config.resolve_paths(pki.dir());
    if let Err(errors) = config.validate() {
        panic!("invalid agent.yaml:\n{errors}");
    }
    config
}
