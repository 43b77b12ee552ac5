//! `tether certs token` (a one-time join token added, hashed, to the server's token store) and
//! `tether certs issue --server-peer` (a replica's `tether://server/<id>` certificate).

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use tether_common::pki::{self, IssueOptions};
use tether_common::{csr, pki_ops, tls};
use tether_server::enroll_tokens;

use crate::config_load::{self, Overrides};

pub(crate) fn token(
    agent: &str,
    valid_for: &str,
    config: Option<&Path>,
    tokens_file: Option<&Path>,
) -> anyhow::Result<()> {
    let validity =
        pki_ops::parse_validity(valid_for).map_err(|e| anyhow::anyhow!("--valid-for: {e}"))?;
    let (store, pin) = match (config, tokens_file) {
        (_, Some(file)) => (file.to_owned(), None),
        (Some(config), None) => {
            let server = config_load::load_server(config, &Overrides::none())?;
            let Some(enrollment) = server.enrollment else {
                anyhow::bail!(
                    "{} has no `enrollment:` section (issuer_cert, issuer_key, tokens_file)",
                    config.display()
                );
            };
            let ca = tls::load_certs(&server.tls.client_ca)
                .with_context(|| "reading tls.client_ca for the ca_sha256 pin")?;
            (
                enrollment.tokens_file,
                ca.first().map(|der| csr::cert_sha256(der)),
            )
        }
        (None, None) => anyhow::bail!("give --config SERVER.YAML or --tokens-file FILE"),
    };
    let expires = unix(SystemTime::now() + validity);
    let token = enroll_tokens::add_token(&store, agent, expires)
        .with_context(|| format!("adding the token to {}", store.display()))?;
    // The token alone on stdout (for `> edge-7.token`); the rest on stderr.
    println!("{token}");
    eprintln!(
        "join token for agent \"{agent}\", valid for {} (until {}), stored hashed in {}",
        human(validity),
        tether_common::tls_check::rfc3339(expires),
        store.display()
    );
    eprintln!("it works once; the agent's config needs:");
    match pin {
        Some(pin) => {
            eprintln!("  enroll: {{ token_file: <file holding the token>, ca_sha256: {pin} }}")
        }
        None => eprintln!(
            "  enroll: {{ token_file: <file holding the token>, ca_sha256: <sha256 from `tether certs inspect ca.pem`> }}"
        ),
    }
    Ok(())
}

fn unix(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn human(d: Duration) -> String {
    tether_common::duration::HumanDuration(d).to_string()
}

/// `tether certs revoke --agent ID --config server.yaml`.
pub(crate) fn revoke_agent(agent: &str, config: &Path, crl: Option<&Path>) -> anyhow::Result<()> {
    let server = config_load::load_server(config, &Overrides::none())?;
    let Some(enrollment) = server.enrollment else {
        anyhow::bail!("{} has no `enrollment:` section", config.display());
    };
    let crl = match (crl, server.tls.crls.first()) {
        (Some(crl), _) => crl.to_owned(),
        (None, Some(first)) => first.clone(),
        (None, None) => anyhow::bail!(
            "{} lists no tls.crls: give --crl (and add it to tls.crls so the server reads it)",
            config.display()
        ),
    };
    let serials = enroll_tokens::issued_serials(&enrollment.tokens_file, agent)?;
    if serials.is_empty() {
        anyhow::bail!(
            "no certificate was issued to agent \"{agent}\" (issuance log {})",
            enroll_tokens::issued_file_for(&enrollment.tokens_file).display()
        );
    }
    let report = pki_ops::revoke_with(
        &enrollment.issuer_cert,
        &enrollment.issuer_key,
        None,
        &serials,
        &crl,
    )?;
    println!(
        "revoked {} certificate(s) of agent \"{agent}\" ({} already revoked); {} now revokes {}; \
         the server reloads it, closes the agent's sessions and refuses its renewal",
        report.added.len(),
        serials.len() - report.added.len(),
        crl.display(),
        report.total
    );
    Ok(())
}

pub(crate) fn issue_server_peer(dir: &Path, id: &str, opts: &IssueOptions) -> anyhow::Result<()> {
    let files = pki::issue_server_peer_files(dir, id, opts)?;
    println!(
        "issued a server-peer certificate for replica \"{id}\" (URI SAN tether://server/{id}; \
         refused as an agent):"
    );
    for file in &files {
        println!("  {}", file.display());
    }
    Ok(())
}
