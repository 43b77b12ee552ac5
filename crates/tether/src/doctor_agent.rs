//! `tether doctor` for an agent config: the config, the agent's own certificate and key, the
//! pinned CA, the activation gate, then per server URL the network steps (`doctor_net`) and,
//! with `--target`, the dial policy (`doctor_target`).

use std::path::Path;

use tether_agent::AgentConfig;
use tether_agent::config::ServerUrl;
use tether_agent::gate::GateState;
use tether_common::pki_ops;

use crate::config_load::{self, Overrides};
use crate::doctor_report::{Report, expiry_step};
use crate::doctor_steps::{CaBundle, ca_bundle, config_invalid, key_matches};
use crate::status_cmd::{AdminUrl, fetch_within};

/// How long a running agent's admin endpoint may take to answer.
const ADMIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Most addresses of one server name checked.
const MAX_ADDRESSES: usize = 8;

pub(crate) async fn run(
    report: &mut Report,
    path: &Path,
    overrides: &Overrides<'_>,
    target: Option<&str>,
) {
    let config = match config_load::load_agent(path, overrides) {
        Ok(config) => config,
        Err(err) => {
            config_invalid(report, path, &err);
            return;
        }
    };
    report.ok(
        "config",
        &format!("valid agent config; dials {}", config.urls().join(", ")),
    );
    running_agent(report, &config).await;
    own_certificate(report, &config);
    pinned_ca(report, &config);
    gate(report, &config);
    for url in config.urls() {
        server(report, &config, &url).await;
    }
    if let Some(target) = target {
        crate::doctor_target::run(report, &config, target).await;
    }
}

/// Whether an agent already runs with this config (its admin listener answers
/// `GET /v1/status`), and what it says about its connection.
async fn running_agent(report: &mut Report, config: &AgentConfig) {
    let Some(addr) = config.admin_addr().filter(|a| a.port() != 0) else {
        return;
    };
    if std::net::TcpListener::bind(addr).is_ok() {
        report.ok(
            "agent",
            &format!("no agent running (admin_listen {addr} is free)"),
        );
        return;
    }
    let Ok(url) = AdminUrl::parse(&format!("http://{addr}")) else {
        return;
    };
    let status = fetch_within(&url, "/v1/status", ADMIN_TIMEOUT)
        .await
        .and_then(|body| Ok(serde_json::from_str::<serde_json::Value>(&body)?));
    let status = match status {
        Ok(status) => status,
        Err(err) => {
            report.warn(
                "agent",
                &format!("admin_listen {addr} is in use, but not by a tether agent: {err:#}"),
                "another process holds the agent's admin address: the agent cannot start",
            );
            return;
        }
    };
    let text = |key: &str| status.get(key).and_then(|v| v.as_str()).map(str::to_owned);
    if let Some(reason) = text("gate_disabled") {
        report.ok(
            "agent",
            &format!("an agent runs, idle: activation gate closed: {reason}"),
        );
    } else if status.get("connected").and_then(serde_json::Value::as_bool) == Some(true) {
        report.ok(
            "agent",
            &format!(
                "an agent runs and is connected (server {})",
                text("server_id").unwrap_or_else(|| "?".to_owned())
            ),
        );
    } else {
        report.warn(
            "agent",
            &format!(
                "an agent runs, not connected; its last error: {}",
                text("last_error").unwrap_or_else(|| "none yet".to_owned())
            ),
            "the steps below say why",
        );
    }
}

fn own_certificate(report: &mut Report, config: &AgentConfig) {
    let files = config.tls_files();
    let info = match pki_ops::inspect_file(&files.cert) {
        Ok(infos) => infos.into_iter().next(),
        Err(err) => {
            report.fail(
                "cert",
                &format!("tls.cert: {err}"),
                "point tls.cert at the agent certificate (`tether certs issue --agent ID` \
                 writes agent-ID.pem)",
            );
            return;
        }
    };
    let Some(info) = info else { return };
    match info.agent_id() {
        Some(id) => report.ok(
            "cert",
            &format!(
                "agent \"{id}\" ({}), issued by {}",
                files.cert.display(),
                info.issuer
            ),
        ),
        None => report.fail(
            "cert",
            &format!(
                "{} carries no agent identity (URI SAN tether://agent/<id>); subject {}",
                files.cert.display(),
                info.subject
            ),
            "use a certificate from `tether certs issue --agent ID` (a server certificate \
             is not an agent certificate)",
        ),
    }
    key_matches(
        report,
        &files.cert,
        &files.key,
        "tls.key must be the key written with this certificate (agent-ID-key.pem)",
    );
    expiry_step(
        report,
        "cert",
        "the agent certificate",
        (info.not_before, info.not_after),
        &format!(
            "renew it: tether certs renew --dir CA_DIR --cert {} --key {} (the server refuses \
             an expired certificate)",
            files.cert.display(),
            files.key.display()
        ),
    );
}

fn pinned_ca(report: &mut Report, config: &AgentConfig) {
    ca_bundle(
        report,
        &CaBundle {
            key: "tls.server_ca",
            path: &config.tls.server_ca,
            role: "pinned CA",
            unreadable_fix: "point tls.server_ca at the ca.pem of the CA that issued the server \
                             certificate",
            not_ca_fix: "tls.server_ca is the CA's ca.pem, not the server's certificate",
            expiry_fix: "a new CA means new certificates for the server and every agent",
        },
    );
}

fn gate(report: &mut Report, config: &AgentConfig) {
    let activation = &config.activation;
    match activation.evaluate(&config_load::process_env) {
        GateState::Enabled
            if activation.require_role.is_empty() && activation.require_features.is_empty() =>
        {
            report.ok("gate", "open (no activation requirement)");
        }
        GateState::Enabled => report.ok(
            "gate",
            "open: the cluster's role and features match activation.require_*",
        ),
        GateState::Disabled(reason) => report.fail(
            "gate",
            &format!("closed: {reason}; the agent stays idle and never dials"),
            &format!(
                "make the role source ({:?}) report a required role and the required \
                 features, or change activation.require_role / require_features",
                activation.source.from
            ),
        ),
    }
}

/// DNS, then every address's network steps.
async fn server(report: &mut Report, config: &AgentConfig, url: &str) {
    let parsed = match ServerUrl::parse(url) {
        Ok(parsed) => parsed,
        Err(message) => {
            report.fail("dns", &format!("{url}: {message}"), "fix server_url");
            return;
        }
    };
    let Some(addrs) = resolve(report, config, &parsed).await else {
        return;
    };
    for addr in addrs.into_iter().take(MAX_ADDRESSES) {
        crate::doctor_net::endpoint(report, config, url, &parsed, addr).await;
    }
}

async fn resolve(
    report: &mut Report,
    config: &AgentConfig,
    server: &ServerUrl,
) -> Option<Vec<std::net::SocketAddr>> {
    if let Ok(ip) = server.host.parse::<std::net::IpAddr>() {
        report.ok("dns", &format!("{ip} is an address (no lookup)"));
        return Some(vec![std::net::SocketAddr::new(ip, server.port)]);
    }
    let lookup = tokio::net::lookup_host((server.host.as_str(), server.port));
    let found = match tokio::time::timeout(config.connect_timeout.0, lookup).await {
        Ok(Ok(addrs)) => addrs.collect::<Vec<_>>(),
        Ok(Err(err)) => {
            report.fail(
                "dns",
                &format!("cannot resolve {}: {err}", server.host),
                "check the host of server_url, /etc/hosts and this host's DNS servers",
            );
            return None;
        }
        Err(_) => {
            report.fail(
                "dns",
                &format!(
                    "no answer for {} within connect_timeout ({})",
                    server.host, config.connect_timeout
                ),
                "check this host's DNS servers (/etc/resolv.conf)",
            );
            return None;
        }
    };
    // As the agent does: IPv4 addresses when the name has any, else IPv6.
    let any_v4 = found.iter().any(std::net::SocketAddr::is_ipv4);
    let mut addrs: Vec<_> = found
        .into_iter()
        .filter(|a| a.is_ipv4() == any_v4)
        .collect();
    addrs.sort();
    addrs.dedup();
    if addrs.is_empty() {
        report.fail(
            "dns",
            &format!("{} resolves to no address", server.host),
            "check the DNS record of the server name",
        );
        return None;
    }
    let list: Vec<String> = addrs.iter().map(|a| a.ip().to_string()).collect();
    report.ok("dns", &format!("{} -> {}", server.host, list.join(", ")));
    Some(addrs)
}
