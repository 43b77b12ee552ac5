//! `tether doctor` for a server config: the config, the certificate and its key, the agent CA
//! bundle and CRLs, the TLS config they build, whether a server already runs (its admin
//! endpoint), and whether every listener address can be bound or is held by that server.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use tether_common::{pki_ops, tls};
use tether_server::{ClientsResponse, ServerConfig};

use crate::config_load::{self, Overrides};
use crate::doctor_report::{Report, expiry_step};
use crate::doctor_steps::{CaBundle, ca_bundle, config_invalid, key_matches};
use crate::status_cmd::{AdminUrl, CLIENTS_PATH, fetch_within};

/// How long the admin endpoint of a running server may take to answer.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) async fn run(report: &mut Report, path: &Path, overrides: &Overrides<'_>) {
    let config = match config_load::load_server(path, overrides) {
        Ok(config) => config,
        Err(err) => {
            config_invalid(report, path, &err);
            return;
        }
    };
    report.ok(
        "config",
        &format!(
            "valid server config; {} forward(s), allowed_agents: {}",
            config.forwards.len(),
            if config.allowed_agents.is_empty() {
                "any agent of the CA".to_owned()
            } else {
                config.allowed_agents.join(", ")
            }
        ),
    );
    certificate(report, &config);
    client_ca(report, &config);
    match tls::server_tls(&config.tls_files(), config.client_cert_policy()) {
        Ok(_) => report.ok(
            "tls",
            "the TLS config builds (TLS 1.3, agent certificates verified)",
        ),
        Err(err) => report.fail("tls", &err.to_string(), "fix the files named"),
    }
    let running = admin(report, &config).await;
    listeners(report, &config, running.as_ref());
    consistency(report, &config, running.as_ref());
}

/// Consumers' client patterns against `allowed_agents`, and (with a running server) whether
/// each forward's agent is connected now.
fn consistency(report: &mut Report, config: &ServerConfig, running: Option<&ClientsResponse>) {
    let allowed = &config.allowed_agents;
    let mut patterns: Vec<(String, &str)> = Vec::new();
    for (i, consumer) in config.frontends.consumers.iter().enumerate() {
        for (j, pattern) in consumer.clients.iter().enumerate() {
            patterns.push((format!("frontends.consumers[{i}].clients[{j}]"), pattern));
        }
    }
    for (j, pattern) in config.frontends.anonymous_clients.iter().enumerate() {
        patterns.push((format!("frontends.anonymous_clients[{j}]"), pattern));
    }
    for (key, pattern) in patterns {
        let reaches = allowed
            .iter()
            .any(|id| tether_server::client_pattern_matches(pattern, id));
        if !allowed.is_empty() && !reaches {
            report.warn(
                "clients",
                &format!("{key} `{pattern}` matches no id in allowed_agents"),
                "a consumer can only reach allowed agents: fix the pattern or allowed_agents",
            );
        }
    }
    let Some(listing) = running else { return };
    for forward in &config.forwards {
        let connected = listing
            .clients
            .iter()
            .any(|c| c.client == forward.client && !c.sessions.is_empty());
        if connected {
            report.ok(
                "forward",
                &format!(
                    "{}: agent \"{}\" is connected",
                    forward.name, forward.client
                ),
            );
        } else {
            report.warn(
                "forward",
                &format!(
                    "{}: agent \"{}\" is not connected now; its consumers are reset",
                    forward.name, forward.client
                ),
                &format!(
                    "`tether status {}` says why; on the agent host, `tether doctor --config \
                     agent.yaml`",
                    forward.client
                ),
            );
        }
    }
}

fn certificate(report: &mut Report, config: &ServerConfig) {
    let files = config.tls_files();
    let info = match pki_ops::inspect_file(&files.cert) {
        Ok(infos) => infos.into_iter().next(),
        Err(err) => {
            report.fail(
                "cert",
                &format!("tls.cert: {err}"),
                "point tls.cert at the server certificate (tether certs init writes server.pem)",
            );
            return;
        }
    };
    let Some(info) = info else { return };
    let mut names = info.dns.clone();
    names.extend(info.ips.iter().cloned());
    report.ok(
        "cert",
        &format!(
            "\"{}\" for [{}], issued by {}",
            info.subject,
            names.join(", "),
            info.issuer
        ),
    );
    key_matches(
        report,
        &files.cert,
        &files.key,
        "tls.key must be the key written with the certificate (server-key.pem)",
    );
    expiry_step(
        report,
        "cert",
        "the server certificate",
        (info.not_before, info.not_after),
        &format!(
            "renew it: tether certs renew --dir CA_DIR --cert {} --key {}",
            files.cert.display(),
            files.key.display()
        ),
    );
}

fn client_ca(report: &mut Report, config: &ServerConfig) {
    ca_bundle(
        report,
        &CaBundle {
            key: "tls.client_ca",
            path: &config.tls.client_ca,
            role: "agent CA",
            unreadable_fix: "point tls.client_ca at the ca.pem that issues the agent certificates",
            not_ca_fix: "tls.client_ca is the CA's ca.pem, not an agent or server certificate",
            expiry_fix: "a new CA means new certificates for every agent",
        },
    );
    for crl in &config.tls.crls {
        match tls::load_crls(crl) {
            Ok(list) => report.ok("crl", &format!("{}: {} CRL(s)", crl.display(), list.len())),
            Err(err) => report.fail(
                "crl",
                &err.to_string(),
                "recreate it with tether certs revoke --dir CA_DIR",
            ),
        }
    }
}

/// Whether a server answers on `admin_listen`; its listing when it does.
async fn admin(report: &mut Report, config: &ServerConfig) -> Option<ClientsResponse> {
    let addr = config.admin_addr().ok()?;
    if addr.port() == 0 || std::net::TcpListener::bind(addr).is_ok() {
        report.ok(
            "admin",
            &format!("no server running (admin_listen {addr} is free)"),
        );
        return None;
    }
    let url = AdminUrl::parse(&format!("http://{addr}")).ok()?;
    let listing = fetch_within(&url, CLIENTS_PATH, ADMIN_TIMEOUT)
        .await
        .and_then(|body| Ok(serde_json::from_str::<ClientsResponse>(&body)?));
    match listing {
        Ok(listing) => {
            let sessions: usize = listing.clients.iter().map(|c| c.sessions.len()).sum();
            report.ok(
                "admin",
                &format!(
                    "a tether server runs: server id {} answers on {addr}, {} client(s), {} \
                     session(s)",
                    listing.server_id,
                    listing.clients.len(),
                    sessions
                ),
            );
            Some(listing)
        }
        Err(err) => {
            report.fail(
                "admin",
                &format!(
                    "admin_listen {addr} is in use, but not by a tether server's admin \
                     endpoint: {err:#}"
                ),
                &format!(
                    "stop the other process (`ss -ltnp 'sport = :{}'` names it) or choose \
                     another admin_listen",
                    addr.port()
                ),
            );
            None
        }
    }
}

/// Every listener address but the admin one: bindable, or held by the running server.
fn listeners(report: &mut Report, config: &ServerConfig, running: Option<&ClientsResponse>) {
    let mut addrs: Vec<(String, Option<SocketAddr>)> =
        vec![("listen".to_owned(), config.listen_addr().ok())];
    for (i, forward) in config.forwards.iter().enumerate() {
        addrs.push((format!("forwards[{i}].listen"), forward.listen_addr().ok()));
    }
    if let Ok(Some(addr)) = config.frontends.http_connect_addr() {
        addrs.push(("frontends.http_connect_listen".to_owned(), Some(addr)));
    }
    if let Ok(Some(addr)) = config.frontends.socks5_addr() {
        addrs.push(("frontends.socks5_listen".to_owned(), Some(addr)));
    }
    for (key, addr) in addrs {
        let Some(addr) = addr else { continue };
        if addr.port() == 0 {
            report.ok("listen", &format!("{key} {addr}: a port chosen at start"));
            continue;
        }
        match std::net::TcpListener::bind(addr) {
            Ok(_) => report.ok("listen", &format!("{key} {addr} can be bound")),
            Err(err) if err.kind() == std::io::ErrorKind::AddrInUse => match running {
                Some(listing) => report.ok(
                    "listen",
                    &format!(
                        "{key} {addr} is in use, by the running server (server id {}, which \
                         answers on admin_listen)",
                        listing.server_id
                    ),
                ),
                None => report.fail(
                    "listen",
                    &format!("{key} {addr} is in use by another process"),
                    &format!(
                        "stop it (`ss -ltnp 'sport = :{}'` names it) or choose another address",
                        addr.port()
                    ),
                ),
            },
            Err(err) => report.fail(
                "listen",
                &format!("{key} {addr} cannot be bound: {err}"),
                "use an address of this host (ip addr), or 0.0.0.0 / [::]",
            ),
        }
    }
}
