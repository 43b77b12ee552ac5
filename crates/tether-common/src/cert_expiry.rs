//! `tether_tls_cert_expiry_timestamp_seconds{cert}`: the `notAfter` of each certificate file a
//! daemon loaded, so that an alert can fire weeks before a certificate or CA expires.

use std::path::Path;

use prometheus::core::Collector;
use prometheus::{IntGaugeVec, Opts, Registry};
use rustls_pki_types::CertificateDer;

use crate::tls::{self, TlsError};

/// Which certificate a series describes (the closed set of `cert` label values).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertRole {
    /// The server's own certificate (`tls.cert` of server.yaml).
    Server,
    /// The CA bundle agents must chain to (`tls.client_ca` of server.yaml).
    ClientCa,
    /// The agent's own certificate (`tls.cert` of agent.yaml).
    Agent,
    /// The pinned server CA bundle (`tls.server_ca` of agent.yaml).
    ServerCa,
}

impl CertRole {
    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            CertRole::Server => "server",
            CertRole::ClientCa => "client_ca",
            CertRole::Agent => "agent",
            CertRole::ServerCa => "server_ca",
        }
    }
}

/// The expiry gauges of one daemon. Cheap to clone; clones share the series.
#[derive(Debug, Clone)]
pub struct CertExpiry {
    /// `tether_tls_cert_expiry_timestamp_seconds{cert}`.
    pub gauge: IntGaugeVec,
}

impl CertExpiry {
    /// Gauges registered nowhere (unit tests, in-memory PEM setups).
    pub fn unregistered() -> prometheus::Result<Self> {
        Ok(Self {
            gauge: IntGaugeVec::new(
                Opts::new(
                    "tether_tls_cert_expiry_timestamp_seconds",
                    "notAfter of the loaded certificates as a Unix timestamp, by role; for a \
                     bundle or chain, the earliest notAfter in it.",
                ),
                &["cert"],
            )?,
        })
    }

    /// Creates the gauges and registers them in `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let expiry = Self::unregistered()?;
        registry.register(Box::new(expiry.gauge.clone()))?;
        Ok(expiry)
    }

    /// Records the earliest `notAfter` among `certs` for `role`. A chain expires with its
    /// first certificate to expire, and a CA bundle needs rotating when its first CA expires.
    pub fn record(&self, role: CertRole, certs: &[CertificateDer<'_>]) -> Result<(), TlsError> {
        let mut earliest: Option<i64> = None;
        for cert in certs {
            let not_after = tls::cert_not_after(cert)?;
            earliest = Some(earliest.map_or(not_after, |e| e.min(not_after)));
        }
        if let Some(not_after) = earliest {
            self.gauge.with_label_values(&[role.label()]).set(not_after);
        }
        Ok(())
    }

    /// [`record`](Self::record) for the PEM file at `path`.
    pub fn record_file(&self, role: CertRole, path: &Path) -> Result<(), TlsError> {
        self.record(role, &tls::load_certs(path)?)
    }

    /// The recorded timestamp for `role`, if any.
    pub fn get(&self, role: CertRole) -> Option<i64> {
        self.gauge
            .collect()
            .iter()
            .flat_map(|family| family.get_metric())
            .find(|m| m.get_label().iter().any(|l| l.value() == role.label()))
            .map(|m| m.get_gauge().get_value() as i64)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use super::*;
    use crate::pki::{Ca, IssueOptions};

    fn agent_expiring_in(ca: &Ca, days: u64) -> (CertificateDer<'static>, i64) {
        let not_after = SystemTime::now() + Duration::from_secs(days * 86_400);
        let opts = IssueOptions {
            not_after,
            ..IssueOptions::default()
        };
        let pem = ca.issue_agent("edge-1", &opts).unwrap().cert_pem;
        let der = tls::certs_from_pem(&pem).unwrap().remove(0);
        let secs = not_after.duration_since(UNIX_EPOCH).unwrap().as_secs();
        (der, i64::try_from(secs).unwrap())
    }

    #[test]
    fn a_bundle_reports_its_earliest_expiry() {
        let ca = Ca::generate("test CA").unwrap();
        let (late, late_ts) = agent_expiring_in(&ca, 300);
        let (early, early_ts) = agent_expiring_in(&ca, 10);
        let expiry = CertExpiry::unregistered().unwrap();
        assert_eq!(expiry.get(CertRole::Agent), None);
        expiry
            .record(CertRole::Agent, std::slice::from_ref(&late))
            .unwrap();
        // X.509 times have whole seconds; rcgen may round.
        assert!((expiry.get(CertRole::Agent).unwrap() - late_ts).abs() <= 1);
        expiry.record(CertRole::ServerCa, &[late, early]).unwrap();
        assert!((expiry.get(CertRole::ServerCa).unwrap() - early_ts).abs() <= 1);
        assert_eq!(expiry.get(CertRole::Server), None);
    }

    #[test]
    fn garbage_is_an_error_and_records_nothing() {
        let expiry = CertExpiry::unregistered().unwrap();
        let junk = CertificateDer::from(b"junk".to_vec());
        assert!(expiry.record(CertRole::Server, &[junk]).is_err());
        assert_eq!(expiry.get(CertRole::Server), None);
    }
}
