//! One session per server replica: the endpoint whose session first announced a server id
//! holds it; another endpoint reaching the same replica (a second address, a load balancer)
//! closes its session and waits until the holder lets go.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::sync::watch;

use crate::connector::Endpoint;

/// Which endpoint holds the session to each server id. Bounded by the endpoints (one claim
/// each).
#[derive(Debug)]
pub(crate) struct ReplicaClaims {
    held: Mutex<HashMap<String, Endpoint>>,
    /// Bumped on every release, so waiters re-check.
    released: watch::Sender<u64>,
}

impl Default for ReplicaClaims {
    fn default() -> Self {
        Self {
            held: Mutex::new(HashMap::new()),
            released: watch::channel(0).0,
        }
    }
}

impl ReplicaClaims {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Endpoint>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Claims `server_id` for `endpoint`; `Err(holder)` when another endpoint holds it.
    pub(crate) fn claim(&self, server_id: &str, endpoint: &Endpoint) -> Result<(), Endpoint> {
        let mut held = self.lock();
        match held.get(server_id) {
            Some(holder) if holder != endpoint => Err(holder.clone()),
            _ => {
                held.insert(server_id.to_owned(), endpoint.clone());
                Ok(())
            }
        }
    }

    /// Releases `server_id` if `endpoint` holds it.
    pub(crate) fn release(&self, server_id: &str, endpoint: &Endpoint) {
        let removed = {
            let mut held = self.lock();
            if held.get(server_id) == Some(endpoint) {
                held.remove(server_id);
                true
            } else {
                false
            }
        };
        if removed {
            self.released.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// Resolves once no endpoint other than `endpoint` holds `server_id`.
    pub(crate) async fn wait_released(&self, server_id: &str, endpoint: &Endpoint) {
        let mut released = self.released.subscribe();
        loop {
            {
                let held = self.lock();
                if held.get(server_id).is_none_or(|holder| holder == endpoint) {
                    return;
                }
            }
            if released.changed().await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(addr: &str) -> Endpoint {
        Endpoint {
            url: "wss://x:1/v1/connect".into(),
            addr: Some(addr.parse().unwrap()),
        }
    }

    #[tokio::test]
    async fn the_first_endpoint_holds_until_it_releases() {
        let claims = ReplicaClaims::default();
        let (a, b) = (ep("127.0.0.1:1"), ep("127.0.0.2:1"));
        assert_eq!(claims.claim("r1", &a), Ok(()));
        assert_eq!(claims.claim("r1", &a), Ok(()), "re-claiming is fine");
        assert_eq!(claims.claim("r1", &b), Err(a.clone()));
        assert_eq!(claims.claim("r2", &b), Ok(()));
        // b's release of r1 (which it does not hold) changes nothing.
        claims.release("r1", &b);
        assert_eq!(claims.claim("r1", &b), Err(a.clone()));
        let waiter = claims.wait_released("r1", &b);
        tokio::pin!(waiter);
        assert!(futures::poll!(waiter.as_mut()).is_pending(), "held by a");
        claims.release("r1", &a);
        waiter.await;
        assert_eq!(claims.claim("r1", &b), Ok(()));
    }
}
