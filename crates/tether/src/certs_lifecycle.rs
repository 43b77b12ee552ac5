//! `tether certs renew|inspect|revoke` and the `--valid-for` option of `init` and `issue`:
//! the certificate life cycle after the first setup.

use std::path::Path;

use anyhow::Context;
use tether_common::pki::IssueOptions;
use tether_common::pki_ops::{self, CertInfo};
use tether_common::tls::{self, ClientCertPolicy};
use tether_common::tls_check;

use crate::cli::ConfigKind;
use crate::config_load::{self, Overrides};

/// The issue options of `--valid-for` (one year when omitted).
pub(crate) fn options(valid_for: Option<String>) -> anyhow::Result<IssueOptions> {
    match valid_for {
        None => Ok(IssueOptions::default()),
        Some(text) => {
            let validity =
                pki_ops::parse_validity(&text).map_err(|e| anyhow::anyhow!("--valid-for: {e}"))?;
            Ok(IssueOptions::valid_for(validity))
        }
    }
}

pub(crate) fn renew(
    dir: &Path,
    cert: &Path,
    key: &Path,
    valid_for: &str,
    keep_key: bool,
) -> anyhow::Result<()> {
    let validity =
        pki_ops::parse_validity(valid_for).map_err(|e| anyhow::anyhow!("--valid-for: {e}"))?;
    let report = pki_ops::renew(dir, cert, key, validity, keep_key)?;
    if keep_key {
        println!("renewed {} (key {} kept):", cert.display(), key.display());
    } else {
        println!("renewed {} (new key in {}):", cert.display(), key.display());
    }
    print_info(&report.info);
    Ok(())
}

pub(crate) fn revoke(dir: &Path, cert: Option<&Path>, crl: Option<&Path>) -> anyhow::Result<()> {
    let default_crl = dir.join("crl.pem");
    let crl = crl.unwrap_or(&default_crl);
    let report = pki_ops::revoke(dir, cert, crl)?;
    if let (Some(cert), true) = (cert, report.added.is_empty()) {
        println!("{} was revoked already", cert.display());
    } else {
        for serial in &report.added {
            println!("revoked serial {serial}");
        }
    }
    println!(
        "{} now revokes {} certificate(s); servers with it in tls.crls reload it and close \
         the revoked agents' sessions",
        crl.display(),
        report.total
    );
    Ok(())
}

pub(crate) fn inspect(file: &Path, config: Option<&Path>) -> anyhow::Result<()> {
    let infos = pki_ops::inspect_file(file)?;
    for (i, info) in infos.iter().enumerate() {
        if infos.len() > 1 {
            println!("[{i}]");
        }
        print_info(info);
    }
    let Some(config) = config else {
        return Ok(());
    };
    let first = &infos[0];
    let problems = match config_load::check(None, config)? {
        ConfigKind::Agent => check_agent(file, first, config)?,
        ConfigKind::Server => check_server(file, first, config)?,
    };
    if problems.is_empty() {
        println!("matches {}", config.display());
        Ok(())
    } else {
        for problem in &problems {
            println!("does not match {}: {problem}", config.display());
        }
        anyhow::bail!("{} does not match {}", file.display(), config.display())
    }
}

fn print_info(info: &CertInfo) {
    let (not_before, not_after) = info.validity_text();
    println!("  subject:    {}", info.subject);
    println!("  issuer:     {}", info.issuer);
    println!("  serial:     {}", info.serial);
    if let Some(id) = info.agent_id() {
        println!("  agent id:   {id}");
    }
    for (label, names) in [("dns", &info.dns), ("ip", &info.ips), ("uri", &info.uris)] {
        if !names.is_empty() {
            println!("  {label:<11} {}", names.join(", "));
        }
    }
    println!("  ca:         {}", info.is_ca);
    println!("  sha256:     {}", info.sha256);
    println!("  not before: {}", not_before);
    println!("  not after:  {}", not_after);
    let left = info.remaining_secs();
    if left <= 0 {
        println!("  EXPIRED {} ago", human(-left));
    } else {
        println!("  expires in {}", human(left));
    }
}

fn human(secs: i64) -> String {
    match secs {
        s if s >= 2 * 86_400 => format!("{} days", s / 86_400),
        s if s >= 2 * 3600 => format!("{} hours", s / 3600),
        s => format!("{} minutes", s / 60),
    }
}

fn check_agent(file: &Path, info: &CertInfo, config: &Path) -> anyhow::Result<Vec<String>> {
    let config = config_load::load_agent(config, &Overrides::none())?;
    let files = config.tls_files();
    let mut problems = Vec::new();
    if info.agent_id().is_none() {
        problems.push("it carries no agent identity (URI SAN tether://agent/<id>)".to_owned());
    }
    problems.extend(pki_ops::key_mismatch(file, &files.key)?);
    if info.remaining_secs() <= 0 {
        problems.push("it has expired".to_owned());
    }
    Ok(problems)
}

fn check_server(file: &Path, info: &CertInfo, config: &Path) -> anyhow::Result<Vec<String>> {
    let config = config_load::load_server(config, &Overrides::none())?;
    let files = config.tls_files();
    let mut problems = Vec::new();
    match info.agent_id() {
        // An agent certificate: would this server admit it?
        Some(id) => {
            let server = tls::server_tls(&files, ClientCertPolicy::Required)
                .context("loading the server's TLS material")?;
            let chain = tls::load_certs(file)?;
            if let Err(refusal) = tls_check::reverify(server.verifier.as_ref(), &chain) {
                problems.push(format!(
                    "the server refuses it ({}): {}",
                    refusal.reason, refusal.detail
                ));
            }
            if !config.allowed_agents.is_empty() && !config.allowed_agents.iter().any(|a| a == id) {
                problems.push(format!("agent \"{id}\" is not in allowed_agents"));
            }
        }
        // A server certificate: does it fit the configured key?
        None => {
            problems.extend(pki_ops::key_mismatch(file, &files.key)?);
            if info.remaining_secs() <= 0 {
                problems.push("it has expired".to_owned());
            }
        }
    }
    Ok(problems)
}
