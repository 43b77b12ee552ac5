//! The `tether doctor` steps both sides share: an invalid config, a key that must belong to
//! its certificate, and a CA bundle whose every certificate must be a CA that has not expired.

use std::path::Path;

use tether_common::pki_ops;

use crate::doctor_report::{Report, expiry_step};

/// The config step when the file does not load.
pub(crate) fn config_invalid(report: &mut Report, path: &Path, err: &anyhow::Error) {
    report.fail(
        "config",
        &format!("{err:#}"),
        &format!(
            "correct the keys listed (`tether check-config {}` lists every problem)",
            path.display()
        ),
    );
}

/// The key step: `key` must be the private key of `cert`; `fix` names the right file.
pub(crate) fn key_matches(report: &mut Report, cert: &Path, key: &Path, fix: &str) {
    match pki_ops::key_mismatch(cert, key) {
        Ok(None) => report.ok(
            "key",
            &format!("{} belongs to the certificate", key.display()),
        ),
        Ok(Some(problem)) => report.fail("key", &problem, fix),
        Err(err) => report.fail("key", &format!("tls.key: {err}"), "check tls.key"),
    }
}

/// A CA bundle a side trusts, and what to say about it.
pub(crate) struct CaBundle<'a> {
    /// The config key (`tls.client_ca`, `tls.server_ca`).
    pub(crate) key: &'a str,
    pub(crate) path: &'a Path,
    /// What the CA is to this side (`agent CA`, `pinned CA`).
    pub(crate) role: &'a str,
    /// The fix when the file cannot be read.
    pub(crate) unreadable_fix: &'a str,
    /// The fix when it holds a certificate that is not a CA.
    pub(crate) not_ca_fix: &'a str,
    /// The fix when a CA is close to (or past) its end.
    pub(crate) expiry_fix: &'a str,
}

/// The ca step: every certificate of the bundle is a CA, and its expiry.
pub(crate) fn ca_bundle(report: &mut Report, bundle: &CaBundle<'_>) {
    let infos = match pki_ops::inspect_file(bundle.path) {
        Ok(infos) => infos,
        Err(err) => {
            report.fail(
                "ca",
                &format!("{}: {err}", bundle.key),
                bundle.unreadable_fix,
            );
            return;
        }
    };
    for info in &infos {
        if !info.is_ca {
            report.fail(
                "ca",
                &format!(
                    "{} {} holds \"{}\", which is not a CA certificate",
                    bundle.key,
                    bundle.path.display(),
                    info.subject
                ),
                bundle.not_ca_fix,
            );
            continue;
        }
        expiry_step(
            report,
            "ca",
            &format!("{} \"{}\"", bundle.role, info.subject),
            (info.not_before, info.not_after),
            bundle.expiry_fix,
        );
    }
}
