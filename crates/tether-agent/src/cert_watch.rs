//! The agent certificate's lifetime: a warning logged once when less than a tenth of its
//! lifetime is left, an error logged once when it has expired, and the reason `/readyz` gives
//! then. Set at start-up and by every reload of the TLS material; checked by a periodic task.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::CertificateDer;
use tether_common::tls_check::{cert_validity, rfc3339};
use tokio_util::sync::CancellationToken;
use tracing::{error, warn};

/// How often the running agent looks at its certificate's lifetime.
const CHECK_EVERY: Duration = Duration::from_secs(60);

/// The loaded certificate's validity and what was logged about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Lifetime {
    not_before: i64,
    not_after: i64,
    warned: bool,
    expired_logged: bool,
}

/// The agent certificate's lifetime, shared by the agent, its reloader and its admin routes.
#[derive(Debug, Default)]
pub struct CertWatch {
    state: Mutex<Option<Lifetime>>,
}

fn now() -> i64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(since.as_secs()).unwrap_or(i64::MAX)
}

impl CertWatch {
    /// A watch with no certificate yet.
    pub fn new() -> Arc<CertWatch> {
        Arc::new(CertWatch::default())
    }

    fn lock(&self) -> MutexGuard<'_, Option<Lifetime>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes the certificate `chain` (end entity first) as the one in use, then checks it.
    pub fn set(&self, chain: &[CertificateDer<'_>]) {
        let parsed = chain.first().and_then(|der| cert_validity(der).ok());
        {
            let mut state = self.lock();
            *state = parsed.map(|(not_before, not_after)| Lifetime {
                not_before,
                not_after,
                warned: false,
                expired_logged: false,
            });
        }
        self.check();
    }

    /// Logs once a certificate within 10 % of its lifetime of expiry, and once an expired one.
    pub fn check(&self) {
        self.check_at(now());
    }

    fn check_at(&self, now: i64) {
        let mut state = self.lock();
        let Some(life) = state.as_mut() else {
            return;
        };
        let total = (life.not_after - life.not_before).max(1);
        let left = life.not_after - now;
        if left <= 0 {
            if !life.expired_logged {
                life.expired_logged = true;
                error!(
                    not_after = life.not_after,
                    "the agent certificate has expired; the server will refuse new sessions"
                );
            }
        } else if left * 10 <= total && !life.warned {
            life.warned = true;
            warn!(
                not_after = life.not_after,
                seconds_left = left,
                "the agent certificate is within 10 % of its lifetime of expiry; renew it"
            );
        }
    }

    /// Why `/readyz` refuses: the certificate in use has expired.
    pub fn expired_reason(&self) -> Option<String> {
        let life = (*self.lock())?;
        (life.not_after <= now()).then(|| {
            format!(
                "the agent certificate expired at {}",
                rfc3339(life.not_after)
            )
        })
    }

    /// Whether the once-only warning was logged (tests).
    pub fn warned(&self) -> bool {
        self.lock().is_some_and(|l| l.warned)
    }

    /// Checks every minute until `stop`.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(CHECK_EVERY) => self.check(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use tether_common::pki::{Ca, IssueOptions};
    use tether_common::tls::certs_from_pem;

    fn chain(opts: &IssueOptions) -> Vec<CertificateDer<'static>> {
        let ca = Ca::generate("test CA").unwrap();
        certs_from_pem(&ca.issue_agent("edge-1", opts).unwrap().cert_pem).unwrap()
    }

    #[test]
    fn warns_once_inside_the_last_tenth_and_readyz_says_when_expired() {
        let now = SystemTime::now();
        // 100 hours of lifetime, 20 left: not yet.
        let opts = IssueOptions {
            not_before: now - Duration::from_secs(80 * 3600),
            not_after: now + Duration::from_secs(20 * 3600),
            ..IssueOptions::default()
        };
        let watch = CertWatch::new();
        watch.set(&chain(&opts));
        assert!(!watch.warned());
        assert_eq!(watch.expired_reason(), None);
        // Eleven hours later, 9 of 100 are left: warned, and only once.
        let later = now_secs() + 11 * 3600;
        watch.check_at(later);
        assert!(watch.warned());
        watch.check_at(later + 60);
        assert!(watch.warned());
        // A new certificate resets the warning.
        watch.set(&chain(&IssueOptions::default()));
        assert!(!watch.warned());
        // An expired certificate makes /readyz say so.
        watch.set(&chain(&IssueOptions::expired()));
        assert!(
            watch
                .expired_reason()
                .unwrap()
                .starts_with("the agent certificate expired at ")
        );
    }

    fn now_secs() -> i64 {
        super::now()
    }
}
