//! `tether doctor --target host:port`: the agent's dial policy decides (the server has none), so
//! the target is checked here as the agent checks it: resolved once, every address checked,
//! the rule that allows it named (`policy.allow[i]`) or the reason it is denied, then a real
//! dial through the agent's own dialer.

use std::net::IpAddr;

use tether_agent::AgentConfig;
use tether_agent::dial::{Resolver, SystemResolver, dial};
use tether_agent::policy::{DenialReason, Host, Policy, PolicyConfig};

use crate::doctor_report::Report;

/// Most resolved addresses listed.
const MAX_ADDRESSES: usize = 16;

pub(crate) async fn run(report: &mut Report, config: &AgentConfig, target: &str) {
    let parsed = match tether_proto::TargetAddr::parse_host_port(target) {
        Ok(parsed) => parsed,
        Err(err) => {
            report.fail(
                "policy",
                &format!("--target {target}: {err}"),
                "give host:port, e.g. db.internal:5432 or 10.0.0.5:22",
            );
            return;
        }
    };
    let host = match &parsed.host {
        tether_proto::Host::Ip(ip) => Host::Ip(*ip),
        tether_proto::Host::Name(name) => Host::Name(name.clone()),
    };
    let port = parsed.port;
    let policy = match config.policy.compile() {
        Ok(policy) => policy,
        Err(errors) => {
            let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
            report.fail("policy", &text.join("; "), "fix the policy section");
            return;
        }
    };
    let Some(addrs) = resolve(report, config, &host, port).await else {
        return;
    };
    let mut allowed = false;
    for ip in addrs.into_iter().take(MAX_ADDRESSES) {
        allowed |= check(report, config, &policy, &host, port, ip);
    }
    if !allowed {
        return;
    }
    match dial(&policy, &SystemResolver, &host, port, config.dial_timeout.0).await {
        Ok((_, addr)) => report.ok(
            "target",
            &format!("{host}:{port}: connected to {addr} from this host, as the agent would"),
        ),
        Err(err) => report.fail(
            "target",
            &format!("{host}:{port}: allowed, but the dial fails: {err}"),
            "is the service running and listening on that port, reachable from this host?",
        ),
    }
}

async fn resolve(
    report: &mut Report,
    config: &AgentConfig,
    host: &Host,
    port: u16,
) -> Option<Vec<IpAddr>> {
    let name = match host.canonical() {
        Host::Ip(ip) => return Some(vec![ip]),
        Host::Name(name) => name,
    };
    let lookup = SystemResolver.resolve(&name, port);
    match tokio::time::timeout(config.dial_timeout.0, lookup).await {
        Ok(Ok(addrs)) if !addrs.is_empty() => {
            let list: Vec<String> = addrs.iter().map(ToString::to_string).collect();
            report.ok("resolve", &format!("{name} -> {}", list.join(", ")));
            Some(addrs)
        }
        Ok(Ok(_)) => {
            report.fail(
                "resolve",
                &format!("{name} resolves to no address on this host"),
                "the agent resolves targets with this host's DNS: check the record",
            );
            None
        }
        Ok(Err(err)) => {
            report.fail(
                "resolve",
                &format!("cannot resolve {name} on this host: {err}"),
                "the agent resolves targets with this host's DNS: check the name",
            );
            None
        }
        Err(_) => {
            report.fail(
                "resolve",
                &format!("no answer for {name} within dial_timeout"),
                "check this host's DNS servers",
            );
            None
        }
    }
}

/// One resolved address: the rule that allows it, or why it is denied. True when allowed.
fn check(
    report: &mut Report,
    config: &AgentConfig,
    policy: &Policy,
    host: &Host,
    port: u16,
    ip: IpAddr,
) -> bool {
    match policy.check(host, port, ip) {
        Ok(()) => {
            let rule = allowing_rule(&config.policy, host, port, ip)
                .map_or_else(|| "a rule".to_owned(), |i| format!("policy.allow[{i}]"));
            report.ok(
                "policy",
                &format!("{host}:{port} -> {ip}: allowed by {rule}"),
            );
            true
        }
        Err(denial) => {
            let fix = match denial.kind() {
                DenialReason::NoRule => format!(
                    "add a rule to policy.allow in the agent config: {{ cidrs: [\"{ip}/{}\"], \
                     ports: [{port}] }}",
                    if ip.is_ipv4() { 32 } else { 128 }
                ),
                DenialReason::Port => {
                    format!("add {port} to the ports of the rule that matches {ip} (policy.allow)")
                }
                DenialReason::SensitiveAddress => format!(
                    "loopback, link-local and metadata addresses need an explicit CIDR rule \
                     inside their range, e.g. {{ cidrs: [\"{ip}/{}\"], ports: [{port}] }}",
                    if ip.is_ipv4() { 32 } else { 128 }
                ),
            };
            report.fail(
                "policy",
                &format!("{host}:{port} -> {ip}: {denial} ({})", denial.reason()),
                &fix,
            );
            false
        }
    }
}

/// The first rule that allows the address on its own.
fn allowing_rule(config: &PolicyConfig, host: &Host, port: u16, ip: IpAddr) -> Option<usize> {
    config.allow.iter().position(|rule| {
        let single = PolicyConfig {
            allow: vec![rule.clone()],
        };
        single
            .compile()
            .is_ok_and(|policy| policy.check(host, port, ip).is_ok())
    })
}
