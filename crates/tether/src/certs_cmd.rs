//! `tether certs init|issue`: a CA, a server certificate and agent certificates on disk
//! (`renew`, `inspect` and `revoke` are in `certs_lifecycle.rs`).

use std::net::IpAddr;
use std::path::Path;

use anyhow::Context;
use tether_common::pki;

/// `localhost` and 127.0.0.1 (unless `local` is false) followed by the given names, without
/// repeats: the example agent config dials `wss://localhost:8443`, so a certificate made for
/// `--dns tether.example.com` must still be valid for it.
pub(crate) fn server_names(
    dns: &[String],
    ips: &[IpAddr],
    local: bool,
) -> (Vec<String>, Vec<IpAddr>) {
    let mut names: Vec<String> = Vec::new();
    let mut addrs: Vec<IpAddr> = Vec::new();
    let local_names = local.then(|| "localhost".to_owned());
    for name in local_names.into_iter().chain(dns.iter().cloned()) {
        if !names.contains(&name) {
            names.push(name);
        }
    }
    let local_ips = local.then(|| IpAddr::from([127, 0, 0, 1]));
    for ip in local_ips.into_iter().chain(ips.iter().copied()) {
        if !addrs.contains(&ip) {
            addrs.push(ip);
        }
    }
    (names, addrs)
}

pub(crate) fn init(
    dir: &Path,
    dns: &[String],
    ips: &[IpAddr],
    local: bool,
    opts: &pki::IssueOptions,
) -> anyhow::Result<()> {
    let (dns, ips) = server_names(dns, ips, local);
    let (dns, ips) = (dns.as_slice(), ips.as_slice());
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let report = pki::init_dir_with(dir, dns, ips, opts)?;
    println!(
        "created a CA and a server certificate in {}:",
        dir.display()
    );
    for file in &report.files {
        println!("  {}", file.display());
    }
    let names: Vec<String> = dns
        .iter()
        .cloned()
        .chain(ips.iter().map(IpAddr::to_string))
        .collect();
    println!("server certificate names: {}", names.join(", "));
    println!(
        "next: tether certs issue --dir {} --agent <ID>",
        dir.display()
    );
    Ok(())
}

pub(crate) fn issue(dir: &Path, agent: &str, opts: &pki::IssueOptions) -> anyhow::Result<()> {
    let report = pki::issue_agent_files_with(dir, agent, opts)?;
    println!(
        "issued a certificate for agent \"{}\" (URI SAN tether://agent/{}):",
        report.agent_id, report.agent_id
    );
    for file in &report.files {
        println!("  {}", file.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn localhost_stays_next_to_given_names() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let (names, ips) = server_names(&["tether.example.com".into()], &[ip("10.0.0.1")], true);
        assert_eq!(names, ["localhost", "tether.example.com"]);
        assert_eq!(ips, [ip("127.0.0.1"), ip("10.0.0.1")]);
        let (names, ips) = server_names(&["localhost".into()], &[ip("127.0.0.1")], true);
        assert_eq!((names.len(), ips.len()), (1, 1), "no repeats");
        let (names, ips) = server_names(&["tether.example.com".into()], &[], false);
        assert_eq!(names, ["tether.example.com"]);
        assert!(ips.is_empty());
    }
}
