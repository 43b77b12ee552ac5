//! Test harness: a server running on `127.0.0.1:0` listeners, mutual-TLS clients, raw HTTP over
//! them, an agent made of tokio-tungstenite plus a mux session, and metric readers.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use futures::{Sink, Stream};
use rustls_pki_types::ServerName;
use tether_mux::{Incoming, MuxConfig, MuxMetrics, Role, Session, SessionEnd, TransportError};
use tether_proto::{Frame, Host, Limits};
use tether_server::{Listeners, Server, ServerConfig, ServerError, SessionRegistry, TlsConfig};
pub(crate) use tether_testkit::eventually;
pub(crate) use tether_testkit::metrics::registry_sample as metric;
use tether_testkit::{AgentCert, TestPki};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Response;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_util::sync::CancellationToken;

// === server ===

/// A config for `pki` with every listener on `127.0.0.1:0`.
pub(crate) fn base_config(pki: &TestPki) -> ServerConfig {
    ServerConfig {
        listen: "127.0.0.1:0".into(),
        admin_listen: "127.0.0.1:0".into(),
        tls: TlsConfig {
            cert: pki.server_cert_path().to_owned(),
            key: pki.server_key_path().to_owned(),
            client_ca: pki.ca_path().to_owned(),
            crls: Vec::new(),
        },
        drain_timeout: tether_common::duration::HumanDuration::secs(2),
        ..ServerConfig::default()
    }
}

/// A server running in a task.
pub(crate) struct Running {
    pub(crate) tunnel: SocketAddr,
    pub(crate) admin: SocketAddr,
    pub(crate) forwards: Vec<SocketAddr>,
    pub(crate) registry: Arc<SessionRegistry>,
    pub(crate) prometheus: prometheus::Registry,
    pub(crate) shutdown: CancellationToken,
    pub(crate) reloader: tether_server::ServerReloader,
    task: JoinHandle<Result<(), ServerError>>,
}

/// Binds `config`'s addresses (all `127.0.0.1:0`) and runs the server.
pub(crate) async fn start(config: ServerConfig) -> Running {
    // `RUST_LOG=tether_server=debug cargo test` shows the server's logs.
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .try_init();
    let listeners = Listeners::bind(&config).await.expect("bind listeners");
    let tunnel = listeners.tunnel.local_addr().expect("tunnel addr");
    let admin = listeners.admin.local_addr().expect("admin addr");
    let forwards = listeners
        .forwards
        .iter()
        .map(|l| l.local_addr().expect("forward addr"))
        .collect();
    let prometheus = prometheus::Registry::new();
    let server = Server::new(config, &prometheus).expect("build the server");
    let registry = server.registry();
    let reloader = server.reloader();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(server.run(listeners, shutdown.clone()));
    Running {
        tunnel,
        admin,
        forwards,
        registry,
        prometheus,
        shutdown,
        reloader,
        task,
    }
}

impl Running {
    /// Cancels and waits for `run` to return (bounded).
    pub(crate) async fn stop(self) -> Result<(), ServerError> {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(15), self.task)
            .await
            .expect("server stops within 15 s")
            .expect("server task did not panic")
    }

    /// The value of one series (`name{label="value"}`) in the text exposition; 0 if absent.
    pub(crate) fn metric(&self, series: &str) -> f64 {
        metric(&self.prometheus, series)
    }
}

// === TLS and raw HTTP ===

/// The rustls client config of `agent`, trusting the test CA.
pub(crate) fn client_config(pki: &TestPki, agent: &AgentCert) -> Arc<rustls::ClientConfig> {
    tether_common::tls::client_config_from_pem(&agent.cert_pem, &agent.key_pem, pki.ca_pem())
        .expect("client config")
}

/// TCP + TLS to `addr` as `localhost`.
pub(crate) async fn tls_connect(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("localhost").expect("server name");
    TlsConnector::from(config).connect(name, tcp).await
}

/// A parsed HTTP response.
#[derive(Debug)]
pub(crate) struct HttpResponse {
    pub(crate) status: u16,
    pub(crate) head: String,
    pub(crate) body: String,
}

impl HttpResponse {
    /// A header value (case-insensitive name).
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|line| {
            let (k, v) = line.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// Writes `request` as is and reads one response (head, then a `Content-Length` body).
pub(crate) async fn http_exchange<S>(io: &mut S, request: &str) -> std::io::Result<HttpResponse>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    io.write_all(request.as_bytes()).await?;
    io.flush().await?;
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break pos + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = io.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status code");
    let mut response = HttpResponse {
        status,
        head,
        body: String::new(),
    };
    let len: usize = response
        .header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = buf[head_end..].to_vec();
    while body.len() < len {
        let mut chunk = [0u8; 4096];
        let n = io.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    response.body = String::from_utf8_lossy(&body).into_owned();
    Ok(response)
}

/// A plain-HTTP GET on the admin listener.
pub(crate) async fn admin_get(admin: SocketAddr, path: &str) -> HttpResponse {
    let mut tcp = TcpStream::connect(admin).await.expect("connect admin");
    http_exchange(
        &mut tcp,
        &format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"),
    )
    .await
    .expect("admin response")
}

/// Reads from a socket the server closed; `true` if it saw EOF or an error within 2 s.
pub(crate) async fn closed_within_2s<S: AsyncRead + Unpin>(io: &mut S) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(Duration::from_secs(2), io.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

// === agent ===

/// Upgrades over mutual TLS with `Sec-WebSocket-Protocol: tether.v1`.
pub(crate) async fn ws_connect(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    instance: &str,
) -> Result<(WebSocketStream<TlsStream<TcpStream>>, Response), tungstenite::Error> {
    let tls = tls_connect(addr, config).await?;
    let mut request = "wss://localhost/v1/connect".into_client_request()?;
    let headers = request.headers_mut();
    headers.insert(
        "sec-websocket-protocol",
        http::HeaderValue::from_static("tether.v1"),
    );
    headers.insert(
        "x-tether-instance",
        http::HeaderValue::from_str(instance).expect("instance header"),
    );
    headers.insert("x-tether-version", http::HeaderValue::from_static("0.1.0"));
    tokio_tungstenite::client_async_with_config(request, tls, None).await
}

/// An agent-side session over a connected WebSocket, with its driver in a task.
pub(crate) struct TestAgent {
    pub(crate) session: Session,
    pub(crate) incoming: Incoming,
    pub(crate) driver: JoinHandle<SessionEnd>,
}

pub(crate) async fn connect_agent(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    instance: &str,
) -> (TestAgent, Response) {
    let (ws, response) = ws_connect(addr, config, instance)
        .await
        .expect("agent upgrade");
    let mux = MuxConfig::default();
    let transport = ClientWs {
        ws,
        limits: mux.limits(),
    };
    let (session, incoming, driver) =
        Session::new(transport, Role::Agent, mux, MuxMetrics::unregistered());
    let driver = tokio::spawn(driver.run());
    (
        TestAgent {
            session,
            incoming,
            driver,
        },
        response,
    )
}

/// Accepts every stream the server opens, dials its target (an IP literal) and pipes.
pub(crate) fn spawn_dialing_agent(mut incoming: Incoming) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut pipes = tokio::task::JoinSet::new();
        while let Some(pending) = incoming.accept().await {
            let Host::Ip(ip) = pending.target().host else {
                pending.reject(tether_proto::OpenErrorCode::Unsupported, "test agent");
                continue;
            };
            let addr = SocketAddr::new(ip, pending.target().port);
            let Ok(mut tcp) = TcpStream::connect(addr).await else {
                pending.reject(tether_proto::OpenErrorCode::Refused, "refused");
                continue;
            };
            let Ok(mut stream) = pending.accept() else {
                continue;
            };
            pipes.spawn(async move {
                let _ = tether_mux::pipe::pipe(&mut stream, &mut tcp).await;
            });
        }
    })
}

/// A client-side tokio-tungstenite socket as a frame transport.
struct ClientWs {
    ws: WebSocketStream<TlsStream<TcpStream>>,
    limits: Limits,
}

fn ws_err(err: tungstenite::Error) -> TransportError {
    TransportError::Other(err.to_string())
}

impl Stream for ClientWs {
    type Item = Result<Frame, TransportError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            let msg = match ready!(Pin::new(&mut self.ws).poll_next(cx)) {
                None => return Poll::Ready(None),
                Some(Err(err)) => return Poll::Ready(Some(Err(ws_err(err)))),
                Some(Ok(msg)) => msg,
            };
            match msg {
                Message::Binary(bytes) => {
                    return Poll::Ready(Some(
                        tether_proto::decode(&bytes, &self.limits)
                            .map_err(TransportError::Malformed),
                    ));
                }
                Message::Close(_) => return Poll::Ready(None),
                Message::Text(_) => {
                    return Poll::Ready(Some(Err(TransportError::Other("text frame".into()))));
                }
                _ => {}
            }
        }
    }
}

impl Sink<Frame> for ClientWs {
    type Error = TransportError;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Pin::new(&mut self.ws).poll_ready(cx).map_err(ws_err)
    }

    fn start_send(mut self: Pin<&mut Self>, frame: Frame) -> Result<(), Self::Error> {
        let bytes = tether_proto::codec::encode_to_bytes(&frame);
        Pin::new(&mut self.ws)
            .start_send(Message::Binary(bytes))
            .map_err(ws_err)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Pin::new(&mut self.ws).poll_flush(cx).map_err(ws_err)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Pin::new(&mut self.ws).poll_close(cx).map_err(ws_err)
    }
}
