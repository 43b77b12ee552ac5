//! `tether certs init|issue`: a CA, a server certificate and agent certificates on disk.

use std::net::IpAddr;
use std::path::Path;

use anyhow::Context;
use tether_common::pki;

pub(crate) fn init(dir: &Path, dns: &[String], ips: &[IpAddr]) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let report = pki::init_dir(dir, dns, ips)?;
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

pub(crate) fn issue(dir: &Path, agent: &str) -> anyhow::Result<()> {
    let report = pki::issue_agent_files(dir, agent)?;
    println!(
        "issued a certificate for agent \"{}\" (URI SAN tether://agent/{}):",
        report.agent_id, report.agent_id
    );
    for file in &report.files {
        println!("  {}", file.display());
    }
    Ok(())
}
