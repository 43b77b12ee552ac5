//! Enrollment and renewal on the tunnel listener: `GET /v1/enroll/ca` (the CA bundle an
//! enrolling agent checks against its pinned fingerprint), `POST /v1/enroll` (a one-time join
//! token and a CSR; the only route a client without a certificate may use) and
//! `POST /v1/renew` (a CSR, authenticated by the agent's current certificate). The identity of
//! an issued certificate is the token's, or the current certificate's: never the CSR's.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Extension, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http::{StatusCode, header};
use prometheus::{IntCounterVec, Opts, Registry};
use serde::{Deserialize, Serialize};
use tether_common::csr;
use tether_common::log_throttle::LogThrottle;
use tether_common::pki::{Ca, IssueOptions};
use tracing::{debug, info, warn};

use crate::agents::upgrade::handoff::ConnFacts;
use crate::config::EnrollmentConfig;
use crate::enroll_tokens::{MAX_TOKEN_LEN, RedeemError, TokenStore};

/// Where an agent fetches the CA bundle to check against its pin.
pub const ENROLL_CA_PATH: &str = "/v1/enroll/ca";
/// Where an agent without a certificate enrolls with a join token.
pub const ENROLL_PATH: &str = "/v1/enroll";
/// Where an agent renews its certificate, authenticated by it.
pub const RENEW_PATH: &str = "/v1/renew";
/// Largest request body of the enrollment routes.
const MAX_BODY: usize = 64 * 1024;
/// Largest CA bundle served.
const MAX_CA_BUNDLE: u64 = 1024 * 1024;
/// Back-dating of `notBefore` (at most a tenth of the validity), for slightly slow clocks.
const MAX_SKEW: Duration = Duration::from_secs(300);
/// How often one kind of refusal is logged at warn.
const LOG_WINDOW: Duration = Duration::from_secs(10);

/// Labels of `tether_enrollments_total{result}`.
pub const ENROLLMENT_RESULTS: [&str; 9] = [
    "issued",
    "unknown_token",
    "used_token",
    "expired_token",
    "bad_request",
    "bad_csr",
    "wrong_identity",
    "not_allowed",
    "error",
];
/// Labels of `tether_renewals_total{result}`.
pub const RENEWAL_RESULTS: [&str; 7] = [
    "issued",
    "no_client_cert",
    "bad_request",
    "bad_csr",
    "wrong_identity",
    "not_allowed",
    "error",
];

/// `tether_enrollments_total{result}` and `tether_renewals_total{result}`.
#[derive(Debug, Clone)]
pub struct EnrollmentMetrics {
    enrollments: IntCounterVec,
    renewals: IntCounterVec,
}

impl EnrollmentMetrics {
    /// Creates the counters and registers them in `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let enrollments = IntCounterVec::new(
            Opts::new(
                "tether_enrollments_total",
                "Enrollments with a join token by result: issued, or why refused \
                 (unknown_token, used_token, expired_token, bad_request, bad_csr, \
                 wrong_identity, not_allowed, error).",
            ),
            &["result"],
        )?;
        let renewals = IntCounterVec::new(
            Opts::new(
                "tether_renewals_total",
                "Certificate renewals by agents by result: issued, or why refused \
                 (no_client_cert, bad_request, bad_csr, wrong_identity, not_allowed, error). \
                 A revoked certificate is refused at the TLS handshake.",
            ),
            &["result"],
        )?;
        registry.register(Box::new(enrollments.clone()))?;
        registry.register(Box::new(renewals.clone()))?;
        for result in ENROLLMENT_RESULTS {
            enrollments.with_label_values(&[result]);
        }
        for result in RENEWAL_RESULTS {
            renewals.with_label_values(&[result]);
        }
        Ok(Self {
            enrollments,
            renewals,
        })
    }
}

/// Why a request is refused: the HTTP status, a metric label and the text the agent gets.
#[derive(Debug)]
struct Refusal {
    status: StatusCode,
    reason: &'static str,
    detail: String,
}

impl Refusal {
    fn new(status: StatusCode, reason: &'static str, detail: impl Into<String>) -> Self {
        Self {
            status,
            reason,
            detail: detail.into(),
        }
    }
}

/// What a successful enrollment or renewal answers (JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IssuedCertificate {
    /// The identity the certificate carries.
    pub agent_id: String,
    /// The certificate, then the issuer's when it is an intermediate (PEM).
    pub certificate: String,
    /// `notAfter`, Unix seconds.
    pub not_after: i64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EnrollRequest {
    token: String,
    csr: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RenewRequest {
    csr: String,
}

/// The issuing CA, the token store and what the routes share.
pub(crate) struct Enrollment {
    issuer: Ca,
    /// The issuer's certificate when it is an intermediate (sent after each leaf), else empty.
    chain_tail: String,
    /// `tls.client_ca`: the bundle served at [`ENROLL_CA_PATH`].
    ca_bundle: PathBuf,
    tokens: TokenStore,
    validity: Duration,
    allowed: Arc<ArcSwap<HashSet<String>>>,
    metrics: EnrollmentMetrics,
    log: LogThrottle,
}

impl std::fmt::Debug for Enrollment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Enrollment")
            .field("validity", &self.validity)
            .finish_non_exhaustive()
    }
}

/// Why enrollment could not start (the config validated, so only a file that changed since).
#[derive(Debug, thiserror::Error)]
#[error("enrollment.{key}: {problem}")]
pub struct EnrollmentError {
    key: &'static str,
    problem: String,
}

impl Enrollment {
    pub(crate) fn new(
        config: &EnrollmentConfig,
        client_ca: PathBuf,
        allowed: Arc<ArcSwap<HashSet<String>>>,
        metrics: EnrollmentMetrics,
    ) -> Result<Enrollment, EnrollmentError> {
        let fail = |key, problem: String| EnrollmentError { key, problem };
        let read = |key, path: &PathBuf| {
            std::fs::read_to_string(path)
                .map_err(|e| fail(key, format!("cannot read {}: {e}", path.display())))
        };
        let cert_pem = read("issuer_cert", &config.issuer_cert)?;
        let key_pem = read("issuer_key", &config.issuer_key)?;
        let issuer =
            Ca::from_pem(&cert_pem, &key_pem).map_err(|e| fail("issuer_cert", e.to_string()))?;
        let validity = config.validity().map_err(|e| fail("cert_valid_for", e))?;
        let self_signed = tether_common::pki_ops::inspect_file(&config.issuer_cert)
            .ok()
            .and_then(|infos| infos.into_iter().next())
            .is_some_and(|info| info.subject == info.issuer);
        Ok(Enrollment {
            issuer,
            chain_tail: if self_signed { String::new() } else { cert_pem },
            ca_bundle: client_ca,
            tokens: TokenStore::new(&config.tokens_file),
            validity,
            allowed,
            metrics,
            log: LogThrottle::new(LOG_WINDOW),
        })
    }

    /// Signs a certificate for `agent_id` and the key of `csr_pem`. Blocking (signing).
    fn issue(&self, agent_id: &str, csr_pem: &str) -> Result<IssuedCertificate, Refusal> {
        let allowed = self.allowed.load();
        if !allowed.is_empty() && !allowed.contains(agent_id) {
            return Err(Refusal::new(
                StatusCode::FORBIDDEN,
                "not_allowed",
                format!("agent \"{agent_id}\" is not in the server's allowed_agents"),
            ));
        }
        let request = csr::parse_csr(csr_pem)
            .map_err(|e| Refusal::new(StatusCode::BAD_REQUEST, "bad_csr", e.to_string()))?;
        csr::check_requested_identity(&request, agent_id)
            .map_err(|e| Refusal::new(StatusCode::FORBIDDEN, "wrong_identity", e.to_string()))?;
        let now = SystemTime::now();
        let opts = IssueOptions {
            not_before: now - MAX_SKEW.min(self.validity / 10),
            not_after: now + self.validity,
            ..IssueOptions::default()
        };
        let cert = self
            .issuer
            .sign_agent_csr(agent_id, csr_pem, &opts)
            .map_err(|e| Refusal::new(StatusCode::INTERNAL_SERVER_ERROR, "error", e.to_string()))?;
        let not_after = (now + self.validity)
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        // Logged before it is handed out: a certificate nobody can find cannot be revoked.
        let serial = tether_common::tls::certs_from_pem(&cert)
            .ok()
            .and_then(|certs| {
                certs
                    .first()
                    .and_then(|der| tether_common::pki_ops::serial_hex(der))
            })
            .ok_or_else(|| {
                Refusal::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "error",
                    "cannot read the issued certificate",
                )
            })?;
        self.tokens
            .record_issued(&serial, agent_id, not_after)
            .map_err(|e| {
                warn!(error = %e, "cannot log an issued certificate; not handing it out");
                Refusal::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "error",
                    "the server cannot log the issued certificate; try again later",
                )
            })?;
        Ok(IssuedCertificate {
            agent_id: agent_id.to_owned(),
            certificate: format!("{cert}{}", self.chain_tail),
            not_after,
        })
    }

    /// Counts, logs (with the agent id when known) and answers a refusal.
    fn refused(
        &self,
        counter: &IntCounterVec,
        what: &str,
        agent_id: Option<&str>,
        peer: SocketAddr,
        refusal: Refusal,
    ) -> Response {
        counter.with_label_values(&[refusal.reason]).inc();
        let id = agent_id.unwrap_or("-");
        match self.log.check(refusal.reason) {
            Some(suppressed) => warn!(
                agent.id = %id,
                peer.addr = %peer,
                reason = refusal.reason,
                status = refusal.status.as_u16(),
                suppressed,
                "{what} refused: {}",
                refusal.detail
            ),
            None => debug!(agent.id = %id, reason = refusal.reason, "{what} refused"),
        }
        text(refusal.status, &refusal.detail)
    }

    fn issued(&self, counter: &IntCounterVec, what: &str, issued: &IssuedCertificate) -> Response {
        counter.with_label_values(&["issued"]).inc();
        info!(
            agent.id = %issued.agent_id,
            not_after = issued.not_after,
            "{what}: certificate issued"
        );
        axum::Json(issued).into_response()
    }
}

fn text(status: StatusCode, body: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        format!("{body}\n"),
    )
        .into_response()
}

/// The enrollment routes, to merge into the tunnel listener's router.
pub(crate) fn routes<S>(enrollment: Arc<Enrollment>) -> Router<S> {
    Router::new()
        .route(ENROLL_CA_PATH, get(ca_bundle))
        .route(ENROLL_PATH, post(enroll))
        .route(RENEW_PATH, post(renew))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(enrollment)
}

async fn ca_bundle(State(e): State<Arc<Enrollment>>) -> Response {
    let path = e.ca_bundle.clone();
    let read = tokio::task::spawn_blocking(move || {
        let meta = std::fs::metadata(&path)?;
        if meta.len() > MAX_CA_BUNDLE {
            return Err(std::io::Error::other("the CA bundle is too large"));
        }
        std::fs::read_to_string(&path)
    })
    .await;
    match read {
        Ok(Ok(pem)) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/x-pem-file")],
            pem,
        )
            .into_response(),
        Ok(Err(err)) => {
            warn!(error = %err, "cannot serve the CA bundle for enrollment");
            text(
                StatusCode::SERVICE_UNAVAILABLE,
                "the CA bundle is unavailable",
            )
        }
        Err(_) => text(StatusCode::INTERNAL_SERVER_ERROR, "internal error"),
    }
}

async fn enroll(
    State(e): State<Arc<Enrollment>>,
    Extension(ctx): Extension<ConnFacts>,
    body: Bytes,
) -> Response {
    let counter = e.metrics.enrollments.clone();
    let request: EnrollRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(err) => {
            let refusal = Refusal::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("expected JSON {{\"token\": ..., \"csr\": ...}}: {err}"),
            );
            return e.refused(&counter, "enrollment", None, ctx.peer_addr, refusal);
        }
    };
    if request.token.len() > MAX_TOKEN_LEN {
        let refusal = Refusal::new(StatusCode::BAD_REQUEST, "bad_request", "token too long");
        return e.refused(&counter, "enrollment", None, ctx.peer_addr, refusal);
    }
    let worker = e.clone();
    let outcome = tokio::task::spawn_blocking(move || {
        worker.tokens.redeem(&request.token, |id| {
            worker
                .issue(id, &request.csr)
                .map_err(|r| (id.to_owned(), r))
        })
    })
    .await;
    let (agent_id, refusal) = match outcome {
        Ok(Ok(issued)) => return e.issued(&counter, "agent enrolled", &issued),
        Ok(Err(RedeemError::Token(refusal))) => (
            refusal.agent_id().map(str::to_owned),
            Refusal::new(StatusCode::FORBIDDEN, refusal.reason(), refusal.to_string()),
        ),
        Ok(Err(RedeemError::Check((id, refusal)))) => (Some(id), refusal),
        Ok(Err(RedeemError::Store(err))) => {
            // The paths stay in the server's log; the agent learns only that it failed.
            warn!(error = %err, "the enrollment token store failed");
            (
                None,
                Refusal::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "error",
                    "the server's token store is unavailable; try again later",
                ),
            )
        }
        Err(_) => (
            None,
            Refusal::new(StatusCode::INTERNAL_SERVER_ERROR, "error", "internal error"),
        ),
    };
    e.refused(
        &counter,
        "enrollment",
        agent_id.as_deref(),
        ctx.peer_addr,
        refusal,
    )
}

async fn renew(
    State(e): State<Arc<Enrollment>>,
    Extension(ctx): Extension<ConnFacts>,
    body: Bytes,
) -> Response {
    let counter = e.metrics.renewals.clone();
    let Some(agent_id) = ctx.agent_id.clone() else {
        let refusal = Refusal::new(
            StatusCode::UNAUTHORIZED,
            "no_client_cert",
            "renewal is authenticated by the current agent certificate; present it, or \
             enroll with a join token",
        );
        return e.refused(&counter, "renewal", None, ctx.peer_addr, refusal);
    };
    let request: RenewRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(err) => {
            let refusal = Refusal::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("expected JSON {{\"csr\": ...}}: {err}"),
            );
            return e.refused(&counter, "renewal", Some(&agent_id), ctx.peer_addr, refusal);
        }
    };
    let worker = e.clone();
    let id = agent_id.clone();
    let outcome = tokio::task::spawn_blocking(move || worker.issue(&id, &request.csr)).await;
    match outcome {
        Ok(Ok(issued)) => e.issued(&counter, "agent certificate renewed", &issued),
        Ok(Err(refusal)) => e.refused(&counter, "renewal", Some(&agent_id), ctx.peer_addr, refusal),
        Err(_) => {
            let refusal =
                Refusal::new(StatusCode::INTERNAL_SERVER_ERROR, "error", "internal error");
            e.refused(&counter, "renewal", Some(&agent_id), ctx.peer_addr, refusal)
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    use tether_common::tls::{self, ClientCertPolicy, ServerTlsFiles};

    fn ca_params(name: &str, constraint: BasicConstraints) -> CertificateParams {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(constraint);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params
    }

    /// An intermediate issuer: its certificate follows each issued one, and the chain verifies
    /// against the root alone (what `tls.client_ca` holds).
    #[test]
    fn an_intermediate_issuer_sends_its_certificate_and_the_chain_verifies_to_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let root_key = KeyPair::generate().unwrap();
        let root_params = ca_params("root", BasicConstraints::Unconstrained);
        let root = root_params.self_signed(&root_key).unwrap();
        let root_issuer = Issuer::new(root_params, root_key);
        let mid_key = KeyPair::generate().unwrap();
        let mid = ca_params("intermediate", BasicConstraints::Constrained(0))
            .signed_by(&mid_key, &root_issuer)
            .unwrap();
        let server =
            tether_common::pki::Ca::from_pem(&root.pem(), &root_issuer.key().serialize_pem())
                .unwrap()
                .issue_server(&["localhost".into()], &[], &IssueOptions::default())
                .unwrap();
        for (name, text) in [
            ("root.pem", root.pem()),
            ("mid.pem", mid.pem()),
            ("mid-key.pem", mid_key.serialize_pem()),
            ("server.pem", server.cert_pem.clone()),
            ("server-key.pem", server.key_pem.clone()),
        ] {
            std::fs::write(d.join(name), text).unwrap();
        }
        let config = EnrollmentConfig {
            issuer_cert: d.join("mid.pem"),
            issuer_key: d.join("mid-key.pem"),
            tokens_file: d.join("tokens"),
            cert_valid_for: "1h".into(),
        };
        let metrics = EnrollmentMetrics::register(&Registry::new()).unwrap();
        let allowed = Arc::new(ArcSwap::from_pointee(HashSet::new()));
        let enrollment = Enrollment::new(&config, d.join("root.pem"), allowed, metrics).unwrap();
        let request = csr::new_key_and_csr().unwrap();
        let issued = enrollment.issue("edge-3", &request.csr_pem).unwrap();
        let chain = tls::certs_from_pem(&issued.certificate).unwrap();
        assert_eq!(chain.len(), 2, "leaf and intermediate");
        let server = tls::server_tls(
            &ServerTlsFiles {
                cert: d.join("server.pem"),
                key: d.join("server-key.pem"),
                client_ca: d.join("root.pem"),
                crls: Vec::new(),
            },
            ClientCertPolicy::Required,
        )
        .unwrap();
        tether_common::tls_check::reverify(server.verifier.as_ref(), &chain).unwrap();
        // Logged for `certs revoke --agent`.
        let serials = crate::enroll_tokens::issued_serials(&config.tokens_file, "edge-3").unwrap();
        assert_eq!(serials.len(), 1);
        // A CSR for another id is refused as wrong_identity (403).
        let other = csr::csr_for_key(&request.key_pem, Some("edge-4")).unwrap();
        let refusal = enrollment.issue("edge-3", &other).unwrap_err();
        assert_eq!(
            (refusal.status, refusal.reason),
            (StatusCode::FORBIDDEN, "wrong_identity")
        );
        // An id no longer allowed is refused (403 not_allowed).
        enrollment
            .allowed
            .store(Arc::new(HashSet::from(["edge-9".to_owned()])));
        let refusal = enrollment.issue("edge-3", &request.csr_pem).unwrap_err();
        assert_eq!(refusal.reason, "not_allowed");
    }
}
