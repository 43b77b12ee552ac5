//! Server TLS hot reload: the rustls config new handshakes use sits behind an `ArcSwap`; a
//! reload loads and checks the files (`tls_check`), swaps them in only when they are good and
//! changed, updates the expiry gauges, and then closes the live sessions whose certificate no
//! longer verifies or whose id is no longer allowed (`SessionRegistry::revoke`).

use std::collections::HashSet;
use std::sync::Arc;

use arc_swap::ArcSwap;
use prometheus::{IntCounterVec, Opts, Registry};
use rustls::server::danger::ClientCertVerifier;
use tether_common::cert_expiry::{CertExpiry, CertRole};
use tether_common::tls::{ClientCertPolicy, ServerTls, ServerTlsFiles, TlsError};
use tether_common::tls_check::{self, LoadedServerTls};
use tracing::{info, warn};

use crate::agents::registry::{Revocation, SessionRegistry};

/// Labels of `tether_tls_reloads_total{result}`.
pub const TLS_RELOAD_RESULTS: [&str; 3] = ["applied", "unchanged", "rejected"];
/// Labels of `tether_sessions_revoked_total{reason}`.
pub const REVOCATION_REASONS: [&str; 5] = [
    "revoked",
    "unknown_issuer",
    "expired",
    "bad_certificate",
    "not_allowed",
];

/// `tether_tls_reloads_total{result}` and `tether_sessions_revoked_total{reason}`.
#[derive(Debug, Clone)]
pub struct TlsReloadMetrics {
    /// Reloads of the TLS material by result.
    pub reloads: IntCounterVec,
    /// Live sessions closed after a reload because their certificate or id is no longer
    /// accepted, by reason.
    pub revoked: IntCounterVec,
}

impl TlsReloadMetrics {
    /// Creates the counters and registers them in `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let metrics = Self {
            reloads: IntCounterVec::new(
                Opts::new(
                    "tether_tls_reloads_total",
                    "Reloads of the server's TLS material (certificate, key, client CA \
                     bundle, CRLs) by result: applied, unchanged, rejected (the old material \
                     stays in use).",
                ),
                &["result"],
            )?,
            revoked: IntCounterVec::new(
                Opts::new(
                    "tether_sessions_revoked_total",
                    "Live sessions closed with GOAWAY(revoked) after a reload, by reason: \
                     revoked, unknown_issuer, expired, bad_certificate, not_allowed.",
                ),
                &["reason"],
            )?,
        };
        registry.register(Box::new(metrics.reloads.clone()))?;
        registry.register(Box::new(metrics.revoked.clone()))?;
        for result in TLS_RELOAD_RESULTS {
            metrics.reloads.with_label_values(&[result]);
        }
        for reason in REVOCATION_REASONS {
            metrics.revoked.with_label_values(&[reason]);
        }
        Ok(metrics)
    }
}

/// The material in force and what it was loaded from.
struct Active {
    config: Arc<rustls::ServerConfig>,
    /// The client-certificate verifier inside `config`; `None` when only the rustls config
    /// was given (then live chains are not verified again).
    verifier: Option<Arc<dyn ClientCertVerifier>>,
    /// `None` for material given in memory: never reloaded from files.
    fingerprint: Option<(u64, ClientCertPolicy)>,
}

/// Checked material ready to be swapped in ([`TlsReloader::prepare`]).
pub(crate) struct Prepared {
    loaded: LoadedServerTls,
    policy: ClientCertPolicy,
}

/// The server's TLS material in force, and how to replace it. Cheap to clone.
#[derive(Clone)]
pub struct TlsReloader {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for TlsReloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsReloader").finish_non_exhaustive()
    }
}

struct Inner {
    active: ArcSwap<Active>,
    metrics: TlsReloadMetrics,
    cert_expiry: CertExpiry,
    registry: Arc<SessionRegistry>,
    allowed: Arc<ArcSwap<HashSet<String>>>,
}

impl TlsReloader {
    pub(crate) fn new(
        config: Arc<rustls::ServerConfig>,
        verifier: Option<Arc<dyn ClientCertVerifier>>,
        fingerprint: Option<(u64, ClientCertPolicy)>,
        metrics: TlsReloadMetrics,
        cert_expiry: CertExpiry,
        registry: Arc<SessionRegistry>,
        allowed: Arc<ArcSwap<HashSet<String>>>,
    ) -> TlsReloader {
        TlsReloader {
            inner: Arc::new(Inner {
                active: ArcSwap::from_pointee(Active {
                    config,
                    verifier,
                    fingerprint,
                }),
                metrics,
                cert_expiry,
                registry,
                allowed,
            }),
        }
    }

    /// The rustls config for the next handshake.
    pub fn config(&self) -> Arc<rustls::ServerConfig> {
        self.inner.active.load().config.clone()
    }

    /// Whether the material in force came from files (and so can be reloaded).
    pub fn file_backed(&self) -> bool {
        self.inner.active.load().fingerprint.is_some()
    }

    /// Loads and checks `files`. `Ok(None)`: the same bytes and policy as in force (counted
    /// `unchanged`), or material given in memory. A failure is logged with the file and the
    /// reason and counted `rejected`; the material in force stays.
    pub(crate) fn prepare(
        &self,
        files: &ServerTlsFiles,
        policy: ClientCertPolicy,
    ) -> Result<Option<Prepared>, TlsError> {
        let Some(current) = self.inner.active.load().fingerprint else {
            return Ok(None);
        };
        let count = |result: &str| {
            self.inner
                .metrics
                .reloads
                .with_label_values(&[result])
                .inc()
        };
        match tls_check::load_server_tls(files, policy) {
            Ok(loaded) if (loaded.fingerprint, policy) == current => {
                count("unchanged");
                Ok(None)
            }
            Ok(loaded) => Ok(Some(Prepared { loaded, policy })),
            Err(err) => {
                self.reject(&err);
                Err(err)
            }
        }
    }

    /// Counts and logs refused material; the material in force stays.
    pub(crate) fn reject(&self, error: &dyn std::fmt::Display) {
        self.inner
            .metrics
            .reloads
            .with_label_values(&["rejected"])
            .inc();
        warn!(error = %error, "new TLS material refused; the material in force stays");
    }

    /// Swaps in prepared material: the next handshake uses it. Live sessions are untouched
    /// until [`sweep`](Self::sweep).
    pub(crate) fn commit(&self, prepared: Prepared) {
        let Prepared { loaded, policy } = prepared;
        let expiry = &self.inner.cert_expiry;
        for (role, certs) in [
            (CertRole::Server, &loaded.cert_chain),
            (CertRole::ClientCa, &loaded.client_cas),
        ] {
            if let Err(err) = expiry.record(role, certs) {
                warn!(cert = role.label(), error = %err, "cannot read the certificate expiry");
            }
        }
        let ServerTls { config, verifier } = loaded.tls;
        self.inner.active.store(Arc::new(Active {
            config,
            verifier: Some(verifier),
            fingerprint: Some((loaded.fingerprint, policy)),
        }));
        self.inner
            .metrics
            .reloads
            .with_label_values(&["applied"])
            .inc();
        info!("TLS material reloaded; new handshakes use it");
    }

    /// Closes every live session whose certificate chain no longer verifies against the
    /// material in force, or whose agent id is no longer in a non-empty `allowed_agents`.
    /// Returns how many were closed.
    pub fn sweep(&self) -> usize {
        let allowed = self.inner.allowed.load_full();
        let verifier = self.inner.active.load().verifier.clone();
        let closed = self.inner.registry.revoke(|entry| {
            if !allowed.is_empty() && !allowed.contains(&entry.client) {
                return Some(Revocation {
                    reason: "not_allowed",
                    detail: format!("agent \"{}\" is no longer in allowed_agents", entry.client),
                });
            }
            let (chain, verifier) = (entry.peer_chain.as_ref()?, verifier.as_ref()?);
            tls_check::reverify(verifier.as_ref(), chain)
                .err()
                .map(|refusal| Revocation {
                    reason: refusal.reason,
                    detail: format!("certificate no longer accepted: {}", refusal.detail),
                })
        });
        for (_, why) in &closed {
            self.inner
                .metrics
                .revoked
                .with_label_values(&[why.reason])
                .inc();
        }
        closed.len()
    }
}
