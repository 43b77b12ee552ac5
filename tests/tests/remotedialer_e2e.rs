//! A tether server and a tether agent speaking rancher/remotedialer to each other (the agent's
//! `protocol: remotedialer`, the server's `/connect` path): byte-exact transfers, concurrency,
//! refused and denied targets, slow readers, the half-close linger, token and tunnel-id
//! checks, the listing and metrics, and reconnects.

#![allow(clippy::unwrap_used)] // test helpers panic on failure by design

use std::net::SocketAddr;
use std::time::Duration;

use tether_e2e::tether_testkit::{TestPki, echo_server};
use tether_e2e::{ForwardSpec, TestAgent, TestServer, allow_only, consumer_gets_error};
use tether_testkit::eventually;
use tether_testkit::metrics::metric_or_zero;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

/// Server settings of these tests: a short half-close linger.
const SERVER_YAML: &str = "remotedialer: { close_linger: 1s }\n";

/// A target that reads a length (u64) and that many bytes, sends them back after an optional
/// pause, and closes: a request/response exchange, which remotedialer can carry (it cannot
/// carry a half-close, so an echo-until-EOF target would never see the end).
struct Responder {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn responder(pause: Duration) -> Responder {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut conns = JoinSet::new();
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            conns.spawn(async move {
                let Ok(len) = sock.read_u64().await else {
                    return;
                };
                let mut buf = vec![0u8; len as usize];
                if sock.read_exact(&mut buf).await.is_err() {
                    return;
                }
                tokio::time::sleep(pause).await;
                let _ = sock.write_all(&buf).await;
                let _ = sock.shutdown().await;
            });
            while conns.try_join_next().is_some() {}
        }
    });
    Responder { addr, task }
}

/// Sends `payload` (length-prefixed) through `forward`; returns what came back before EOF,
/// reading only after `read_delay`.
async fn exchange(forward: SocketAddr, payload: Vec<u8>, read_delay: Duration) -> Vec<u8> {
    let stream = TcpStream::connect(forward).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let (mut read, mut write) = stream.into_split();
    let len = payload.len() as u64;
    let writer = tokio::spawn(async move {
        write.write_u64(len).await.unwrap();
        write.write_all(&payload).await.unwrap();
        // A half-close: carried as "wait for the target to close".
        write.shutdown().await.unwrap();
    });
    tokio::time::sleep(read_delay).await;
    let mut back = Vec::new();
    if let Err(e) = read.read_to_end(&mut back).await {
        panic!("read failed after {} bytes: {e}", back.len());
    }
    writer.await.unwrap();
    back
}

fn payload(size: usize, seed: u64) -> Vec<u8> {
    let mut bytes = vec![0u8; size];
    fastrand::Rng::with_seed(seed).fill(&mut bytes);
    bytes
}

async fn rd_pair(pki: &TestPki, targets: &[SocketAddr], policy: &str) -> (TestServer, TestAgent) {
    let forwards: Vec<ForwardSpec> = targets
        .iter()
        .map(|t| ForwardSpec::new("edge-1", t))
        .collect();
    let server = TestServer::start(pki, &forwards, SERVER_YAML).await;
    let mut agent =
        TestAgent::start_remotedialer(pki, &pki.agent("edge-1"), server.tunnel_addr, policy, "")
            .await;
    agent.wait_connected().await;
    server.wait_agents(1).await;
    (server, agent)
}

async fn streams_settle(server: &TestServer, agent: &TestAgent) {
    eventually("no stream left on either side", || {
        metric_or_zero(&server.registry, "tether_streams_active", &[]) == 0.0
            && metric_or_zero(&agent.registry, "tether_streams_active", &[]) == 0.0
    })
    .await;
    let opened = metric_or_zero(&server.registry, "tether_streams_opened_total", &[]);
    let closed =
        tether_testkit::metrics::metric_sum(&server.registry, "tether_streams_closed_total", &[]);
    assert_eq!(opened, closed, "server: every stream opened was closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn byte_exact_transfers_listing_and_metrics() {
    let pki = TestPki::new();
    let target = responder(Duration::ZERO).await;
    let (server, agent) = rd_pair(&pki, &[target.addr], &allow_only(target.addr)).await;
    let forward = server.forward_addrs[0];
    for size in [0usize, 1, 65_537, 1 << 20, 16 << 20] {
        let sent = payload(size, size as u64);
        let back = exchange(forward, sent.clone(), Duration::ZERO).await;
        assert_eq!(back.len(), size, "length for size {size}");
        assert!(back == sent, "content for size {size}");
    }
    let listing = server.clients().await;
    let client = listing
        .clients
        .iter()
        .find(|c| c.client == "edge-1")
        .unwrap();
    assert_eq!(client.sessions.len(), 1);
    assert_eq!(client.sessions[0].protocol, "remotedialer");
    assert_eq!(
        metric_or_zero(
            &server.registry,
            "tether_protocol_sessions",
            &[("protocol", "remotedialer")]
        ),
        1.0
    );
    assert_eq!(
        metric_or_zero(
            &server.registry,
            "tether_protocol_sessions",
            &[("protocol", "tether.v1")]
        ),
        0.0
    );
    streams_settle(&server, &agent).await;
    agent.stop().await.unwrap();
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_hundred_concurrent_exchanges() {
    let pki = TestPki::new();
    let target = responder(Duration::ZERO).await;
    let (server, agent) = rd_pair(&pki, &[target.addr], &allow_only(target.addr)).await;
    let forward = server.forward_addrs[0];
    let mut tasks = JoinSet::new();
    for n in 0..100u64 {
        tasks.spawn(async move {
            let sent = payload(64 * 1024 + n as usize * 97, n);
            let back = exchange(forward, sent.clone(), Duration::ZERO).await;
            assert!(back == sent, "exchange {n}");
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    streams_settle(&server, &agent).await;
    assert_eq!(
        metric_or_zero(&server.registry, "tether_streams_opened_total", &[]),
        100.0
    );
    agent.stop().await.unwrap();
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_and_refused_targets_fail_only_their_connection() {
    let pki = TestPki::new();
    let allowed = responder(Duration::ZERO).await;
    let denied = responder(Duration::ZERO).await;
    // A port that refuses: bound, then closed.
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let policy = format!(
        "  allow:\n    - {{ cidrs: [\"127.0.0.1/32\"], ports: [\"{}\", \"{}\"] }}\n",
        allowed.addr.port(),
        closed.port()
    );
    let (server, agent) = rd_pair(&pki, &[allowed.addr, denied.addr, closed], &policy).await;
    let [ok, deny, refuse] = [
        server.forward_addrs[0],
        server.forward_addrs[1],
        server.forward_addrs[2],
    ];
    // No dial acknowledgement: the consumer sees the failure as a reset, never a clean EOF.
    assert!(consumer_gets_error(deny).await, "denied target");
    assert!(consumer_gets_error(refuse).await, "refused target");
    // The session survived both: a Go agent would have dropped it for the denial.
    assert_eq!(server.agents_connected(), 1.0);
    let back = exchange(ok, b"still here".to_vec(), Duration::ZERO).await;
    assert_eq!(back, b"still here");
    eventually("the agent counted the denial", || {
        tether_testkit::metrics::metric_sum(
            &agent.registry,
            "tether_agent_policy_denials_total",
            &[],
        ) >= 1.0
    })
    .await;
    streams_settle(&server, &agent).await;
    // The agent's refusals travel as Go-worded Errors and come back as refused dials.
    for (reason, count) in [("refused", 2.0), ("reset", 0.0)] {
        assert_eq!(
            metric_or_zero(
                &server.registry,
                "tether_streams_closed_total",
                &[("reason", reason)]
            ),
            count,
            "server streams closed with reason {reason}"
        );
    }
    agent.stop().await.unwrap();
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_reader_gets_every_byte() {
    // 12 MiB back to a consumer that starts reading 2 s late: the agent's side buffers past
    // 2 MiB, pauses the server... and Resume must wake the writer (Go's stalls here).
    let pki = TestPki::new();
    let target = responder(Duration::ZERO).await;
    let (server, agent) = rd_pair(&pki, &[target.addr], &allow_only(target.addr)).await;
    let sent = payload(12 << 20, 7);
    let back = exchange(
        server.forward_addrs[0],
        sent.clone(),
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(back.len(), sent.len());
    assert!(back == sent);
    streams_settle(&server, &agent).await;
    agent.stop().await.unwrap();
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_closed_connection_is_ended_after_the_linger() {
    // An echo target never closes by itself; the consumer leaves after its answer.
    let pki = TestPki::new();
    let (target, _echo) = echo_server().await;
    let (server, agent) = rd_pair(&pki, &[target], &allow_only(target)).await;
    let mut stream = TcpStream::connect(server.forward_addrs[0]).await.unwrap();
    stream.write_all(b"hello").await.unwrap();
    let mut buf = [0u8; 5];
    stream.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"hello");
    drop(stream);
    // Within close_linger (1 s) plus a keepalive interval, both sides let go.
    streams_settle(&server, &agent).await;
    agent.stop().await.unwrap();
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_and_tunnel_id_are_checked() {
    let pki = TestPki::new();
    let token_path = pki.dir().join("rd-token");
    std::fs::write(&token_path, "s3cret-token\n").unwrap();
    let yaml = format!(
        "remotedialer: {{ token_file: \"{}\", require_tunnel_id: true }}\n",
        token_path.display()
    );
    let server = TestServer::start(&pki, &[], &yaml).await;
    let cert = pki.agent("edge-1");
    let policy = "  allow: []\n";
    // Wrong token: 401, counted, never connected.
    let wrong = TestAgent::start_remotedialer(
        &pki,
        &cert,
        server.tunnel_addr,
        policy,
        "headers: { X-API-Tunnel-Token: nope, X-Tunnel-ID: edge-1 }\n",
    )
    .await;
    eventually("bad token counted", || {
        metric_or_zero(
            &server.registry,
            "tether_auth_failures_total",
            &[("reason", "bad_token")],
        ) >= 1.0
    })
    .await;
    assert!(!wrong.status.borrow().connected);
    wrong.stop().await.unwrap();
    // Right token but a tunnel id that is not the certificate's: 403.
    let liar = TestAgent::start_remotedialer(
        &pki,
        &cert,
        server.tunnel_addr,
        policy,
        "headers: { X-API-Tunnel-Token: s3cret-token, X-Tunnel-ID: edge-2 }\n",
    )
    .await;
    eventually("tunnel id mismatch counted", || {
        metric_or_zero(
            &server.registry,
            "tether_auth_failures_total",
            &[("reason", "tunnel_id_mismatch")],
        ) >= 1.0
    })
    .await;
    liar.stop().await.unwrap();
    assert_eq!(server.agents_connected(), 0.0);
    // Both right: connected.
    let mut good = TestAgent::start_remotedialer(
        &pki,
        &cert,
        server.tunnel_addr,
        policy,
        "headers: { X-API-Tunnel-Token: s3cret-token, X-Tunnel-ID: edge-1 }\n",
    )
    .await;
    good.wait_connected().await;
    server.wait_agents(1).await;
    good.stop().await.unwrap();
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_reconnects_after_the_server_restarts() {
    let pki = TestPki::new();
    let target = responder(Duration::ZERO).await;
    let (server, agent) = rd_pair(&pki, &[target.addr], &allow_only(target.addr)).await;
    let tunnel = server.tunnel_addr;
    assert_eq!(
        exchange(server.forward_addrs[0], b"one".to_vec(), Duration::ZERO).await,
        b"one"
    );
    server.stop().await.unwrap();
    // The same address again (the agent's server_url does not change).
    let listener = tether_common_bind(tunnel).await;
    let server = TestServer::start_on(
        &pki,
        listener,
        &[ForwardSpec::new("edge-1", target.addr)],
        SERVER_YAML,
    )
    .await;
    server.wait_agents(1).await;
    assert_eq!(
        exchange(server.forward_addrs[0], b"two".to_vec(), Duration::ZERO).await,
        b"two"
    );
    streams_settle(&server, &agent).await;
    agent.stop().await.unwrap();
    server.stop().await.unwrap();
}

/// Binds `addr` again, retrying while the old listener's socket is still going away.
async fn tether_common_bind(addr: SocketAddr) -> TcpListener {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tether_common::listen::bind(addr) {
            Ok(listener) => return listener,
            Err(err) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "cannot bind {addr} again: {err}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// A Go-like remotedialer client of `server` with agent `edge-1`'s certificate, speaking raw
/// messages over the real TLS WebSocket.
async fn go_like_client(
    pki: &TestPki,
    server: &TestServer,
) -> tether_agent::remotedialer_ws::RdWsClient<
    tokio_rustls::client::TlsStream<tether_common::read_ahead::ReadAhead<TcpStream>>,
> {
    let tls = pki.client_config(&pki.agent("edge-1"));
    let connection = rd_connect(pki, server, tls, "/connect", "X-Tunnel-ID: edge-1", true)
        .await
        .unwrap();
    tether_agent::remotedialer_ws::RdWsClient::new(connection.transport.into_inner())
}

/// Dials `path` of `server` with the client TLS config `tls` and these request headers (a
/// YAML flow-mapping body), as remotedialer or (`remotedialer: false`) as tether.v1.
async fn rd_connect(
    pki: &TestPki,
    server: &TestServer,
    tls: std::sync::Arc<rustls::ClientConfig>,
    path: &str,
    headers: &str,
    remotedialer: bool,
) -> Result<tether_agent::connector::Connection, tether_agent::ConnectError> {
    // The agent config needs certificate files; `tls` decides what is presented.
    let cert = pki.agent("edge-1");
    let protocol = if remotedialer {
        "remotedialer"
    } else {
        "tether"
    };
    let yaml = format!(
        "version: 1\n\
         server_url: \"wss://{}{path}\"\n\
         tls: {{ cert: \"{}\", key: \"{}\", server_ca: \"{}\" }}\n\
         protocol: {protocol}\n\
         headers: {{ {headers} }}\n",
        server.tunnel_addr,
        cert.cert_path.display(),
        cert.key_path.display(),
        pki.ca_path().display(),
    );
    let config = tether_e2e::agent_config(&yaml, pki).unwrap();
    let connector = tether_agent::Connector::new(&config, tls, "").unwrap();
    connector.connect().await
}

/// A client's SyncConnections closes the server's connections it does not list, once they are
/// older than `remotedialer.sync_grace`; listed ones stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_connections_reaps_unlisted_connections() {
    use futures::{SinkExt, StreamExt};
    use tether_mux::remotedialer::WsMessage;
    use tether_proto::remotedialer::{RdLimits, RdMessage, decode, encode_to_bytes};

    let pki = TestPki::new();
    let target: SocketAddr = "127.0.0.1:7007".parse().unwrap();
    let server = TestServer::start(
        &pki,
        &[ForwardSpec::new("edge-1", target)],
        "remotedialer: { sync_grace: 300ms }\n",
    )
    .await;
    let mut go = go_like_client(&pki, &server).await;
    server.wait_agents(1).await;
    let mut conns = Vec::new();
    let mut consumers = Vec::new();
    for _ in 0..2 {
        let consumer = TcpStream::connect(server.forward_addrs[0]).await.unwrap();
        consumers.push(consumer);
        loop {
            let message = tokio::time::timeout(Duration::from_secs(10), go.next())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            if let WsMessage::Binary(bytes) = message
                && let RdMessage::Connect { conn, .. } =
                    decode(&bytes, &RdLimits::default()).unwrap().message
            {
                conns.push(conn);
                break;
            }
        }
    }
    assert_eq!(conns, vec![2, 3]);
    // A list taken right now would protect nothing young: wait past the grace.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sync = RdMessage::SyncConnections { conns: vec![3] };
    go.send(WsMessage::Binary(encode_to_bytes(1, &sync)))
        .await
        .unwrap();
    let mut reaped = consumers.remove(0);
    assert!(
        tether_e2e::ends_with_error(&mut reaped).await,
        "conn 2 is reaped"
    );
    eventually("one stream left", || {
        metric_or_zero(&server.registry, "tether_streams_active", &[]) == 1.0
    })
    .await;
    // The listed one still carries data.
    go.send(WsMessage::Binary(encode_to_bytes(
        2,
        &RdMessage::Data {
            conn: 3,
            payload: b"alive".to_vec().into(),
        },
    )))
    .await
    .unwrap();
    let mut buf = [0u8; 5];
    consumers[0].read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"alive");
    assert_eq!(server.agents_connected(), 1.0);
    drop(go);
    server.stop().await.unwrap();
}

/// The server against a scripted Go-like client over the real TLS WebSocket: the exact bytes of
/// its Connect, Data both ways, Go's 2-3 Errors per close, a ping answered, and nothing sent
/// back that would end a Go session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_against_a_go_like_client() {
    use futures::{SinkExt, StreamExt};
    use tether_mux::remotedialer::WsMessage;
    use tether_proto::remotedialer::{RdLimits, RdMessage, decode, encode_to_bytes};

    let pki = TestPki::new();
    let target: SocketAddr = "127.0.0.1:7007".parse().unwrap();
    let server = TestServer::start(&pki, &[ForwardSpec::new("edge-1", target)], SERVER_YAML).await;
    let mut go = go_like_client(&pki, &server).await;
    server.wait_agents(1).await;

    // Only binary messages that decode; pongs are skipped.
    async fn next_message(
        go: &mut (impl futures::Stream<Item = Result<WsMessage, tether_mux::TransportError>> + Unpin),
    ) -> (Vec<u8>, RdMessage) {
        loop {
            let message = tokio::time::timeout(Duration::from_secs(10), go.next())
                .await
                .expect("a message in time")
                .expect("session open")
                .expect("no transport error");
            if let WsMessage::Binary(bytes) = message {
                let decoded = decode(&bytes, &RdLimits::default()).expect("decodes");
                return (bytes.to_vec(), decoded.message);
            }
        }
    }

    let mut consumer = TcpStream::connect(server.forward_addrs[0]).await.unwrap();
    consumer.write_all(b"hello").await.unwrap();
    let (raw, connect) = next_message(&mut go).await;
    assert_eq!(
        connect,
        RdMessage::Connect {
            conn: 2,
            proto: "tcp".into(),
            address: "127.0.0.1:7007".into(),
        }
    );
    // Header after the counter: connID 2, type 2, deadline 15000, then the body.
    let mut tail = vec![0x04, 0x04, 0xb0, 0xea, 0x01];
    tail.extend_from_slice(b"tcp/127.0.0.1:7007");
    assert!(raw.ends_with(&tail), "{raw:02x?}");
    assert_eq!(
        next_message(&mut go).await.1,
        RdMessage::Data {
            conn: 2,
            payload: b"hello".to_vec().into(),
        }
    );
    let send = |id: i64, m: RdMessage| WsMessage::Binary(encode_to_bytes(id, &m));
    go.send(send(
        42,
        RdMessage::Data {
            conn: 2,
            payload: b"pong-from-rawcli".to_vec().into(),
        },
    ))
    .await
    .unwrap();
    let mut buf = [0u8; 16];
    consumer.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"pong-from-rawcli");
    // Go's close: EOF, its echo, then the pipe's own socket error.
    for (id, text) in [
        (43, "EOF"),
        (44, "EOF"),
        (
            45,
            "read tcp 127.0.0.1:7007: use of closed network connection",
        ),
    ] {
        go.send(send(
            id,
            RdMessage::Error {
                conn: 2,
                message: text.into(),
            },
        ))
        .await
        .unwrap();
    }
    // The consumer sees a clean EOF; its own close completes the connection with one EOF.
    assert_eq!(consumer.read(&mut buf).await.unwrap(), 0);
    drop(consumer);
    assert_eq!(
        next_message(&mut go).await.1,
        RdMessage::Error {
            conn: 2,
            message: "EOF".into(),
        }
    );
    // A ping is answered.
    go.send(WsMessage::Ping(b"go".to_vec().into()))
        .await
        .unwrap();
    let pong = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match go.next().await {
                Some(Ok(WsMessage::Pong(payload))) => return payload,
                Some(Ok(_)) => {}
                other => panic!("session ended: {other:?}"),
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(&pong[..], b"go");
    eventually("server stream closed", || {
        metric_or_zero(&server.registry, "tether_streams_active", &[]) == 0.0
    })
    .await;
    assert_eq!(server.agents_connected(), 1.0);
    drop(go);
    server.wait_agents(0).await;
    server.stop().await.unwrap();
}

/// A rustls client config that trusts the test CA and presents no certificate.
fn certless_tls(pki: &TestPki) -> std::sync::Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in tether_common::tls::load_certs(pki.ca_path()).unwrap() {
        roots.add(cert).unwrap();
    }
    let mut config =
        rustls::ClientConfig::builder_with_provider(tether_common::tls::crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    config.alpn_protocols = vec![tether_common::tls::ALPN_HTTP11.to_vec()];
    std::sync::Arc::new(config)
}

/// A server with `remotedialer.allow_without_client_cert` (token `s3cret-token`), a forward
/// through `edge-1` to `target`, and `allowed_agents: [edge-1]`.
async fn certless_server(pki: &TestPki, target: SocketAddr) -> TestServer {
    let token_path = pki.dir().join("rd-token");
    std::fs::write(&token_path, "s3cret-token\n").unwrap();
    let yaml = format!(
        "allowed_agents: [edge-1]\n\
         remotedialer: {{ token_file: \"{}\", allow_without_client_cert: true }}\n",
        token_path.display()
    );
    TestServer::start(pki, &[ForwardSpec::new("edge-1", target)], &yaml).await
}

fn auth_failures(server: &TestServer, reason: &str) -> f64 {
    metric_or_zero(
        &server.registry,
        "tether_auth_failures_total",
        &[("reason", reason)],
    )
}

fn http_status(
    result: Result<tether_agent::connector::Connection, tether_agent::ConnectError>,
) -> u16 {
    match result {
        Err(tether_agent::ConnectError::Http {
            status: Some(status),
            ..
        }) => status.as_u16(),
        Err(other) => panic!("expected an HTTP refusal, got {other}"),
        Ok(_) => panic!("expected an HTTP refusal, got a session"),
    }
}

/// With `allow_without_client_cert`, a client without a certificate but with the token and an
/// `X-Tunnel-ID` gets a session under that id, and a forward carries bytes exactly through it
/// (the client echoes every Data message back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certless_client_with_token_and_tunnel_id_carries_a_forward() {
    use futures::{SinkExt, StreamExt};
    use tether_mux::remotedialer::WsMessage;
    use tether_proto::remotedialer::{RdLimits, RdMessage, decode, encode_to_bytes};

    let pki = TestPki::new();
    let target: SocketAddr = "127.0.0.1:7007".parse().unwrap();
    let server = certless_server(&pki, target).await;
    let connection = rd_connect(
        &pki,
        &server,
        certless_tls(&pki),
        "/connect",
        "X-API-Tunnel-Token: s3cret-token, X-Tunnel-ID: edge-1",
        true,
    )
    .await
    .unwrap();
    let mut go = tether_agent::remotedialer_ws::RdWsClient::new(connection.transport.into_inner());
    server.wait_agents(1).await;
    let listing = server.clients().await;
    let client = listing
        .clients
        .iter()
        .find(|c| c.client == "edge-1")
        .unwrap();
    assert_eq!(client.sessions.len(), 1);
    assert_eq!(client.sessions[0].protocol, "remotedialer");

    // The consumer sends 256 KiB and reads them back while the client echoes.
    let sent = payload(256 * 1024, 11);
    let consumer = TcpStream::connect(server.forward_addrs[0]).await.unwrap();
    let (mut read, mut write) = consumer.into_split();
    let to_send = sent.clone();
    let writer = tokio::spawn(async move { write.write_all(&to_send).await.map(|()| write) });
    let echo = async {
        let mut id = 100;
        let mut echoed = 0;
        while echoed < sent.len() {
            let message = tokio::time::timeout(Duration::from_secs(10), go.next())
                .await
                .expect("a message in time")
                .expect("session open")
                .expect("no transport error");
            let WsMessage::Binary(bytes) = message else {
                continue;
            };
            match decode(&bytes, &RdLimits::default()).unwrap().message {
                RdMessage::Connect { conn, address, .. } => {
                    assert_eq!((conn, address.as_str()), (2, "127.0.0.1:7007"));
                }
                RdMessage::Data { conn, payload } => {
                    assert_eq!(conn, 2);
                    echoed += payload.len();
                    id += 1;
                    go.send(WsMessage::Binary(encode_to_bytes(
                        id,
                        &RdMessage::Data { conn, payload },
                    )))
                    .await
                    .unwrap();
                }
                _ => {}
            }
        }
    };
    let mut back = vec![0u8; sent.len()];
    let (_, read_result) = tokio::join!(echo, read.read_exact(&mut back));
    read_result.unwrap();
    assert!(back == sent, "the bytes came back exactly");
    let _write = writer.await.unwrap().unwrap();
    assert_eq!(auth_failures(&server, "no_client_cert"), 0.0);
    drop(go);
    server.wait_agents(0).await;
    server.stop().await.unwrap();
}

/// Certless remotedialer clients need the token and a valid `X-Tunnel-ID`, and the allow-list
/// applies to that id; certless native agents are refused even with the option on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certless_clients_are_refused_without_token_tunnel_id_or_on_tether_v1() {
    let pki = TestPki::new();
    let server = certless_server(&pki, "127.0.0.1:7007".parse().unwrap()).await;
    let certless = certless_tls(&pki);
    let rd = |headers: &'static str| {
        rd_connect(&pki, &server, certless.clone(), "/connect", headers, true)
    };

    assert_eq!(
        http_status(rd("X-Tunnel-ID: edge-1").await),
        401,
        "no token"
    );
    assert_eq!(auth_failures(&server, "bad_token"), 1.0);
    assert_eq!(
        http_status(rd("X-API-Tunnel-Token: wrong, X-Tunnel-ID: edge-1").await),
        401,
        "wrong token"
    );
    assert_eq!(auth_failures(&server, "bad_token"), 2.0);
    assert_eq!(
        http_status(rd("X-API-Tunnel-Token: s3cret-token").await),
        401,
        "no tunnel id"
    );
    assert_eq!(auth_failures(&server, "missing_tunnel_id"), 1.0);
    assert_eq!(
        http_status(rd("X-API-Tunnel-Token: s3cret-token, X-Tunnel-ID: \"edge/1\"").await),
        400,
        "an id that is not an agent id"
    );
    assert_eq!(auth_failures(&server, "invalid_tunnel_id"), 1.0);
    assert_eq!(
        http_status(rd("X-API-Tunnel-Token: s3cret-token, X-Tunnel-ID: edge-2").await),
        403,
        "not in allowed_agents"
    );
    assert_eq!(auth_failures(&server, "not_allowed"), 1.0);

    // tether.v1 without a certificate, even with the token and a tunnel id.
    let native = rd_connect(
        &pki,
        &server,
        certless.clone(),
        "/v1/connect",
        "X-API-Tunnel-Token: s3cret-token, X-Tunnel-ID: edge-1",
        false,
    )
    .await;
    assert_eq!(http_status(native), 401, "certless tether.v1");
    assert_eq!(auth_failures(&server, "no_client_cert"), 1.0);
    assert_eq!(server.agents_connected(), 0.0);

    // With a certificate, the rules are as before: the header must match it.
    let with_cert = rd_connect(
        &pki,
        &server,
        pki.client_config(&pki.agent("edge-1")),
        "/connect",
        "X-API-Tunnel-Token: s3cret-token, X-Tunnel-ID: edge-2",
        true,
    )
    .await;
    assert_eq!(http_status(with_cert), 403, "header differs from the cert");
    assert_eq!(auth_failures(&server, "tunnel_id_mismatch"), 1.0);
    // And a native agent with a certificate still connects.
    let mut agent = TestAgent::start(
        &pki,
        &pki.agent("edge-1"),
        server.tunnel_addr,
        "  allow: []\n",
        "",
    )
    .await;
    agent.wait_connected().await;
    server.wait_agents(1).await;
    agent.stop().await.unwrap();
    server.stop().await.unwrap();
}

/// By default (`allow_without_client_cert: false`, even with a token) a client without a
/// certificate fails the TLS handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certless_client_fails_the_handshake_by_default() {
    let pki = TestPki::new();
    let token_path = pki.dir().join("rd-token");
    std::fs::write(&token_path, "s3cret-token\n").unwrap();
    let yaml = format!(
        "remotedialer: {{ token_file: \"{}\" }}\n",
        token_path.display()
    );
    let server = TestServer::start(&pki, &[], &yaml).await;
    let result = rd_connect(
        &pki,
        &server,
        certless_tls(&pki),
        "/connect",
        "X-API-Tunnel-Token: s3cret-token, X-Tunnel-ID: edge-1",
        true,
    )
    .await;
    // TLS 1.3: the client learns of the refusal after its Finished, when it next reads.
    assert!(
        matches!(
            result,
            Err(tether_agent::ConnectError::Tls { .. }
                | tether_agent::ConnectError::Http { status: None, .. })
        ),
        "{:?}",
        result.map(|c| c.peer)
    );
    eventually("the handshake failure is counted", || {
        metric_or_zero(
            &server.registry,
            "tether_tls_handshake_failures_total",
            &[("reason", "no_certificate")],
        ) >= 1.0
    })
    .await;
    assert_eq!(auth_failures(&server, "bad_token"), 0.0);
    assert_eq!(server.agents_connected(), 0.0);
    server.stop().await.unwrap();
}
