//! `tether init`: a CA, the server and agent certificates and two minimal configs that match
//! each other (one forward, and the agent policy that allows exactly its target), so that the
//! quick start is three commands. Nothing is turned on that was not asked for: no proxies, no
//! listener beyond loopback.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::Path;

use anyhow::{Context, bail};
use tether_common::pki;

use crate::config_load;

/// What `tether init` was asked for.
pub(crate) struct InitArgs<'a> {
    pub(crate) dir: &'a Path,
    /// The name agents dial (in the server certificate next to `localhost`).
    pub(crate) server_name: &'a str,
    pub(crate) agent: &'a str,
    /// The forward's target as the agent sees it, `host:port`.
    pub(crate) target: &'a str,
    /// The forward's local listen address, `ip:port`.
    pub(crate) forward_listen: &'a str,
}

/// Writes everything into `dir` (created; refused when it already holds a CA key or configs).
pub(crate) fn run(args: &InitArgs<'_>) -> anyhow::Result<()> {
    let dir = args.dir;
    for name in ["server.yaml", "agent.yaml"] {
        if dir.join(name).exists() {
            bail!(
                "{} already exists; tether init does not overwrite (use another --dir)",
                dir.join(name).display()
            );
        }
    }
    let (host, port) = split_target(args.target)?;
    let (dns, ips) = match args.server_name.parse::<IpAddr>() {
        Ok(ip) => (Vec::new(), vec![ip]),
        Err(_) => (vec![args.server_name.to_owned()], Vec::new()),
    };
    tether_common::identity::validate_agent_id(args.agent)
        .with_context(|| format!("--agent {}", args.agent))?;
    let (dns, ips) = crate::certs_cmd::server_names(&dns, &ips, true);
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut files = pki::init_dir(dir, &dns, &ips)?.files;
    files.extend(pki::issue_agent_files(dir, args.agent)?.files);
    let server = server_yaml(args);
    let agent = agent_yaml(args, &host, port);
    // What is written must load (the certificates are in place now).
    config_load::server_from_str(&server, dir, "server.yaml (generated)")?;
    config_load::agent_from_str(&agent, dir, "agent.yaml (generated)")?;
    for (name, text) in [("server.yaml", &server), ("agent.yaml", &agent)] {
        let path = dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        files.push(path);
    }
    println!("created in {}:", dir.display());
    for file in &files {
        println!("  {}", file.display());
    }
    let names: Vec<String> = dns
        .iter()
        .cloned()
        .chain(ips.iter().map(IpAddr::to_string))
        .collect();
    println!("server certificate names: {}", names.join(", "));
    let d = dir.display();
    println!("next:");
    println!("  tether server --config {d}/server.yaml");
    println!("  tether agent  --config {d}/agent.yaml");
    println!(
        "  then connect to {} to reach {} through agent {}",
        args.forward_listen, args.target, args.agent
    );
    Ok(())
}

/// `host:port` (`[v6]:port`) into the host and the port.
fn split_target(target: &str) -> anyhow::Result<(String, u16)> {
    tether_proto::TargetAddr::parse_host_port(target)
        .map_err(|e| anyhow::anyhow!("--target {target}: {e}"))?;
    let (host, port) = target
        .rsplit_once(':')
        .with_context(|| format!("--target {target}: expected host:port"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Ok((host.to_owned(), port.parse().context("--target: port")?))
}

fn server_yaml(args: &InitArgs<'_>) -> String {
    let mut out = String::new();
    let _ = write!(
        out,
        "# tether server, written by `tether init` (every key and its default: config/server.yaml).\n\
         # Check: tether check-config {dir}/server.yaml   Run: tether server --config {dir}/server.yaml\n\
         \n\
         # Agents connect here (mutual TLS). Loopback only: use \"0.0.0.0:8443\" (or one address)\n\
         # when agents run on other machines.\n\
         listen: \"127.0.0.1:8443\"\n\
         # /, /healthz, /readyz, /metrics, /v1/clients. No authentication: keep it on loopback.\n\
         admin_listen: \"127.0.0.1:9090\"\n\
         tls:\n  cert: server.pem\n  key: server-key.pem\n  client_ca: ca.pem\n\
         # Only these agent ids may connect.\n\
         allowed_agents: [{agent}]\n\
         # Each forward listens locally and tunnels every connection to `target` through `client`.\n\
         # The agent's policy must allow the target too.\n\
         forwards:\n\
         \x20 - name: {agent}-target\n\
         \x20   listen: \"{listen}\"\n\
         \x20   client: {agent}\n\
         \x20   target: \"{target}\"\n",
        dir = args.dir.display(),
        agent = args.agent,
        listen = args.forward_listen,
        target = args.target,
    );
    out
}

fn agent_yaml(args: &InitArgs<'_>, host: &str, port: u16) -> String {
    let rule = match host.parse::<IpAddr>() {
        Ok(IpAddr::V4(ip)) => format!("cidrs: [\"{ip}/32\"]"),
        Ok(IpAddr::V6(ip)) => format!("cidrs: [\"{ip}/128\"]"),
        Err(_) => format!("hosts: [\"{host}\"]"),
    };
    let server = if args.server_name.contains(':') {
        format!("[{}]", args.server_name)
    } else {
        args.server_name.to_owned()
    };
    format!(
        "# tether agent {agent}, written by `tether init` (every key and its default: config/agent.yaml).\n\
         # On another machine it needs this file, ca.pem, agent-{agent}.pem and agent-{agent}-key.pem\n\
         # (never ca-key.pem). Run: tether agent --config agent.yaml\n\
         \n\
         server_url: \"wss://{server}:8443/v1/connect\"\n\
         tls:\n  cert: agent-{agent}.pem\n  key: agent-{agent}-key.pem\n  server_ca: ca.pem\n\
         # Shown by the server in /v1/clients and `tether status`.\n\
         labels: {{}}\n\
         # /, /healthz, /readyz, /metrics, /v1/status. Loopback only.\n\
         admin_listen: \"127.0.0.1:9091\"\n\
         # What the server may ask this agent to dial; everything else is denied. Loopback,\n\
         # link-local and metadata addresses need a rule like the one below.\n\
         policy:\n\
         \x20 allow:\n\
         \x20   - {rule}\n\
         \x20     ports: [{port}]\n",
        agent = args.agent,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_split_into_host_and_port() {
        assert_eq!(
            split_target("127.0.0.1:8080").unwrap(),
            ("127.0.0.1".to_owned(), 8080)
        );
        assert_eq!(
            split_target("db.internal:5432").unwrap(),
            ("db.internal".to_owned(), 5432)
        );
        assert_eq!(split_target("[::1]:22").unwrap(), ("::1".to_owned(), 22));
        assert!(split_target("no-port").is_err());
    }
}
