//! `tether certs init|issue`: a CA, a server certificate and agent certificates on disk
//! (`renew`, `inspect` and `revoke` are in `certs_lifecycle.rs`).

use std::net::IpAddr;
use std::path::Path;

use anyhow::Context;
use tether_common::pki;

pub(crate) fn init(
    dir: &Path,
    dns: &[String],
    ips: &[IpAddr],
    opts: &pki::IssueOptions,
) -> anyhow::Result<()> {
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
