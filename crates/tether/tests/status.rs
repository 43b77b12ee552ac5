//! `tether status` against a server and an agent running in this process: the table, `--json`,
//! a client without sessions, and clear failures for an unreachable or non-200 admin address.

// Test helpers panic on failure by design.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use tether_server::ClientsResponse;
use tether_testkit::eventually;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const BIN: &str = env!("CARGO_BIN_EXE_tether");
const WAIT: Duration = Duration::from_secs(15);

async fn tether(args: &[&str]) -> Output {
    let run = tokio::process::Command::new(BIN)
        .args(args)
        .env_remove("TETHER_ADMIN")
        .env("TETHER_LOG", "warn")
        .output();
    tokio::time::timeout(WAIT, run).await.unwrap().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `tether certs init` + `certs issue --agent edge-1` in `dir`.
async fn pki(dir: &Path) {
    let d = dir.to_str().unwrap();
    assert!(
        tether(&["certs", "init", "--dir", d])
            .await
            .status
            .success()
    );
    let issued = tether(&["certs", "issue", "--dir", d, "--agent", "edge-1"]).await;
    assert!(issued.status.success());
}

struct Running {
    admin: String,
    tunnel_port: u16,
    server_id: String,
    sessions: std::sync::Arc<tether_server::SessionRegistry>,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// A server that knows `edge-1` and `edge-2`, and an `edge-1` agent connected to it.
async fn start(dir: &Path) -> Running {
    let tunnel = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tunnel_addr = tunnel.local_addr().unwrap();
    let admin_addr = admin.local_addr().unwrap();
    let server_yaml = format!(
        "listen: \"{tunnel_addr}\"\nadmin_listen: \"{admin_addr}\"\n\
         allowed_agents: [edge-1, edge-2]\nhealth: {{ interval: 100ms, timeout: 1s }}\n\
         forwards: [{{ name: edge-1-db, listen: \"127.0.0.1:0\", client: edge-1, target: \"db.internal:5432\" }}]\n\
         frontends: {{ socks5_listen: \"127.0.0.1:0\" }}\n"
    );
    let config = tether_server::ServerConfig::parse(&server_yaml, "server.yaml", dir).unwrap();
    let frontends = tether_server::FrontendListeners::bind(&config)
        .await
        .unwrap();
    let prometheus = prometheus::Registry::new();
    let server = tether_server::Server::new(config, &prometheus).unwrap();
    let sessions = server.registry();
    let server_id = server.server_id().to_owned();
    let stop = CancellationToken::new();
    let listeners = tether_server::Listeners {
        tunnel,
        admin,
        forwards: vec![TcpListener::bind("127.0.0.1:0").await.unwrap()],
        frontends,
    };
    let server_stop = stop.clone();
    let server_task = tokio::spawn(async move {
        server.run(listeners, server_stop).await.unwrap();
    });

    let agent_task = spawn_agent(dir, "edge-1", tunnel_addr.port(), stop.clone());
    Running {
        admin: format!("http://{admin_addr}"),
        tunnel_port: tunnel_addr.port(),
        server_id,
        sessions,
        stop,
        tasks: vec![server_task, agent_task],
    }
}

/// An in-process agent with the certificate of `id` (labels site=eu-west, role=db).
fn spawn_agent(
    dir: &Path,
    id: &str,
    port: u16,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let agent_yaml = format!(
        "server_url: \"wss://127.0.0.1:{port}/v1/connect\"\n\
         tls: {{ cert: agent-{id}.pem, key: agent-{id}-key.pem, server_ca: ca.pem }}\n\
         admin_listen: \"\"\nlabels: {{ site: eu-west, role: db }}\n\
         reconnect: {{ min_delay: 50ms, max_delay: 200ms }}\n"
    );
    let mut agent_config: tether_agent::AgentConfig =
        tether_common::config_error::parse_yaml(&agent_yaml, "agent.yaml").unwrap();
    agent_config.resolve_paths(dir);
    let agent = tether_agent::Agent::new(agent_config, &prometheus::Registry::new()).unwrap();
    tokio::spawn(async move {
        agent
            .run(tether_agent::AgentListeners { admin: None }, stop)
            .await
            .unwrap();
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_prints_clients_and_sessions() {
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path()).await;
    let running = start(dir.path()).await;
    eventually("edge-1 registered and probed", || {
        running
            .sessions
            .sessions("edge-1")
            .first()
            .is_some_and(|e| e.health.rtt().is_some())
    })
    .await;
    let entry = running.sessions.sessions("edge-1").remove(0);

    let out = tether(&["status", "--admin", &running.admin]).await;
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 10, "{stdout}");
    let header: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(
        header,
        vec![
            "CLIENT", "SESSIONS", "SESSION", "INSTANCE", "SINCE", "RTT", "HEALTH", "STREAMS",
            "BYTES", "LABELS"
        ]
    );
    let edge1: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(edge1[0], "edge-1", "{stdout}");
    assert_eq!(edge1[1], "1");
    assert_eq!(edge1[2], entry.session_id.to_string());
    assert_eq!(edge1[3], entry.instance);
    assert!(
        edge1[4].ends_with('Z') && edge1[4].contains('T'),
        "{stdout}"
    );
    assert!(edge1[6].ends_with("ms"), "rtt: {stdout}");
    assert_eq!(edge1[7], "healthy");
    assert_eq!(edge1[8], "0");
    assert_eq!(edge1.last(), Some(&"role=db,site=eu-west"), "{stdout}");
    let edge2: Vec<&str> = lines[2].split_whitespace().collect();
    assert_eq!(
        edge2,
        vec!["edge-2", "0", "-", "-", "-", "-", "-", "-", "-", "-"]
    );
    assert_eq!(lines[3], "", "{stdout}");
    let forward: Vec<&str> = lines[5].split_whitespace().collect();
    assert_eq!(forward[0], "edge-1-db", "{stdout}");
    assert!(forward[1].starts_with("127.0.0.1:"), "{stdout}");
    // No dial through it yet: no last error.
    assert_eq!(
        forward[2..],
        ["edge-1", "db.internal:5432", "-"],
        "{stdout}"
    );
    assert!(
        lines[6].is_empty() && lines[7].starts_with("FRONTEND"),
        "{stdout}"
    );
    assert!(lines[8].starts_with("socks5 "), "{stdout}");
    assert_eq!(
        lines[9],
        format!(
            "2 clients, 1 session, 1 forward, 1 frontend (server {})",
            running.server_id
        ),
        "{stdout}"
    );

    // --json: the server's listing as is.
    let out = tether(&["status", "--admin", &running.admin, "--json"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let listing: ClientsResponse = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listing.clients.len(), 2);
    assert_eq!(listing.clients[0].client, "edge-1");
    let session = &listing.clients[0].sessions[0];
    assert_eq!(session.session_id, entry.session_id);
    assert_eq!(session.instance, entry.instance);
    assert!(session.healthy);
    assert!(session.rtt_seconds.is_some());
    assert!(session.peer_addr.starts_with("127.0.0.1:"));
    assert_eq!(session.labels["site"], "eu-west");
    assert!(listing.clients[1].sessions.is_empty());
    assert_eq!(listing.forwards.len(), 1);
    assert_eq!(listing.frontends[0].kind, "socks5");

    running.stop.cancel();
    for task in running.tasks {
        tokio::time::timeout(WAIT, task).await.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_of_one_client_says_why_it_was_refused_or_lost_its_session() {
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path()).await;
    let d = dir.path().to_str().unwrap();
    assert!(
        tether(&["certs", "issue", "--dir", d, "--agent", "edge-9"])
            .await
            .status
            .success()
    );
    let running = start(dir.path()).await;
    let tunnel_port = running.tunnel_port;
    eventually("edge-1 registered", || {
        !running.sessions.sessions("edge-1").is_empty()
    })
    .await;

    // edge-9 is not in allowed_agents: refused, and the server remembers why.
    let stop9 = CancellationToken::new();
    let edge9 = spawn_agent(dir.path(), "edge-9", tunnel_port, stop9.clone());
    eventually("edge-9 refused", || {
        running.sessions.history().get("edge-9").is_some()
    })
    .await;
    stop9.cancel();
    tokio::time::timeout(WAIT, edge9).await.unwrap().unwrap();
    let out = tether(&["status", "--admin", &running.admin, "edge-9"]).await;
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.starts_with("client edge-9: not connected\n"),
        "{stdout}"
    );
    assert!(
        stdout.contains("last refused: ")
            && stdout.contains(
                "agent \"edge-9\" is not allowed to connect (not in allowed_agents) (not_allowed)"
            ),
        "{stdout}"
    );

    // edge-1's session is closed by the server side: the end and its reason are kept.
    let entry = running.sessions.sessions("edge-1").remove(0);
    entry.session.close();
    eventually("edge-1's session end remembered", || {
        running
            .sessions
            .history()
            .get("edge-1")
            .is_some_and(|r| r.last_session_end.is_some())
    })
    .await;
    let out = tether(&["status", "--admin", &running.admin, "edge-1", "--json"]).await;
    let detail: tether_server::admin::ClientDetail = serde_json::from_slice(&out.stdout).unwrap();
    let end = detail.history.last_session_end.unwrap();
    assert_eq!(end.session_id, entry.session_id);
    assert!(!end.reason.is_empty());
    let out = tether(&["status", "--admin", &running.admin, "edge-1"]).await;
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("last session end: ")
            && stdout.contains(&format!("session {} after", entry.session_id)),
        "{stdout}"
    );

    // An id the server never heard of: 404, said plainly.
    let out = tether(&["status", "--admin", &running.admin, "edge-404"]).await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("is unknown"),
        "{}",
        text(&out.stderr)
    );

    running.stop.cancel();
    for task in running.tasks {
        tokio::time::timeout(WAIT, task).await.unwrap().unwrap();
    }
}

#[tokio::test]
async fn status_fails_clearly_when_the_admin_listener_is_unreachable_or_not_200() {
    // Nothing listens on a port that was just freed.
    let port = {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap().port()
    };
    let out = tether(&["status", "--admin", &format!("http://127.0.0.1:{port}")]).await;
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "cannot reach the admin listener at http://127.0.0.1:{port}"
        )),
        "{stderr}"
    );

    // Something that answers 404 (not a tether admin listener).
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let responder = tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 1024];
        let _ = tcp.read(&mut buf).await.unwrap();
        tcp.write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 10\r\n\r\nno route\r\n")
            .await
            .unwrap();
    });
    let out = tether(&["status", "--admin", &format!("http://{addr}")]).await;
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "http://{addr}/v1/clients answered HTTP 404: no route"
        )),
        "{stderr}"
    );
    responder.await.unwrap();

    let out = tether(&["status", "--admin", "https://127.0.0.1:9090"]).await;
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("use http://"));
}
