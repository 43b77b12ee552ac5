//! Renewal of the agent's certificate at two thirds of its lifetime (`enroll.renew`): a new key
//! and a CSR sent to the server's `/v1/renew`, authenticated by the current certificate (no
//! token); the new files replace the old ones and the reloader applies them in place, so the
//! sessions stay up and the next handshake presents the new certificate. A refusal (a revoked
//! certificate, an agent no longer allowed) is counted and logged with the server's reason, and
//! tried again later.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus::{IntCounterVec, IntGauge, Opts, Registry};
use serde::Serialize;
use tether_common::csr::{self, KeyAndCsr};
use tether_common::identity::{IdentityMode, agent_id_from_cert};
use tether_common::tls;
use tether_common::tls_check::{cert_validity, rfc3339};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::AgentConfig;
use crate::enroll::{self, EnrollError};
use crate::enroll_http::{self, EnrollTarget};
use crate::reload::AgentReloader;

/// The renewal route on the server's tunnel listener.
const RENEW_PATH: &str = "/v1/renew";
/// How often the schedule is looked at again when nothing is due (a replaced certificate, a
/// changed `enroll.renew`).
const RECHECK: Duration = Duration::from_secs(60);
/// Bounds of the delay before another attempt after a failure.
const RETRY_MIN: i64 = 1;
const RETRY_MAX: i64 = 300;

/// Labels of `tether_agent_cert_renewals_total{result}`.
pub const RENEWAL_RESULTS: [&str; 3] = ["renewed", "refused", "error"];

/// The renewal metrics of the agent.
#[derive(Debug, Clone)]
pub struct RenewalMetrics {
    /// `tether_agent_cert_renewals_total{result}`.
    pub renewals: IntCounterVec,
    /// `tether_agent_cert_last_renewal_timestamp_seconds` (0 before the first).
    pub last: IntGauge,
    /// `tether_agent_cert_next_renewal_timestamp_seconds` (the next attempt).
    pub next: IntGauge,
}

impl RenewalMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let renewals = IntCounterVec::new(
            Opts::new(
                "tether_agent_cert_renewals_total",
                "Renewals of the agent certificate with the server by result: renewed, \
                 refused (the server said no, e.g. a revoked certificate), error.",
            ),
            &["result"],
        )?;
        let last = IntGauge::new(
            "tether_agent_cert_last_renewal_timestamp_seconds",
            "When the agent certificate was last renewed, Unix seconds (0: not yet).",
        )?;
        let next = IntGauge::new(
            "tether_agent_cert_next_renewal_timestamp_seconds",
            "When the agent will next try to renew its certificate, Unix seconds.",
        )?;
        registry.register(Box::new(renewals.clone()))?;
        registry.register(Box::new(last.clone()))?;
        registry.register(Box::new(next.clone()))?;
        for result in RENEWAL_RESULTS {
            renewals.with_label_values(&[result]);
        }
        Ok(Self {
            renewals,
            last,
            next,
        })
    }
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// When the certificate at `tls.cert` is due for renewal (two thirds into its lifetime), and
/// its `notAfter`.
pub fn renewal_due(config: &AgentConfig) -> Result<(i64, i64), String> {
    let chain = tls::load_certs(&config.tls.cert).map_err(|e| e.to_string())?;
    let leaf = chain.first().ok_or("no certificate")?;
    let (not_before, not_after) = cert_validity(leaf).map_err(|e| e.to_string())?;
    Ok((not_before + (not_after - not_before) * 2 / 3, not_after))
}

/// Renews the certificate on schedule until stopped.
pub(crate) struct Renewer {
    pub(crate) reloader: AgentReloader,
    pub(crate) metrics: RenewalMetrics,
}

impl Renewer {
    /// Runs until `stop`.
    pub(crate) async fn run(self, stop: CancellationToken) {
        // After a failure, no attempt before this (Unix seconds).
        let mut retry_at = 0i64;
        loop {
            let config = self.reloader.current();
            let wait = match config.enroll.as_ref().filter(|e| e.renew) {
                None => RECHECK,
                Some(_) => match renewal_due(&config) {
                    Err(err) => {
                        warn!(error = %err, "cannot read the agent certificate to plan its renewal");
                        RECHECK
                    }
                    Ok((due, not_after)) => {
                        let at = due.max(retry_at);
                        self.metrics.next.set(at);
                        let now = now();
                        if now >= at {
                            retry_at = self.attempt(&config, not_after).await;
                            continue;
                        }
                        RECHECK.min(Duration::from_secs((at - now).unsigned_abs()))
                    }
                },
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// One renewal; returns when the next attempt may start (0 after a success: the new
    /// certificate's schedule decides).
    async fn attempt(&self, config: &AgentConfig, not_after: i64) -> i64 {
        match renew_once(config).await {
            Ok(issued) => {
                self.metrics.renewals.with_label_values(&["renewed"]).inc();
                self.metrics.last.set(now());
                info!(
                    agent.id = %issued.agent_id,
                    not_after = %rfc3339(issued.not_after),
                    "agent certificate renewed; the sessions stay, the next handshake presents it"
                );
                if let Err(errors) = self.reloader.reload(self.reloader.current()) {
                    warn!(error = %errors, "the renewed certificate was written but not applied");
                }
                0
            }
            Err(err) => {
                self.metrics
                    .renewals
                    .with_label_values(&[match err.label() {
                        "refused" | "pin" => "refused",
                        _ => "error",
                    }])
                    .inc();
                let now = now();
                let delay = ((not_after - now) / 10).clamp(RETRY_MIN, RETRY_MAX);
                warn!(
                    error = %err,
                    retry_in_secs = delay,
                    expires = %rfc3339(not_after),
                    "agent certificate renewal failed"
                );
                now + delay
            }
        }
    }
}

#[derive(Serialize)]
struct RenewRequest<'a> {
    csr: &'a str,
}

/// One renewal: a new key and CSR over TLS with the current certificate; on success the new
/// key and certificate are written where `tls.key` and `tls.cert` point.
pub(crate) async fn renew_once(config: &AgentConfig) -> Result<enroll::Issued, EnrollError> {
    let target = EnrollTarget::of(config).map_err(EnrollError::Config)?;
    let files = config.tls_files();
    let current = tls::load_certs(&files.cert).map_err(|e| EnrollError::Files(e.to_string()))?;
    let current_id = current
        .first()
        .map(|leaf| agent_id_from_cert(leaf, IdentityMode::UriSan))
        .transpose()
        .map_err(|e| EnrollError::Files(e.to_string()))?;
    let tls = tls::client_config(&files).map_err(|e| EnrollError::Files(e.to_string()))?;
    let KeyAndCsr { key_pem, csr_pem } =
        csr::new_key_and_csr().map_err(|e| EnrollError::Files(e.to_string()))?;
    let body = serde_json::to_vec(&RenewRequest { csr: &csr_pem })
        .map_err(|e| EnrollError::Files(e.to_string()))?;
    let reply = enroll_http::exchange(&target, tls, "POST", RENEW_PATH, Some(&body)).await?;
    let issued = enroll::issued_from(reply)?;
    if current_id
        .as_deref()
        .is_some_and(|id| id != issued.agent_id)
    {
        return Err(EnrollError::Files(format!(
            "the server renewed the certificate as \"{}\", not as this agent's id",
            issued.agent_id
        )));
    }
    enroll::install(config, &key_pem, &issued)?;
    Ok(issued)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use tether_common::pki::{Ca, IssueOptions};

    #[test]
    fn renewal_is_due_two_thirds_into_the_lifetime() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::generate("test CA").unwrap();
        let start = SystemTime::now();
        let opts = IssueOptions {
            not_before: start,
            not_after: start + Duration::from_secs(30),
            ..IssueOptions::default()
        };
        let cert = ca.issue_agent("edge-1", &opts).unwrap();
        std::fs::write(dir.path().join("a.pem"), &cert.cert_pem).unwrap();
        let mut config: AgentConfig = serde_yaml_ng::from_str(
            "server_url: wss://localhost/\ntls: {cert: a.pem, key: k.pem, server_ca: c.pem}\n",
        )
        .unwrap();
        config.resolve_paths(dir.path());
        let (due, not_after) = renewal_due(&config).unwrap();
        let begin = start.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
        assert_eq!(not_after, begin + 30);
        assert_eq!(due, begin + 20);
        std::fs::write(dir.path().join("a.pem"), "junk").unwrap();
        assert!(renewal_due(&config).is_err());
    }
}
