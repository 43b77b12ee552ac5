//! Whole-system test harness: servers and agents started from their library `run` entry points
//! on ephemeral loopback ports, with per-test certificates. Waiting for a condition, reading
//! metrics, loopback sockets and HTTP GET come from tether-testkit.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use tether_testkit::metrics::metric_or_zero;
use tether_testkit::{AgentCert, TestPki, bind_loopback, eventually, http_get};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use tether_testkit;

pub mod at_rest;
pub mod delay_relay;
pub mod http;
pub mod netns;
pub mod process;
pub mod proxy;

/// How long any harness wait may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(15);

/// A forward of the test server.
#[derive(Debug, Clone)]
pub struct ForwardSpec {
    /// Agent id the forward goes through.
    pub client: String,
    /// Target as the agent should dial it (`host:port`).
    pub target: String,
}

impl ForwardSpec {
    /// A forward to `target` through agent `client`.
    pub fn new(client: &str, target: impl ToString) -> Self {
        Self {
            client: client.to_string(),
            target: target.to_string(),
        }
    }
}

/// A server running in this process.
pub struct TestServer {
    /// The tunnel listener (TLS WebSocket).
    pub tunnel_addr: SocketAddr,
    /// The admin listener (plain HTTP).
    pub admin_addr: SocketAddr,
    /// One address per forward, in order.
    pub forward_addrs: Vec<SocketAddr>,
    /// The server's metrics.
    pub registry: prometheus::Registry,
    /// The server's session registry (subscribe to it, or compare it with the listing).
    pub sessions: std::sync::Arc<tether_server::SessionRegistry>,
    /// The HTTP CONNECT proxy, when `frontends.http_connect_listen` was set.
    pub http_connect_addr: Option<SocketAddr>,
    /// The SOCKS5 proxy, when `frontends.socks5_listen` was set.
    pub socks5_addr: Option<SocketAddr>,
    /// Reloads the frontends' consumers in place.
    pub frontend_control: tether_server::FrontendControl,
    /// Reloads the whole config as SIGHUP does (effective-config diff, in place or restart).
    pub reloader: tether_server::ServerReloader,
    token: CancellationToken,
    task: JoinHandle<Result<(), tether_server::ServerError>>,
}

impl TestServer {
    /// Starts a server with these forwards; `extra_yaml` is appended to the config.
    pub async fn start(pki: &TestPki, forwards: &[ForwardSpec], extra_yaml: &str) -> Self {
        let tunnel = bind_loopback().expect("bind tunnel");
        Self::start_on(pki, tunnel, forwards, extra_yaml).await
    }

    /// Starts a server on an already bound tunnel listener (to restart on the same port).
    pub async fn start_on(
        pki: &TestPki,
        tunnel: TcpListener,
        forwards: &[ForwardSpec],
        extra_yaml: &str,
    ) -> Self {
        let admin = bind_loopback().expect("bind admin");
        let mut forward_listeners = Vec::new();
        let mut forward_yaml = String::new();
        for (i, forward) in forwards.iter().enumerate() {
            let listener = bind_loopback().expect("bind forward");
            forward_yaml.push_str(&format!(
                "  - {{ name: f{i}, listen: \"{}\", client: {}, target: \"{}\" }}\n",
                listener.local_addr().expect("addr"),
                forward.client,
                forward.target
            ));
            forward_listeners.push(listener);
        }
        let tunnel_addr = tunnel.local_addr().expect("addr");
        let admin_addr = admin.local_addr().expect("addr");
        let forward_addrs = forward_listeners
            .iter()
            .map(|l| l.local_addr().expect("addr"))
            .collect();
        let mut yaml = format!(
            "version: 1\n\
             listen: \"{tunnel_addr}\"\n\
             admin_listen: \"{admin_addr}\"\n\
             tls: {{ cert: \"{}\", key: \"{}\", client_ca: \"{}\" }}\n\
             drain_timeout: 1s\n",
            pki.server_cert_path().display(),
            pki.server_key_path().display(),
            pki.ca_path().display(),
        );
        // 2s each unless `extra_yaml` sets its own.
        if !extra_yaml
            .lines()
            .any(|line| line.starts_with("handshake_timeout:"))
        {
            yaml.push_str("handshake_timeout: 2s\n");
        }
        if !extra_yaml
            .lines()
            .any(|line| line.starts_with("dial_timeout:"))
        {
            yaml.push_str("dial_timeout: 2s\n");
        }
        if !forwards.is_empty() {
            yaml.push_str("forwards:\n");
            yaml.push_str(&forward_yaml);
        }
        yaml.push_str(extra_yaml);
        let config = server_config(&yaml, pki).expect("valid server config");
        let registry = prometheus::Registry::new();
        // Frontends configured on `127.0.0.1:0` in `extra_yaml` get ephemeral listeners.
        let frontends = tether_server::FrontendListeners::bind(&config)
            .await
            .expect("bind frontends");
        let local = |l: &Option<TcpListener>| l.as_ref().map(|l| l.local_addr().expect("addr"));
        let http_connect_addr = local(&frontends.http_connect);
        let socks5_addr = local(&frontends.socks5);
        let server = tether_server::Server::new(config, &registry).expect("server starts");
        let sessions = server.registry();
        let frontend_control = server.frontend_control();
        let reloader = server.reloader();
        let token = CancellationToken::new();
        let task = tokio::spawn(server.run(
            tether_server::Listeners {
                tunnel,
                admin,
                forwards: forward_listeners,
                frontends,
            },
            token.clone(),
        ));
        Self {
            tunnel_addr,
            admin_addr,
            forward_addrs,
            registry,
            sessions,
            http_connect_addr,
            socks5_addr,
            frontend_control,
            reloader,
            token,
            task,
        }
    }

    /// `GET /v1/clients` from the admin listener.
    pub async fn clients(&self) -> tether_server::ClientsResponse {
        let (status, body) = http_get(self.admin_addr, "/v1/clients").await;
        assert_eq!(status, 200, "GET /v1/clients: {body}");
        serde_json::from_str(&body).expect("a client listing")
    }

    /// `tether_agents_connected`.
    pub fn agents_connected(&self) -> f64 {
        metric_or_zero(&self.registry, "tether_agents_connected", &[])
    }

    /// Waits until `n` agents are connected.
    pub async fn wait_agents(&self, n: usize) {
        eventually(&format!("{n} agents connected"), || {
            self.agents_connected() as usize == n
        })
        .await;
    }

    /// Stops gracefully and returns the run result.
    pub async fn stop(self) -> Result<(), tether_server::ServerError> {
        self.token.cancel();
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("server stops in time")
            .expect("server task did not panic")
    }
}

/// Parses a server config from YAML as the binary does.
pub fn server_config(yaml: &str, pki: &TestPki) -> anyhow::Result<tether_server::ServerConfig> {
    let mut config: tether_server::ServerConfig =
        tether_common::config_error::parse_yaml(yaml, "test server config")?;
    config.resolve_paths(pki.dir());
    config
        .validate()
        .map_err(|e| anyhow::anyhow!("invalid server config:\n{e}"))?;
    Ok(config)
}

/// An agent running in this process.
pub struct TestAgent {
    /// The agent's metrics.
    pub registry: prometheus::Registry,
    /// The agent's status.
    pub status: tokio::sync::watch::Receiver<tether_agent::AgentStatus>,
    token: CancellationToken,
    task: JoinHandle<Result<(), tether_agent::AgentError>>,
}

impl TestAgent {
    /// Starts an agent with certificate `cert` that dials `server`, with `policy_yaml` as the
    /// body of its `policy:` key (indented by the caller), and `extra_yaml` appended.
    pub async fn start(
        pki: &TestPki,
        cert: &AgentCert,
        server: SocketAddr,
        policy_yaml: &str,
        extra_yaml: &str,
    ) -> Self {
        Self::start_with_ca(pki, cert, server, pki.ca_path(), policy_yaml, extra_yaml).await
    }

    /// Like [`TestAgent::start`] with a chosen server CA bundle.
    pub async fn start_with_ca(
        pki: &TestPki,
        cert: &AgentCert,
        server: SocketAddr,
        server_ca: &std::path::Path,
        policy_yaml: &str,
        extra_yaml: &str,
    ) -> Self {
        let yaml = agent_yaml(server, cert, server_ca, "", policy_yaml, extra_yaml);
        Self::spawn(&yaml, pki, None)
    }

    /// Like [`TestAgent::start`], with an admin listener (`/metrics`) on `127.0.0.1:0`; returns
    /// its address too.
    pub async fn start_with_admin(
        pki: &TestPki,
        cert: &AgentCert,
        server: SocketAddr,
        policy_yaml: &str,
        extra_yaml: &str,
    ) -> (Self, SocketAddr) {
        let admin = TcpListener::bind("127.0.0.1:0").await.expect("bind admin");
        let admin_addr = admin.local_addr().expect("addr");
        let yaml = agent_yaml(
            server,
            cert,
            pki.ca_path(),
            &admin_addr.to_string(),
            policy_yaml,
            extra_yaml,
        );
        (Self::spawn(&yaml, pki, Some(admin)), admin_addr)
    }

    /// Like [`TestAgent::start`], with `protocol: remotedialer` to the server's `/connect`
    /// path; `extra_yaml` may add `headers:`.
    pub async fn start_remotedialer(
        pki: &TestPki,
        cert: &AgentCert,
        server: SocketAddr,
        policy_yaml: &str,
        extra_yaml: &str,
    ) -> Self {
        let yaml = agent_yaml(server, cert, pki.ca_path(), "", policy_yaml, extra_yaml).replacen(
            "/v1/connect\"",
            "/connect\"",
            1,
        );
        Self::spawn(&format!("{yaml}\nprotocol: remotedialer\n"), pki, None)
    }

    /// Starts an agent from a whole agent.yaml (paths relative to the PKI directory).
    pub fn from_yaml(yaml: &str, pki: &TestPki) -> Self {
        Self::spawn(yaml, pki, None)
    }

    fn spawn(yaml: &str, pki: &TestPki, admin: Option<TcpListener>) -> Self {
        let config = agent_config(yaml, pki).expect("valid agent config");
        let registry = prometheus::Registry::new();
        let agent = tether_agent::Agent::new(config, &registry).expect("agent starts");
        let status = agent.status();
        let token = CancellationToken::new();
        let task = tokio::spawn(agent.run(tether_agent::AgentListeners { admin }, token.clone()));
        Self {
            registry,
            status,
            token,
            task,
        }
    }

    /// Waits until the agent reports a live session.
    pub async fn wait_connected(&mut self) {
        tokio::time::timeout(WAIT, self.status.wait_for(|s| s.connected))
            .await
            .expect("agent connects in time")
            .expect("agent is running");
    }

    /// Ends the agent abruptly: its run future is dropped mid-flight, without GOAWAY or
    /// graceful close (what is left must still be cleaned up by ownership).
    pub async fn kill(self) {
        self.task.abort();
        // Cancelled is the expected outcome.
        let _ = self.task.await;
    }

    /// Stops gracefully and returns the run result.
    pub async fn stop(self) -> Result<(), tether_agent::AgentError> {
        self.token.cancel();
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("agent stops in time")
            .expect("agent task did not panic")
    }
}

/// The YAML of a test agent: short timings, `admin_listen` as given (`""` for none).
fn agent_yaml(
    server: SocketAddr,
    cert: &AgentCert,
    server_ca: &std::path::Path,
    admin_listen: &str,
    policy_yaml: &str,
    extra_yaml: &str,
) -> String {
    format!(
        "version: 1\n\
         server_url: \"wss://{server}/v1/connect\"\n\
         tls: {{ cert: \"{}\", key: \"{}\", server_ca: \"{}\" }}\n\
         admin_listen: \"{admin_listen}\"\n\
         connect_timeout: 2s\n\
         dial_timeout: 2s\n\
         reconnect: {{ min_delay: 50ms, max_delay: 500ms }}\n\
         policy:\n{policy_yaml}\n{extra_yaml}",
        cert.cert_path.display(),
        cert.key_path.display(),
        server_ca.display(),
    )
}

/// Parses an agent config from YAML as the binary does.
pub fn agent_config(yaml: &str, pki: &TestPki) -> anyhow::Result<tether_agent::AgentConfig> {
    let mut config: tether_agent::AgentConfig =
        tether_common::config_error::parse_yaml(yaml, "test agent config")
            .context("parse agent config")?;
    config.resolve_paths(pki.dir());
    config
        .validate()
        .map_err(|e| anyhow::anyhow!("invalid agent config:\n{e}"))?;
    Ok(config)
}

/// A policy body allowing exactly `addr` (an IP CIDR rule for its host and its port).
pub fn allow_only(addr: SocketAddr) -> String {
    format!(
        "  allow:\n    - {{ cidrs: [\"{}/32\"], ports: [\"{}\"] }}\n",
        addr.ip(),
        addr.port()
    )
}

pub use tether_testkit::assert_no_prior_connection;

/// Reads from a consumer connection whose tunnel stream failed; returns whether it ended with
/// an error (reset) rather than a clean EOF.
pub async fn ends_with_error(stream: &mut tokio::net::TcpStream) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(WAIT, stream.read(&mut buf)).await {
            Err(_) => panic!("consumer connection neither closed nor failed in time"),
            Ok(Ok(0)) => return false,
            Ok(Ok(_)) => continue,
            Ok(Err(_)) => return true,
        }
    }
}

/// Connects a consumer to `addr` and reports whether the connection ends with an error (a reset
/// that may already arrive during connect) rather than a clean EOF.
pub async fn consumer_gets_error(addr: SocketAddr) -> bool {
    match tokio::net::TcpStream::connect(addr).await {
        Err(_) => true,
        Ok(mut stream) => ends_with_error(&mut stream).await,
    }
}

/// Waits until a 1-byte echo through `forward` works: the server has registered the agent's
/// session (the agent may report "connected" a moment before the server does).
pub async fn wait_forward_echo(forward: SocketAddr) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let attempt = async {
            let mut stream = tokio::net::TcpStream::connect(forward).await?;
            stream.write_all(b"?").await?;
            let mut byte = [0u8; 1];
            stream.read_exact(&mut byte).await?;
            Ok::<_, std::io::Error>(())
        };
        if let Ok(Ok(())) = tokio::time::timeout(WAIT, attempt).await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "forward {forward} never echoed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A server with one forward to `target` through agent `edge-1`, and that agent connected with a
/// policy allowing exactly `target`; returns once the server has registered the session.
pub async fn connected_pair(pki: &TestPki, target: SocketAddr) -> (TestServer, TestAgent) {
    let server = TestServer::start(pki, &[ForwardSpec::new("edge-1", target)], "").await;
    let mut agent = TestAgent::start(
        pki,
        &pki.agent("edge-1"),
        server.tunnel_addr,
        &allow_only(target),
        "",
    )
    .await;
    agent.wait_connected().await;
    server.wait_agents(1).await;
    (server, agent)
}

/// Sends `len` bytes through `addr`, half-closes, and checks the echo byte for byte.
pub async fn echo_exact(addr: SocketAddr, len: usize) -> Result<(), String> {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut read, mut write) = stream.split();
    let send = async {
        write.write_all(&payload).await?;
        write.shutdown().await
    };
    let mut echoed = Vec::with_capacity(len);
    let receive = read.read_to_end(&mut echoed);
    let (sent, received) = tokio::time::timeout(WAIT, async { tokio::join!(send, receive) })
        .await
        .map_err(|_| "echo timed out".to_owned())?;
    sent.map_err(|e| e.to_string())?;
    received.map_err(|e| e.to_string())?;
    if echoed == payload {
        Ok(())
    } else {
        Err(format!("echo differs: {} of {len} bytes", echoed.len()))
    }
}
