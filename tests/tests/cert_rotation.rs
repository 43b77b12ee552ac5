//! Certificates without outages, with the real binaries and real files: the server's
//! certificate and key are replaced while agents hold sessions (no session drops, a new
//! handshake sees the new certificate), bad replacements are refused and the old material keeps
//! serving, a CA rotation with an overlap admits agents of both CAs and removing the old CA
//! closes exactly its agents' sessions, and a CRL naming one agent closes exactly that agent's
//! session and refuses its reconnect.

#![allow(clippy::unwrap_used)] // test helpers panic on failure by design

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tether_common::pki::{CertifiedKeyPem, IssueOptions};
use tether_e2e::WAIT;
use tether_e2e::process::{ServerProcess, tether_binary};
use tether_e2e::tether_testkit::{AgentCert, TestPki};
use tether_testkit::metrics::scrape;
use tokio::process::{Child, Command};

/// The server's own copies of its TLS files, which the tests replace.
struct ServerFiles {
    cert: PathBuf,
    key: PathBuf,
    ca: PathBuf,
    crl: PathBuf,
}

impl ServerFiles {
    fn new(pki: &TestPki) -> ServerFiles {
        let files = ServerFiles {
            cert: pki.write_file("live-server.pem", pki.server_cert_pem()),
            key: pki.write_file("live-server-key.pem", pki.server_key_pem()),
            ca: pki.write_file("live-ca.pem", pki.ca_pem()),
            crl: pki.write_file("live-crl.pem", &pki.ca().crl_pem(&[]).unwrap()),
        };
        pki.write_file(
            "server.yaml",
            &format!(
                "version: 1\n\
                 listen: \"127.0.0.1:0\"\n\
                 admin_listen: \"127.0.0.1:0\"\n\
                 tls: {{ cert: \"{}\", key: \"{}\", client_ca: \"{}\", crls: [\"{}\"] }}\n",
                files.cert.display(),
                files.key.display(),
                files.ca.display(),
                files.crl.display(),
            ),
        );
        files
    }
}

async fn start_server(pki: &TestPki) -> (ServerProcess, ServerFiles) {
    let files = ServerFiles::new(pki);
    let server = ServerProcess::start(&pki.dir().join("server.yaml"), 0).await;
    (server, files)
}

/// A `tether agent` process for `cert`, trusting the test CA.
fn start_agent(pki: &TestPki, cert: &AgentCert, tunnel: SocketAddr) -> Child {
    let config = pki.write_file(
        &format!("agent-{}.yaml", cert.id),
        &format!(
            "version: 1\n\
             server_url: \"wss://{tunnel}/v1/connect\"\n\
             server_name: \"localhost\"\n\
             tls: {{ cert: \"{}\", key: \"{}\", server_ca: \"{}\" }}\n\
             admin_listen: \"\"\n\
             reconnect: {{ min_delay: 50ms, max_delay: 200ms }}\n",
            cert.cert_path.display(),
            cert.key_path.display(),
            pki.ca_path().display(),
        ),
    );
    Command::new(tether_binary())
        .args(["agent", "--config"])
        .arg(config)
        .env_remove("TETHER_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// Session ids of `client` on the server.
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
    tokio::time::timeout(WAIT, async {
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

async fn wait_metric(admin: SocketAddr, series: &str, at_least: f64) {
    tokio::time::timeout(WAIT, async {
        while scrape(admin, series).await < at_least {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{series} reaches {at_least} in time"));
}

fn sighup(server: &ServerProcess) {
    let pid = server.pid().unwrap();
    let status = std::process::Command::new("sh")
        .args(["-c", &format!("kill -HUP {pid}")])
        .status()
        .unwrap();
    assert!(status.success());
}

/// The certificate the server presents to a new handshake.
async fn presented_cert(pki: &TestPki, agent: &AgentCert, tunnel: SocketAddr) -> Vec<u8> {
    let tcp = tokio::net::TcpStream::connect(tunnel).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(pki.client_config(agent));
    let tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

fn der(pem: &str) -> Vec<u8> {
    tether_common::tls::certs_from_pem(pem).unwrap()[0].to_vec()
}

fn new_server_cert(pki: &TestPki) -> CertifiedKeyPem {
    let ips: [IpAddr; 1] = [[127, 0, 0, 1].into()];
    pki.ca()
        .issue_server(&["localhost".to_owned()], &ips, &IssueOptions::default())
        .unwrap()
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

const APPLIED: &str = "tether_tls_reloads_total{result=\"applied\"}";
const REJECTED: &str = "tether_tls_reloads_total{result=\"rejected\"}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_cert_is_replaced_without_dropping_sessions_and_bad_material_is_refused() {
    let pki = TestPki::new();
    let (server, files) = start_server(&pki).await;
    let (tunnel, admin) = (server.tunnel_addr, server.admin_addr);
    let edge1 = pki.agent("edge-1");
    let _agent = start_agent(&pki, &edge1, tunnel);
    let session = one_session(admin, "edge-1").await;
    assert_eq!(
        presented_cert(&pki, &edge1, tunnel).await,
        der(pki.server_cert_pem())
    );

    // Replace cert and key: the watcher picks the files up (a poll between the two writes may
    // see a key that does not match yet; it is refused and the next poll applies the pair).
    let fresh = new_server_cert(&pki);
    write(&files.key, &fresh.key_pem);
    write(&files.cert, &fresh.cert_pem);
    wait_metric(admin, APPLIED, 1.0).await;
    assert_eq!(
        presented_cert(&pki, &edge1, tunnel).await,
        der(&fresh.cert_pem)
    );
    assert_eq!(
        sessions(admin, "edge-1").await,
        vec![session],
        "no session drop"
    );
    // A new agent connects with the new certificate in place.
    let edge2 = pki.agent("edge-2");
    let _agent2 = start_agent(&pki, &edge2, tunnel);
    one_session(admin, "edge-2").await;

    // Bad replacements, each refused with the old material serving and the session kept.
    let other = new_server_cert(&pki);
    let truncated = &fresh.cert_pem[..fresh.cert_pem.len() / 2];
    let leaf_as_ca = edge1.cert_pem.clone();
    const UNCHANGED: &str = "tether_tls_reloads_total{result=\"unchanged\"}";
    let mut rejected = scrape(admin, REJECTED).await;
    type Breaks<'a> = Vec<(&'a str, Box<dyn Fn() + 'a>, Box<dyn Fn() + 'a>)>;
    let breaks: Breaks<'_> = vec![
        (
            "truncated PEM",
            Box::new(|| write(&files.cert, truncated)),
            Box::new(|| write(&files.cert, &fresh.cert_pem)),
        ),
        (
            "a key for another certificate",
            Box::new(|| write(&files.key, &other.key_pem)),
            Box::new(|| write(&files.key, &fresh.key_pem)),
        ),
        (
            "a CA file holding a leaf",
            Box::new(|| write(&files.ca, &leaf_as_ca)),
            Box::new(|| write(&files.ca, pki.ca_pem())),
        ),
        (
            "an expired certificate",
            Box::new(|| {
                let old = pki
                    .ca()
                    .issue_server(&["localhost".to_owned()], &[], &IssueOptions::expired())
                    .unwrap();
                write(&files.key, &old.key_pem);
                write(&files.cert, &old.cert_pem);
            }),
            Box::new(|| {
                write(&files.key, &fresh.key_pem);
                write(&files.cert, &fresh.cert_pem);
            }),
        ),
        (
            "a directory instead of a file",
            Box::new(|| {
                std::fs::remove_file(&files.cert).unwrap();
                std::fs::create_dir(&files.cert).unwrap();
                sighup(&server);
            }),
            Box::new(|| {
                std::fs::remove_dir(&files.cert).unwrap();
                write(&files.cert, &fresh.cert_pem);
            }),
        ),
        (
            "a file that disappeared",
            Box::new(|| {
                std::fs::remove_file(&files.key).unwrap();
                sighup(&server);
            }),
            Box::new(|| write(&files.key, &fresh.key_pem)),
        ),
    ];
    for (what, break_it, repair) in &breaks {
        break_it();
        wait_metric(admin, REJECTED, rejected + 1.0).await;
        assert_eq!(
            presented_cert(&pki, &edge1, tunnel).await,
            der(&fresh.cert_pem),
            "after {what}, the old certificate keeps serving"
        );
        let unchanged = scrape(admin, UNCHANGED).await;
        repair();
        // Repairing makes the files equal to the material in force again; reloads in between
        // (one file written, not the other) may be refused, so counting starts after.
        sighup(&server);
        wait_metric(admin, UNCHANGED, unchanged + 1.0).await;
        rejected = scrape(admin, REJECTED).await;
    }
    drop(breaks);
    assert_eq!(
        sessions(admin, "edge-1").await,
        vec![session],
        "no session drop"
    );
    let response = tether_e2e::http::get(admin, "/healthz").await.unwrap();
    assert_eq!(response.status, 200, "the server keeps running");
    server.kill().await;
}

const CLOSED_UNKNOWN_ISSUER: &str = "tether_sessions_revoked_total{reason=\"unknown_issuer\"}";
const CLOSED_REVOKED: &str = "tether_sessions_revoked_total{reason=\"revoked\"}";

async fn wait_no_session(admin: SocketAddr, client: &str) {
    tokio::time::timeout(WAIT, async {
        while !sessions(admin, client).await.is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{client}'s session closed in time"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_rotation_with_overlap_then_removing_the_old_ca_closes_exactly_its_agents() {
    let pki = TestPki::new();
    let (server, files) = start_server(&pki).await;
    let (tunnel, admin) = (server.tunnel_addr, server.admin_addr);
    let old_agent = pki.agent("edge-old");
    let _a = start_agent(&pki, &old_agent, tunnel);
    let old_session = one_session(admin, "edge-old").await;

    // Overlap: both CAs in the bundle admit agents of both. The server checks revocation for
    // every agent, so the new CA's CRL goes in first.
    write(
        &files.crl,
        &format!(
            "{}{}",
            pki.ca().crl_pem(&[]).unwrap(),
            pki.other_ca().crl_pem(&[]).unwrap()
        ),
    );
    wait_metric(admin, APPLIED, 1.0).await;
    write(
        &files.ca,
        &format!("{}{}", pki.ca_pem(), pki.other_ca().cert_pem()),
    );
    wait_metric(admin, APPLIED, 2.0).await;
    let new_agent = pki.agent_from_other_ca("edge-new");
    let _b = start_agent(&pki, &new_agent, tunnel);
    let new_session = one_session(admin, "edge-new").await;
    assert_eq!(sessions(admin, "edge-old").await, vec![old_session]);

    // The old CA goes: exactly its agent's session is closed, with its own reason.
    write(&files.ca, pki.other_ca().cert_pem());
    wait_metric(admin, APPLIED, 3.0).await;
    wait_no_session(admin, "edge-old").await;
    assert_eq!(scrape(admin, CLOSED_UNKNOWN_ISSUER).await, 1.0);
    assert_eq!(
        scrape(admin, "tether_session_events_total{event=\"revoked\"}").await,
        1.0
    );
    assert_eq!(sessions(admin, "edge-new").await, vec![new_session]);
    // The old agent keeps trying and is refused at the handshake.
    let failures = "tether_tls_handshake_failures_total{reason=\"bad_certificate\"}";
    wait_metric(admin, failures, scrape(admin, failures).await + 1.0).await;
    assert!(sessions(admin, "edge-old").await.is_empty());
    server.kill().await;
}

/// Runs `tether certs ARGS`; panics with its output unless it succeeds.
fn certs(args: &[&std::ffi::OsStr]) -> String {
    let out = std::process::Command::new(tether_binary())
        .arg("certs")
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "tether certs {args:?}: {text}");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certs_revoke_closes_exactly_the_revoked_agents_session_and_refuses_its_reconnect() {
    let pki = TestPki::new();
    // `tether certs` works on a CA directory: ca.pem and ca-key.pem.
    pki.write_file("ca-key.pem", &pki.ca().key_pem());
    let (server, files) = start_server(&pki).await;
    let (tunnel, admin) = (server.tunnel_addr, server.admin_addr);
    let bad = pki.agent("edge-bad");
    let good = pki.agent("edge-good");
    let _a = start_agent(&pki, &bad, tunnel);
    let _b = start_agent(&pki, &good, tunnel);
    one_session(admin, "edge-bad").await;
    let good_session = one_session(admin, "edge-good").await;

    let out = certs(&[
        "revoke".as_ref(),
        "--dir".as_ref(),
        pki.dir().as_os_str(),
        "--cert".as_ref(),
        bad.cert_path.as_os_str(),
        "--crl".as_ref(),
        files.crl.as_os_str(),
    ]);
    assert!(out.contains("now revokes 1 certificate"), "{out}");
    wait_metric(admin, APPLIED, 1.0).await;
    wait_no_session(admin, "edge-bad").await;
    assert_eq!(scrape(admin, CLOSED_REVOKED).await, 1.0);
    assert_eq!(sessions(admin, "edge-good").await, vec![good_session]);
    // Its reconnects are refused at the handshake.
    let failures = "tether_tls_handshake_failures_total{reason=\"bad_certificate\"}";
    wait_metric(admin, failures, scrape(admin, failures).await + 2.0).await;
    assert!(sessions(admin, "edge-bad").await.is_empty());
    assert_eq!(sessions(admin, "edge-good").await, vec![good_session]);

    // `inspect` against the server's config says why it would be refused.
    let out = std::process::Command::new(tether_binary())
        .args(["certs", "inspect"])
        .arg(&bad.cert_path)
        .arg("--config")
        .arg(pki.dir().join("server.yaml"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(text.contains("agent id:   edge-bad"), "{text}");
    assert!(text.contains("the server refuses it (revoked)"), "{text}");
    server.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_an_agent_from_allowed_agents_closes_its_session() {
    let pki = TestPki::new();
    let (server, _files) = start_server(&pki).await;
    let (tunnel, admin) = (server.tunnel_addr, server.admin_addr);
    let one = pki.agent("edge-1");
    let two = pki.agent("edge-2");
    let _a = start_agent(&pki, &one, tunnel);
    let _b = start_agent(&pki, &two, tunnel);
    one_session(admin, "edge-1").await;
    let kept = one_session(admin, "edge-2").await;
    let config = pki.dir().join("server.yaml");
    let text = std::fs::read_to_string(&config).unwrap();
    write(&config, &format!("{text}allowed_agents: [edge-2]\n"));
    wait_no_session(admin, "edge-1").await;
    assert_eq!(
        scrape(
            admin,
            "tether_sessions_revoked_total{reason=\"not_allowed\"}"
        )
        .await,
        1.0
    );
    assert_eq!(sessions(admin, "edge-2").await, vec![kept]);
    server.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replacing_an_agents_cert_keeps_its_session_and_its_next_handshake_presents_the_new_one() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let pki = TestPki::new();
    let (server, files) = start_server(&pki).await;
    let (tunnel, admin) = (server.tunnel_addr, server.admin_addr);
    let agent_cert = pki.agent("edge-1");
    let mut agent = start_agent_with_log(&pki, &agent_cert, tunnel);
    let mut log = BufReader::new(agent.stderr.take().unwrap()).lines();
    let session = one_session(admin, "edge-1").await;

    // Renew in place with the CLI: same identity, new key, new serial.
    pki.write_file("ca-key.pem", &pki.ca().key_pem());
    let out = certs(&[
        "renew".as_ref(),
        "--dir".as_ref(),
        pki.dir().as_os_str(),
        "--cert".as_ref(),
        agent_cert.cert_path.as_os_str(),
        "--key".as_ref(),
        agent_cert.key_path.as_os_str(),
        "--valid-for".as_ref(),
        "30d".as_ref(),
    ]);
    assert!(out.contains("agent id:   edge-1"), "{out}");
    tokio::time::timeout(WAIT, async {
        while let Some(line) = log.next_line().await.unwrap() {
            if line.contains("TLS material reloaded") {
                return;
            }
        }
        panic!("the agent exited");
    })
    .await
    .expect("the agent reloads its certificate");
    assert_eq!(
        sessions(admin, "edge-1").await,
        vec![session],
        "no session drop"
    );

    // Revoking the OLD certificate closes the session; the agent's next handshake presents the
    // renewed one, which the server admits.
    let old_cert = pki.write_file("edge-1-old.pem", &agent_cert.cert_pem);
    certs(&[
        "revoke".as_ref(),
        "--dir".as_ref(),
        pki.dir().as_os_str(),
        "--cert".as_ref(),
        old_cert.as_os_str(),
        "--crl".as_ref(),
        files.crl.as_os_str(),
    ]);
    wait_metric(admin, CLOSED_REVOKED, 1.0).await;
    let renewed_session = one_session(admin, "edge-1").await;
    assert_ne!(renewed_session, session);
    server.kill().await;
}

/// [`start_agent`] with its log on a pipe.
fn start_agent_with_log(pki: &TestPki, cert: &AgentCert, tunnel: SocketAddr) -> Child {
    let config = pki.write_file(
        &format!("agent-{}.yaml", cert.id),
        &format!(
            "version: 1\n\
             server_url: \"wss://{tunnel}/v1/connect\"\n\
             server_name: \"localhost\"\n\
             tls: {{ cert: \"{}\", key: \"{}\", server_ca: \"{}\" }}\n\
             admin_listen: \"\"\n\
             reconnect: {{ min_delay: 50ms, max_delay: 200ms }}\n",
            cert.cert_path.display(),
            cert.key_path.display(),
            pki.ca_path().display(),
        ),
    );
    Command::new(tether_binary())
        .args(["--log", "info", "agent", "--config"])
        .arg(config)
        .env_remove("TETHER_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}
