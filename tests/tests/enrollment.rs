//! Enrollment with one-time join tokens, with the real binaries and real files: an agent with a
//! token and a pinned CA fingerprint enrolls and connects under the identity the token names;
//! a used token (also after a server restart), an expired token, a wrong CA pin and a CSR asking
//! for another id are refused with clear errors; renewal before expiry keeps the session; a
//! revoked agent's renewal is refused; a client without a certificate reaches only the
//! enrollment routes, and a server-peer certificate is no agent.

#![allow(clippy::unwrap_used)] // test helpers panic on failure by design

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::ServerName;
use tether_e2e::process::{AgentProcess, ServerProcess, tether_binary};
use tether_e2e::tether_testkit::TestPki;
use tether_testkit::metrics::scrape;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

/// Long enough for a renewal at two thirds of a 15 s certificate, twice over.
const RENEW_WAIT: Duration = Duration::from_secs(45);

/// A server with `enrollment:` issuing with the test CA; its CRL starts empty.
struct Setup {
    pki: TestPki,
    server: ServerProcess,
    crl: PathBuf,
    tokens: PathBuf,
}

impl Setup {
    async fn start(cert_valid_for: &str) -> Setup {
        let pki = TestPki::new();
        pki.write_file("ca-key.pem", &pki.ca().key_pem());
        let crl = pki.write_file("crl.pem", &pki.ca().crl_pem(&[]).unwrap());
        pki.write_file(
            "server.yaml",
            &format!(
                "version: 1\n\
                 listen: \"127.0.0.1:0\"\n\
                 admin_listen: \"127.0.0.1:0\"\n\
                 tls: {{ cert: server.pem, key: server-key.pem, client_ca: ca.pem, crls: [crl.pem] }}\n\
                 enrollment:\n  issuer_cert: ca.pem\n  issuer_key: ca-key.pem\n  \
                 tokens_file: tokens\n  cert_valid_for: {cert_valid_for}\n"
            ),
        );
        let server = ServerProcess::start(&pki.dir().join("server.yaml"), 0).await;
        let tokens = pki.dir().join("tokens");
        Setup {
            pki,
            server,
            crl,
            tokens,
        }
    }

    async fn restart(&mut self) {
        // Killed first: the new process binds a new ephemeral port.
        let config = self.pki.dir().join("server.yaml");
        let old = std::mem::replace(&mut self.server, ServerProcess::start(&config, 0).await);
        old.kill().await;
    }

    fn admin(&self) -> SocketAddr {
        self.server.admin_addr
    }

    /// `tether certs token --agent ID --config server.yaml`: the token (stdout) and stderr.
    fn token(&self, agent: &str) -> (String, String) {
        let out = std::process::Command::new(tether_binary())
            .args([
                "certs",
                "token",
                "--agent",
                agent,
                "--valid-for",
                "1h",
                "--config",
            ])
            .arg(self.pki.dir().join("server.yaml"))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "certs token: {stderr}");
        (
            String::from_utf8_lossy(&out.stdout).trim().to_owned(),
            stderr,
        )
    }

    fn pin(&self) -> String {
        tether_common::csr::cert_sha256(&der(self.pki.ca_pem()))
    }

    /// An agent directory `name/` with its token and agent.yaml (no certificate yet).
    fn agent_dir(&self, name: &str, token: &str, pin: &str) -> PathBuf {
        let dir = self.pki.dir().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("token"), format!("{token}\n")).unwrap();
        std::fs::write(
            dir.join("agent.yaml"),
            format!(
                "version: 1\n\
                 server_url: \"wss://{}/v1/connect\"\n\
                 server_name: localhost\n\
                 tls: {{ cert: agent.pem, key: agent-key.pem, server_ca: ca.pem }}\n\
                 enroll: {{ token_file: token, ca_sha256: \"{pin}\" }}\n\
                 admin_listen: \"127.0.0.1:0\"\n\
                 reconnect: {{ min_delay: 50ms, max_delay: 200ms }}\n",
                self.server.tunnel_addr
            ),
        )
        .unwrap();
        dir
    }
}

fn der(pem: &str) -> Vec<u8> {
    tether_common::tls::certs_from_pem(pem).unwrap()[0].to_vec()
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Runs `tether agent` for `dir` expecting it to fail: its stderr.
async fn agent_fails(dir: &Path) -> String {
    let out = tokio::time::timeout(
        tether_e2e::WAIT,
        Command::new(tether_binary())
            .args(["agent", "--config"])
            .arg(dir.join("agent.yaml"))
            .env_remove("TETHER_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the agent gives up in time")
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "the agent should fail: {stderr}");
    assert!(!dir.join("agent.pem").exists(), "no certificate written");
    stderr
}

async fn sessions(admin: SocketAddr, client: &str) -> Vec<u64> {
    let response = tether_e2e::http::get(admin, "/v1/clients").await.unwrap();
    let body: serde_json::Value = serde_json::from_str(&response.body).unwrap();
    body["clients"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["client"] == client)
        .flat_map(|c| c["sessions"].as_array().cloned().unwrap_or_default())
        .filter_map(|s| s["session_id"].as_u64())
        .collect()
}

async fn one_session(admin: SocketAddr, client: &str) -> u64 {
    tokio::time::timeout(tether_e2e::WAIT, async {
        loop {
            if let [one] = sessions(admin, client).await.as_slice() {
                return *one;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("one session of {client} in time"))
}

async fn wait_metric(admin: SocketAddr, series: &str, at_least: f64, limit: Duration) {
    tokio::time::timeout(limit, async {
        while scrape(admin, series).await < at_least {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{series} reaches {at_least} in time"));
}

/// One HTTPS request to the tunnel listener with `tls`: status and body.
async fn https(tunnel: SocketAddr, tls: Arc<rustls::ClientConfig>, request: &str) -> (u16, String) {
    let tcp = tokio::net::TcpStream::connect(tunnel).await.unwrap();
    let mut stream = tokio_rustls::TlsConnector::from(tls)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw).await;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("an HTTP answer: {text:?}"));
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned());
    (status, body.unwrap_or_default())
}

fn post(path: &str, body: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// A TLS client that trusts the test CA and presents `cert`, or no certificate.
fn client(pki: &TestPki, cert: Option<(&str, &str)>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(
            tether_common::tls::certs_from_pem(pki.ca_pem())
                .unwrap()
                .remove(0),
        )
        .unwrap();
    let builder =
        rustls::ClientConfig::builder_with_provider(tether_common::tls::crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots);
    let mut config = match cert {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(
                tether_common::tls::certs_from_pem(cert).unwrap(),
                tether_common::tls::key_from_pem(key).unwrap(),
            )
            .unwrap(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_enrolls_with_a_token_and_connects_as_the_id_the_token_names() {
    let mut setup = Setup::start("7d").await;
    let (token, stderr) = setup.token("edge-7");
    assert!(token.starts_with("tether-join-"), "{token}");
    assert!(
        stderr.contains(&setup.pin()),
        "the pin is printed: {stderr}"
    );
    let store = std::fs::read_to_string(&setup.tokens).unwrap();
    assert!(!store.contains(&token), "the server side keeps only a hash");

    // The agent's config names no id: it gets the token's.
    let dir = setup.agent_dir("a", &token, &setup.pin());
    let agent = AgentProcess::start(&dir.join("agent.yaml")).await;
    let admin = setup.admin();
    one_session(admin, "edge-7").await;
    let mode = std::fs::metadata(dir.join("agent-key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the key file is private");
    assert_eq!(
        std::fs::read_to_string(dir.join("ca.pem")).unwrap(),
        setup.pki.ca_pem(),
        "the pinned CA is written where tls.server_ca points"
    );
    let issued = tether_common::pki_ops::inspect_file(&dir.join("agent.pem")).unwrap();
    assert_eq!(issued[0].agent_id(), Some("edge-7"));
    assert!(issued[0].remaining_secs() <= 7 * 86_400);
    assert_eq!(
        scrape(admin, "tether_enrollments_total{result=\"issued\"}").await,
        1.0
    );

    // The same token again: refused, with the reason.
    let again = setup.agent_dir("b", &token, &setup.pin());
    let stderr = agent_fails(&again).await;
    assert!(stderr.contains("HTTP 403"), "{stderr}");
    assert!(stderr.contains("already used"), "{stderr}");
    assert_eq!(
        scrape(admin, "tether_enrollments_total{result=\"used_token\"}").await,
        1.0
    );

    // Still single-use after a restart of the server (the redemption is on disk).
    agent.kill().await;
    setup.restart().await;
    let after = setup.agent_dir("c", &token, &setup.pin());
    let stderr = agent_fails(&after).await;
    assert!(stderr.contains("already used"), "{stderr}");
    setup.server.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_token_wrong_pin_and_a_csr_for_another_id_are_refused_clearly() {
    let setup = Setup::start("7d").await;
    let admin = setup.admin();

    // An expired token (written in the store's own format, expired ten seconds ago).
    let expired =
        tether_server::enroll_tokens::add_token(&setup.tokens, "edge-old", now() - 10).unwrap();
    let dir = setup.agent_dir("expired", &expired, &setup.pin());
    let stderr = agent_fails(&dir).await;
    assert!(stderr.contains("expired"), "{stderr}");
    assert!(stderr.contains("edge-old"), "{stderr}");

    // A wrong pin: the agent stops before it sends the token.
    let (token, _) = setup.token("edge-9");
    let wrong = tether_common::csr::cert_sha256(&der(setup.pki.other_ca().cert_pem()));
    let dir = setup.agent_dir("wrong-pin", &token, &wrong);
    let stderr = agent_fails(&dir).await;
    assert!(stderr.contains("enroll.ca_sha256"), "{stderr}");
    assert!(stderr.contains(&wrong), "{stderr}");
    assert_eq!(
        scrape(admin, "tether_enrollments_total{result=\"issued\"}").await
            + scrape(admin, "tether_enrollments_total{result=\"used_token\"}").await,
        0.0,
        "the token never reached the server"
    );

    // A CSR asking for another id is refused, and the token is not spent by it.
    let key = tether_common::csr::new_key_and_csr().unwrap();
    let foreign = tether_common::csr::csr_for_key(&key.key_pem, Some("edge-other")).unwrap();
    let body = serde_json::json!({ "token": token, "csr": foreign }).to_string();
    let (status, reason) = https(
        setup.server.tunnel_addr,
        client(&setup.pki, None),
        &post("/v1/enroll", &body),
    )
    .await;
    assert_eq!(status, 403, "{reason}");
    assert!(
        reason.contains("tether://agent/edge-other") && reason.contains("\"edge-9\""),
        "{reason}"
    );
    assert_eq!(
        scrape(admin, "tether_enrollments_total{result=\"wrong_identity\"}").await,
        1.0
    );
    // The token still works with the right pin (nothing consumed it).
    let dir = setup.agent_dir("right-pin", &token, &setup.pin());
    let _agent = AgentProcess::start(&dir.join("agent.yaml")).await;
    one_session(admin, "edge-9").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_a_certificate_reaches_only_the_enrollment_routes() {
    let setup = Setup::start("7d").await;
    let tunnel = setup.server.tunnel_addr;
    let certless = client(&setup.pki, None);
    let upgrade = "GET /v1/connect HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\n\
                   Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
                   Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                   Sec-WebSocket-Protocol: tether.v1\r\n\r\n";
    let (status, body) = https(tunnel, certless.clone(), upgrade).await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("requires a client certificate"), "{body}");
    let rd_upgrade = upgrade.replace("/v1/connect", "/connect").replace(
        "Sec-WebSocket-Protocol: tether.v1\r\n",
        "X-Tunnel-ID: edge-1\r\n",
    );
    let (status, body) = https(tunnel, certless.clone(), &rd_upgrade).await;
    assert_eq!(status, 401, "remotedialer route: {body}");
    let (status, body) = https(tunnel, certless.clone(), &post("/v1/renew", "{}")).await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("current agent certificate"), "{body}");
    let (status, body) = https(
        tunnel,
        certless.clone(),
        "GET /v1/enroll/ca HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("BEGIN CERTIFICATE"), "{body}");
    let clients = tether_e2e::http::get(setup.admin(), "/v1/clients")
        .await
        .unwrap();
    assert!(!clients.body.contains("session_id"), "{}", clients.body);

    // A server-peer certificate (tether://server/<id>) is not an agent.
    let out = std::process::Command::new(tether_binary())
        .args(["certs", "issue", "--server-peer", "replica-1", "--dir"])
        .arg(setup.pki.dir())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let read = |name: &str| std::fs::read_to_string(setup.pki.dir().join(name)).unwrap();
    let (cert, key) = (
        read("server-peer-replica-1.pem"),
        read("server-peer-replica-1-key.pem"),
    );
    let peer = client(&setup.pki, Some((&cert, &key)));
    let (status, body) = https(tunnel, peer.clone(), upgrade).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("tether://server/replica-1"), "{body}");
    let (status, _) = https(tunnel, peer, &post("/v1/renew", "{}")).await;
    assert_eq!(
        status, 403,
        "a server-peer certificate cannot renew as an agent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_before_expiry_keeps_the_session_and_a_revoked_agent_is_refused() {
    let setup = Setup::start("15s").await;
    let admin = setup.admin();
    let (token, _) = setup.token("edge-r");
    let dir = setup.agent_dir("r", &token, &setup.pin());
    let agent = AgentProcess::start(&dir.join("agent.yaml")).await;
    let session = one_session(admin, "edge-r").await;
    let first = std::fs::read_to_string(dir.join("agent.pem")).unwrap();
    let first_key = std::fs::read_to_string(dir.join("agent-key.pem")).unwrap();
    let first_not_after =
        tether_common::pki_ops::inspect_file(&dir.join("agent.pem")).unwrap()[0].not_after;

    // Two thirds into the 15 s lifetime the agent renews, over the same session.
    let renewed = "tether_agent_cert_renewals_total{result=\"renewed\"}";
    wait_metric(agent.admin_addr, renewed, 1.0, RENEW_WAIT).await;
    assert!(now() < first_not_after, "renewed before expiry");
    let second = std::fs::read_to_string(dir.join("agent.pem")).unwrap();
    assert_ne!(second, first, "a new certificate");
    assert_ne!(
        std::fs::read_to_string(dir.join("agent-key.pem")).unwrap(),
        first_key,
        "a new key"
    );
    let info = tether_common::pki_ops::inspect_file(&dir.join("agent.pem")).unwrap();
    assert_eq!(info[0].agent_id(), Some("edge-r"));
    assert!(info[0].not_after > first_not_after);
    assert_eq!(
        sessions(admin, "edge-r").await,
        vec![session],
        "no session drop"
    );
    assert!(scrape(admin, "tether_renewals_total{result=\"issued\"}").await >= 1.0);
    let next = scrape(
        agent.admin_addr,
        "tether_agent_cert_next_renewal_timestamp_seconds",
    )
    .await;
    assert!(
        next > now() as f64 - 1.0 && next < info[0].not_after as f64,
        "{next}"
    );

    // Revoke the agent (every certificate enrollment issued to it, from the server's log):
    // the session closes, and the renewal is refused (the handshake says why).
    let out = std::process::Command::new(tether_binary())
        .args(["certs", "revoke", "--agent", "edge-r", "--config"])
        .arg(setup.pki.dir().join("server.yaml"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("revoked 2 certificate(s)"), "{text}");
    assert_eq!(tether_common::tls::load_crls(&setup.crl).unwrap().len(), 1);
    let revoked_pem = std::fs::read_to_string(dir.join("agent.pem")).unwrap();
    let refused = "tether_agent_cert_renewals_total{result=\"refused\"}";
    wait_metric(agent.admin_addr, refused, 1.0, RENEW_WAIT).await;
    assert!(sessions(admin, "edge-r").await.is_empty());
    assert_eq!(
        std::fs::read_to_string(dir.join("agent.pem")).unwrap(),
        revoked_pem,
        "the revoked certificate was not renewed"
    );
    assert_eq!(scrape(agent.admin_addr, renewed).await, 1.0);
}

#[test]
fn check_config_names_bad_enrollment_keys() {
    let pki = TestPki::new();
    let check = |name: &str, text: &str| {
        let path = pki.write_file(name, text);
        let out = std::process::Command::new(tether_binary())
            .arg("check-config")
            .arg(&path)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    let agent = check(
        "bad-agent.yaml",
        "version: 1\n\
         server_url: \"wss://localhost:8443/v1/connect\"\n\
         tls: { cert: missing.pem, key: missing-key.pem, server_ca: ca.pem }\n\
         enroll:\n  token_file: no-such-token\n  ca_sha256: \"12:34\"\n  renwe: true\n",
    );
    // Every problem at once, each with its line and key path.
    for expected in [
        ":5:3: `enroll.token_file`: cannot read",
        ":6:3: `enroll.ca_sha256`: `12:34` is not a SHA-256 fingerprint",
        ":7:3: `enroll.renwe`: unknown key `renwe`",
    ] {
        assert!(agent.contains(expected), "{expected} in {agent}");
    }
    let server = check(
        "bad-server.yaml",
        "version: 1\n\
         listen: \"127.0.0.1:0\"\n\
         tls: { cert: server.pem, key: server-key.pem, client_ca: ca.pem }\n\
         enrollment:\n  issuer_cert: server.pem\n  issuer_key: server-key.pem\n  \
         tokens_file: tokens\n  cert_valid_for: 2y\n",
    );
    assert!(server.contains("`enrollment.issuer_cert`"), "{server}");
    assert!(server.contains("not a CA"), "{server}");
    assert!(
        server.contains(":8:3: `enrollment.cert_valid_for`"),
        "{server}"
    );
}
