//! `tether doctor` against real files and a real server (in this process, on ephemeral
//! ports): one test per diagnosis (wrong CA, name mismatch, expired certificate, server down,
//! gate closed, identity not allowed, target denied, a listener held by another process), each
//! asserting the step that fails and its reason; the server's record of TLS refusals per
//! client id; and a forward's last error in `tether status`.

// Test helpers panic on failure by design.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use tether_common::pki::{Ca, IssueOptions};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const BIN: &str = env!("CARGO_BIN_EXE_tether");
const WAIT: Duration = Duration::from_secs(30);

async fn tether(args: &[&str]) -> Output {
    let run = tokio::process::Command::new(BIN)
        .args(args)
        .env_remove("TETHER_ADMIN")
        .env_remove("TETHER_CONFIG")
        .env("TETHER_LOG", "warn")
        .output();
    tokio::time::timeout(WAIT, run).await.unwrap().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `tether certs init` + `certs issue --agent ID` for each id, in `dir`.
async fn pki(dir: &Path, agents: &[&str]) {
    let d = dir.to_str().unwrap();
    let init = tether(&["certs", "init", "--dir", d]).await;
    assert!(init.status.success(), "{}", text(&init.stderr));
    for id in agents {
        let issued = tether(&["certs", "issue", "--dir", d, "--agent", id]).await;
        assert!(issued.status.success(), "{}", text(&issued.stderr));
    }
}

/// The CA of `dir`, to issue certificates no CLI flag makes (expired ones).
fn ca(dir: &Path) -> Ca {
    Ca::from_pem(
        &std::fs::read_to_string(dir.join("ca.pem")).unwrap(),
        &std::fs::read_to_string(dir.join("ca-key.pem")).unwrap(),
    )
    .unwrap()
}

struct Server {
    port: u16,
    admin: String,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(WAIT, self.task)
            .await
            .unwrap()
            .unwrap();
    }
}

/// A server with the certificates of `dir` and the extra YAML `extra` (keys at top level).
async fn server(dir: &Path, extra: &str, forwards: usize) -> Server {
    let tls = "tls: { cert: server.pem, key: server-key.pem, client_ca: ca.pem }\n";
    server_with_tls(dir, tls, extra, forwards).await
}

/// [`server`] with its own `tls:` line.
async fn server_with_tls(dir: &Path, tls: &str, extra: &str, forwards: usize) -> Server {
    let tunnel = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = tunnel.local_addr().unwrap().port();
    let admin_addr = admin.local_addr().unwrap();
    let yaml =
        format!("listen: \"127.0.0.1:{port}\"\nadmin_listen: \"{admin_addr}\"\n{tls}{extra}");
    // The same file for `tether doctor --config server.yaml`.
    std::fs::write(dir.join("server.yaml"), &yaml).unwrap();
    let config = tether_server::ServerConfig::parse(&yaml, "server.yaml", dir).unwrap();
    let mut listeners = Vec::new();
    for _ in 0..forwards {
        listeners.push(TcpListener::bind("127.0.0.1:0").await.unwrap());
    }
    let frontends = tether_server::FrontendListeners::bind(&config)
        .await
        .unwrap();
    let server = tether_server::Server::new(config, &prometheus::Registry::new()).unwrap();
    let stop = CancellationToken::new();
    let listeners = tether_server::Listeners {
        tunnel,
        admin,
        forwards: listeners,
        frontends,
    };
    let server_stop = stop.clone();
    let task = tokio::spawn(async move { server.run(listeners, server_stop).await.unwrap() });
    Server {
        port,
        admin: format!("http://{admin_addr}"),
        stop,
        task,
    }
}

/// Writes `agent.yaml` in `dir` with agent `edge-1`'s files and `dir`'s CA.
fn agent_yaml(dir: &Path, url: &str, extra: &str) -> String {
    agent_yaml_pinning(dir, url, "ca.pem", extra)
}

/// [`agent_yaml`] pinning `server_ca` instead.
fn agent_yaml_pinning(dir: &Path, url: &str, server_ca: &str, extra: &str) -> String {
    let yaml = format!(
        "server_url: \"{url}\"\n\
         tls: {{ cert: agent-edge-1.pem, key: agent-edge-1-key.pem, server_ca: \"{server_ca}\" }}\n\
         admin_listen: \"\"\nconnect_timeout: 5s\n{extra}"
    );
    let path = dir.join("agent.yaml");
    std::fs::write(&path, yaml).unwrap();
    path.to_str().unwrap().to_owned()
}

/// `tether doctor` with `args`: (exit success, stdout).
async fn doctor(args: &[&str]) -> (bool, String) {
    let mut all = vec!["doctor"];
    all.extend_from_slice(args);
    let out = tether(&all).await;
    (out.status.success(), text(&out.stdout))
}

/// The first line of `step` with `verdict` (`ok`, `FAIL`, ...), without the two columns.
fn line<'a>(stdout: &'a str, verdict: &str, step: &str) -> Option<&'a str> {
    stdout.lines().find_map(|l| {
        let rest = l.strip_prefix(verdict)?.strip_prefix(' ')?.trim_start();
        let rest = rest.strip_prefix(step)?;
        rest.starts_with(' ').then(|| rest.trim())
    })
}

/// Every FAIL line's step, in order.
fn failed_steps(stdout: &str) -> Vec<&str> {
    stdout
        .lines()
        .filter(|l| l.starts_with("FAIL"))
        .filter_map(|l| l.split_whitespace().nth(1))
        .collect()
}

/// `tether status --json [CLIENT]`.
async fn get(admin: &str, client: &str) -> String {
    let mut args = vec!["status", "--admin", admin, "--json"];
    if !client.is_empty() {
        args.push(client);
    }
    text(&tether(&args).await.stdout)
}

/// [`get`] until the answer holds `needle` (the server records asynchronously).
async fn get_until(admin: &str, client: &str, needle: &str) -> String {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let answer = get(admin, client).await;
        if answer.contains(needle) || tokio::time::Instant::now() > deadline {
            return answer;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_healthy_setup_passes_every_step() {
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path(), &["edge-1"]).await;
    let server = server(dir.path(), "allowed_agents: [edge-1]\n", 0).await;
    let config = agent_yaml(
        dir.path(),
        &format!("wss://localhost:{}/v1/connect", server.port),
        "",
    );
    let (ok, out) = doctor(&["--config", &config]).await;
    assert!(ok, "{out}");
    assert!(failed_steps(&out).is_empty(), "{out}");
    for step in [
        "config", "cert", "key", "ca", "gate", "dns", "tcp", "tls", "upgrade",
    ] {
        assert!(line(&out, "ok", step).is_some(), "no ok {step}: {out}");
    }
    let verdict = line(&out, "ok", "verdict").unwrap();
    assert!(
        verdict.starts_with("agent \"edge-1\" is accepted"),
        "{verdict}"
    );
    // A dry run: no session was registered.
    let listing = get(&server.admin, "").await;
    let listing: tether_server::ClientsResponse = serde_json::from_str(&listing).unwrap();
    assert!(
        listing.clients.iter().all(|c| c.sessions.is_empty()),
        "{listing:?}"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_running_agent_is_reported_with_its_connection() {
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path(), &["edge-1"]).await;
    let server = server(dir.path(), "", 0).await;
    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin_addr = admin.local_addr().unwrap();
    let config_path = agent_yaml(
        dir.path(),
        &format!("wss://localhost:{}/v1/connect", server.port),
        "reconnect: { min_delay: 50ms, max_delay: 200ms }\n",
    );
    // The file's admin_listen is the address the running agent holds.
    let yaml = std::fs::read_to_string(&config_path).unwrap().replace(
        "admin_listen: \"\"",
        &format!("admin_listen: \"{admin_addr}\""),
    );
    std::fs::write(&config_path, &yaml).unwrap();
    let mut config: tether_agent::AgentConfig =
        tether_common::config_error::parse_yaml(&yaml, "agent.yaml").unwrap();
    config.resolve_paths(dir.path());
    let agent = tether_agent::Agent::new(config, &prometheus::Registry::new()).unwrap();
    let agent_stop = CancellationToken::new();
    let stop = agent_stop.clone();
    let agent_task = tokio::spawn(async move {
        let listeners = tether_agent::AgentListeners { admin: Some(admin) };
        agent.run(listeners, stop).await.unwrap();
    });
    let deadline = tokio::time::Instant::now() + WAIT;
    let out = loop {
        let (_, out) = doctor(&["--config", &config_path]).await;
        if line(&out, "ok", "agent").is_some() || tokio::time::Instant::now() > deadline {
            break out;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        line(&out, "ok", "agent")
            .unwrap()
            .starts_with("an agent runs and is connected (server "),
        "{out}"
    );
    agent_stop.cancel();
    tokio::time::timeout(WAIT, agent_task)
        .await
        .unwrap()
        .unwrap();
    server.stop().await;
}

#[tokio::test]
async fn a_wrong_pinned_ca_fails_tls_and_the_server_records_the_refusal() {
    let dir = tempfile::tempdir().unwrap();
    let other = tempfile::tempdir().unwrap();
    pki(dir.path(), &["edge-1"]).await;
    pki(other.path(), &[]).await;
    let server = server(dir.path(), "", 0).await;
    let ca = other.path().join("ca.pem");
    let config = agent_yaml_pinning(
        dir.path(),
        &format!("wss://localhost:{}/v1/connect", server.port),
        ca.to_str().unwrap(),
        "",
    );
    let (ok, out) = doctor(&["--config", &config]).await;
    assert!(!ok, "{out}");
    assert_eq!(failed_steps(&out), ["tls"], "{out}");
    let reason = line(&out, "FAIL", "tls").unwrap();
    assert!(
        reason.contains("is not signed by the pinned CA")
            && reason.contains("another CA of the same name")
            && reason.ends_with("(bad signature)"),
        "{reason}"
    );
    assert!(
        out.contains("fix: tls.server_ca must be the ca.pem"),
        "{out}"
    );
    // The agent gave up before sending its certificate: the server knows only the address.
    let record = get_until(&server.admin, "127.0.0.1", "client_refused_server").await;
    assert!(
        record.contains("\"reason\":\"client_refused_server\""),
        "{record}"
    );
    server.stop().await;
}

#[tokio::test]
async fn an_agent_certificate_of_another_ca_is_refused_and_recorded_by_id() {
    let dir = tempfile::tempdir().unwrap();
    let other = tempfile::tempdir().unwrap();
    pki(dir.path(), &[]).await;
    pki(other.path(), &["edge-1"]).await;
    for file in ["agent-edge-1.pem", "agent-edge-1-key.pem"] {
        std::fs::copy(other.path().join(file), dir.path().join(file)).unwrap();
    }
    let server = server(dir.path(), "", 0).await;
    let config = agent_yaml(
        dir.path(),
        &format!("wss://localhost:{}/v1/connect", server.port),
        "",
    );
    let (ok, out) = doctor(&["--config", &config]).await;
    assert!(!ok, "{out}");
    assert_eq!(failed_steps(&out), ["verdict"], "{out}");
    let verdict = line(&out, "FAIL", "verdict").unwrap();
    assert!(
        verdict.contains("this agent's certificate is not signed by the CA the server trusts"),
        "{verdict}"
    );
    let record = get_until(&server.admin, "edge-1", "unknown_issuer").await;
    assert!(record.contains("\"reason\":\"unknown_issuer\""), "{record}");
    assert!(
        record.contains("not issued by a CA in tls.client_ca"),
        "{record}"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_name_the_server_certificate_lacks_fails_tls() {
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path(), &["edge-1"]).await;
    let server = server(dir.path(), "", 0).await;
    let config = agent_yaml(
        dir.path(),
        &format!("wss://127.0.0.1:{}/v1/connect", server.port),
        "server_name: tether.example.com\n",
    );
    let (ok, out) = doctor(&["--config", &config]).await;
    assert!(!ok, "{out}");
    assert_eq!(failed_steps(&out), ["tls"], "{out}");
    let reason = line(&out, "FAIL", "tls").unwrap();
    assert!(
        reason.contains("is not valid for the name \"tether.example.com\" (name mismatch)")
            && reason.contains("it holds [localhost, 127.0.0.1]"),
        "{reason}"
    );
    server.stop().await;
}

#[tokio::test]
async fn an_expired_agent_certificate_fails_and_the_server_records_it_by_id() {
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path(), &[]).await;
    let expired = ca(dir.path())
        .issue_agent("edge-1", &IssueOptions::expired())
        .unwrap();
    std::fs::write(dir.path().join("agent-edge-1.pem"), &expired.cert_pem).unwrap();
    std::fs::write(dir.path().join("agent-edge-1-key.pem"), &expired.key_pem).unwrap();
    let server = server(dir.path(), "", 0).await;
    let config = agent_yaml(
        dir.path(),
        &format!("wss://localhost:{}/v1/connect", server.port),
        "",
    );
    let (ok, out) = doctor(&["--config", &config]).await;
    assert!(!ok, "{out}");
    assert_eq!(failed_steps(&out), ["cert", "verdict"], "{out}");
    let own = line(&out, "FAIL", "cert").unwrap();
    assert!(own.starts_with("the agent certificate expired at"), "{own}");
    let verdict = line(&out, "FAIL", "verdict").unwrap();
    assert!(
        verdict.contains(
            "this agent's certificate has expired (TLS alert certificate_expired from the server)"
        ),
        "{verdict}"
    );
    // The server read the id from the refused certificate.
    let record = get_until(&server.admin, "edge-1", "\"expired\"").await;
    assert!(record.contains("\"reason\":\"expired\""), "{record}");
    let status = tether(&["status", "--admin", &server.admin, "edge-1"]).await;
    let status = text(&status.stdout);
    assert!(
        status.contains("last refused:") && status.contains("client certificate expired"),
        "{status}"
    );
    let metrics = admin_get(&server.admin, "/metrics").await;
    assert!(
        metrics.contains("tether_tls_refusals_total{reason=\"expired\"} 1"),
        "{metrics}"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_revoked_agent_certificate_gets_the_servers_verdict() {
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path(), &["edge-1"]).await;
    let d = dir.path().to_str().unwrap();
    let cert = dir.path().join("agent-edge-1.pem");
    let revoked = tether(&[
        "certs",
        "revoke",
        "--dir",
        d,
        "--cert",
        cert.to_str().unwrap(),
    ])
    .await;
    assert!(revoked.status.success(), "{}", text(&revoked.stderr));
    let tls =
        "tls: { cert: server.pem, key: server-key.pem, client_ca: ca.pem, crls: [crl.pem] }\n";
    let server = server_with_tls(dir.path(), tls, "", 0).await;
    let config = agent_yaml(
        dir.path(),
        &format!("wss://localhost:{}/v1/connect", server.port),
        "",
    );
    let (ok, out) = doctor(&["--config", &config]).await;
    assert!(!ok, "{out}");
    assert_eq!(failed_steps(&out), ["verdict"], "{out}");
    assert!(
        line(&out, "FAIL", "verdict").unwrap().ends_with(
            "this agent's certificate is revoked (in the server's CRL) (TLS alert \
             certificate_revoked from the server)"
        ),
        "{out}"
    );
    let record = get_until(&server.admin, "edge-1", "\"revoked\"").await;
    assert!(record.contains("\"reason\":\"revoked\""), "{record}");
    server.stop().await;
}

#[tokio::test]
async fn an_expired_server_certificate_fails_tls_on_both_sides() {
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path(), &["edge-1"]).await;
    let expired = ca(dir.path())
        .issue_server(
            &["localhost".to_owned()],
            &["127.0.0.1".parse().unwrap()],
            &IssueOptions::expired(),
        )
        .unwrap();
    std::fs::write(dir.path().join("server.pem"), &expired.cert_pem).unwrap();
    std::fs::write(dir.path().join("server-key.pem"), &expired.key_pem).unwrap();
    let server = server(dir.path(), "", 0).await;
    let config = agent_yaml(
        dir.path(),
        &format!("wss://localhost:{}/v1/connect", server.port),
        "",
    );
    let (ok, out) = doctor(&["--config", &config]).await;
    assert!(!ok, "{out}");
    assert_eq!(failed_steps(&out), ["tls"], "{out}");
    let reason = line(&out, "FAIL", "tls").unwrap();
    assert!(
        reason.contains("the server certificate \"CN=localhost\" expired at")
            && reason.ends_with("(certificate expired)"),
        "{reason}"
    );
    assert!(
        out.contains("fix: renew the server certificate on the server"),
        "{out}"
    );

    // The server's own doctor says the same (ephemeral listener addresses: nothing else fails).
    let yaml = "listen: \"127.0.0.1:0\"\nadmin_listen: \"127.0.0.1:0\"\n\
                tls: { cert: server.pem, key: server-key.pem, client_ca: ca.pem }\n";
    let path = dir.path().join("server.yaml");
    std::fs::write(&path, yaml).unwrap();
    let (ok, out) = doctor(&["--config", path.to_str().unwrap()]).await;
    assert!(!ok, "{out}");
    assert_eq!(failed_steps(&out), ["cert"], "{out}");
    assert!(
        line(&out, "FAIL", "cert")
            .unwrap()
            .starts_with("the server certificate expired at"),
        "{out}"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_server_that_is_down_fails_tcp() {
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path(), &["edge-1"]).await;
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let config = agent_yaml(
        dir.path(),
        &format!("wss://localhost:{port}/v1/connect"),
        "",
    );
    let (ok, out) = doctor(&["--config", &config]).await;
    assert!(!ok, "{out}");
    assert_eq!(failed_steps(&out), ["tcp"], "{out}");
    assert_eq!(
        line(&out, "FAIL", "tcp").unwrap(),
        format!("127.0.0.1:{port}: connection refused: nothing listens there")
    );
    assert!(line(&out, "ok", "dns").is_some(), "{out}");
}

#[tokio::test]
async fn a_closed_gate_says_why() {
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path(), &["edge-1"]).await;
    let server = server(dir.path(), "", 0).await;
    let config = agent_yaml(
        dir.path(),
        &format!("wss://localhost:{}/v1/connect", server.port),
        "activation: { require_role: [upstream], source: { from: static, role: downstream } }\n",
    );
    let (ok, out) = doctor(&["--config", &config]).await;
    assert!(!ok, "{out}");
    assert_eq!(failed_steps(&out), ["gate"], "{out}");
    assert_eq!(
        line(&out, "FAIL", "gate").unwrap(),
        "closed: cluster role `downstream` is not one of [upstream]; the agent stays idle and \
         never dials"
    );
    server.stop().await;
}

#[tokio::test]
async fn an_identity_outside_allowed_agents_gets_the_servers_reason() {
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path(), &["edge-1"]).await;
    let server = server(dir.path(), "allowed_agents: [edge-2]\n", 0).await;
    let config = agent_yaml(
        dir.path(),
        &format!("wss://localhost:{}/v1/connect", server.port),
        "",
    );
    let (ok, out) = doctor(&["--config", &config]).await;
    assert!(!ok, "{out}");
    assert_eq!(failed_steps(&out), ["verdict"], "{out}");
    assert_eq!(
        line(&out, "FAIL", "verdict").unwrap(),
        "refused: HTTP 403 Forbidden: agent \"edge-1\" is not allowed to connect"
    );
    assert!(
        out.contains("fix: add this agent's id to the server's allowed_agents"),
        "{out}"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_target_outside_the_policy_is_denied_and_an_allowed_one_names_its_rule() {
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path(), &["edge-1"]).await;
    let server = server(dir.path(), "", 0).await;
    let target = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target_port = target.local_addr().unwrap().port();
    let config = agent_yaml(
        dir.path(),
        &format!("wss://localhost:{}/v1/connect", server.port),
        &format!(
            "policy: {{ allow: [ {{ cidrs: [\"10.0.0.0/8\"], ports: [22] }}, \
             {{ cidrs: [\"127.0.0.1/32\"], ports: [{target_port}] }} ] }}\n"
        ),
    );
    let (ok, out) = doctor(&["--config", &config, "--target", "127.0.0.1:5432"]).await;
    assert!(!ok, "{out}");
    assert_eq!(failed_steps(&out), ["policy"], "{out}");
    assert_eq!(
        line(&out, "FAIL", "policy").unwrap(),
        "127.0.0.1:5432 -> 127.0.0.1: dial to 127.0.0.1:5432 denied by policy: port not \
         allowed for this address (port)"
    );
    let (ok, out) = doctor(&["--config", &config, "--target", "192.0.2.7:5432"]).await;
    assert!(!ok, "{out}");
    assert!(
        line(&out, "FAIL", "policy")
            .unwrap()
            .ends_with("denied by policy: no allow rule matches (no_rule)"),
        "{out}"
    );
    let allowed = format!("127.0.0.1:{target_port}");
    let (ok, out) = doctor(&["--config", &config, "--target", &allowed]).await;
    assert!(ok, "{out}");
    assert_eq!(
        line(&out, "ok", "policy").unwrap(),
        format!("{allowed} -> 127.0.0.1: allowed by policy.allow[1]")
    );
    assert!(line(&out, "ok", "target").is_some(), "{out}");
    server.stop().await;
}

#[tokio::test]
async fn a_server_listener_held_by_another_process_fails() {
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path(), &[]).await;
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let held_addr = held.local_addr().unwrap();
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let admin_addr = free.local_addr().unwrap();
    drop(free);
    let path = dir.path().join("server.yaml");
    std::fs::write(
        &path,
        format!(
            "listen: \"{held_addr}\"\nadmin_listen: \"{admin_addr}\"\n\
             tls: {{ cert: server.pem, key: server-key.pem, client_ca: ca.pem }}\n"
        ),
    )
    .unwrap();
    let (ok, out) = doctor(&["--config", path.to_str().unwrap()]).await;
    assert!(!ok, "{out}");
    assert_eq!(failed_steps(&out), ["listen"], "{out}");
    assert_eq!(
        line(&out, "FAIL", "listen").unwrap(),
        format!("listen {held_addr} is in use by another process")
    );
    assert!(
        line(&out, "ok", "admin")
            .unwrap()
            .starts_with("no server running"),
        "{out}"
    );
    drop(held);
}

#[tokio::test]
async fn a_running_servers_doctor_finds_it_and_its_unconnected_forward() {
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path(), &[]).await;
    let server = server(
        dir.path(),
        "allowed_agents: [edge-1]\n\
         forwards: [{ name: db, listen: \"127.0.0.1:0\", client: edge-1, target: \"db.internal:5432\" }]\n",
        1,
    )
    .await;
    let path = dir.path().join("server.yaml");
    let (ok, out) = doctor(&["--config", path.to_str().unwrap()]).await;
    assert!(ok, "{out}");
    assert!(
        line(&out, "ok", "admin")
            .unwrap()
            .starts_with("a tether server runs: server id"),
        "{out}"
    );
    assert!(
        line(&out, "ok", "listen").unwrap().ends_with(&format!(
            "listen 127.0.0.1:{} is in use, by the running server (server id {}, which answers \
             on admin_listen)",
            server.port,
            // The id is the host name unless configured: read it from the admin line.
            line(&out, "ok", "admin")
                .unwrap()
                .split_whitespace()
                .nth(6)
                .unwrap()
        )),
        "{out}"
    );
    assert_eq!(
        line(&out, "warn", "forward").unwrap(),
        "db: agent \"edge-1\" is not connected now; its consumers are reset"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_forwards_last_error_shows_in_status() {
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path(), &["edge-1"]).await;
    let server = server(
        dir.path(),
        "forwards: [{ name: db, listen: \"127.0.0.1:0\", client: edge-1, target: \"db.internal:5432\" }]\n",
        1,
    )
    .await;
    let listing = get(&server.admin, "").await;
    let listing: tether_server::ClientsResponse = serde_json::from_str(&listing).unwrap();
    assert_eq!(listing.forwards[0].last_error, None);
    // No agent is connected: the consumer is reset, and the forward remembers why.
    let mut consumer = tokio::net::TcpStream::connect(&listing.forwards[0].listen)
        .await
        .unwrap();
    let mut buf = [0u8; 1];
    let _ = tokio::io::AsyncReadExt::read(&mut consumer, &mut buf).await;
    let status = tether(&["status", "--admin", &server.admin]).await;
    let status = text(&status.stdout);
    let row = status.lines().find(|l| l.starts_with("db ")).unwrap();
    assert!(
        row.contains("LAST ERROR") || status.contains("LAST ERROR"),
        "{status}"
    );
    assert!(
        row.contains("no agent connected for client \"edge-1\""),
        "{status}"
    );
    server.stop().await;
}

/// A plain GET on the admin listener (for /metrics).
async fn admin_get(admin: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = admin.trim_start_matches("http://");
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut body = String::new();
    tcp.read_to_string(&mut body).await.unwrap();
    body
}
