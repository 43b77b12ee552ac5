//! `ConsumerTable`: who may use the proxy frontends and which clients each may reach. Tokens
//! are checked against SHA-256 hashes in constant time; anonymous use is loopback-only.

use std::fmt;
use std::net::IpAddr;

use aws_lc_rs::constant_time::verify_slices_are_equal;
use aws_lc_rs::digest::{SHA256, digest};

use crate::config::FrontendsConfig;

/// The name anonymous consumers have in logs.
pub(crate) const ANONYMOUS: &str = "anonymous";

/// What a consumer presented: the client id it wants and, maybe, a token.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Credentials {
    /// The agent id to reach (the proxy user name).
    pub(crate) client: String,
    /// The token (the proxy password); empty means none.
    pub(crate) token: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("client", &self.client)
            .field("token", &"***")
            .finish()
    }
}

/// Why a consumer was refused; the labels are the `reason` of
/// `tether_frontend_refusals_total` (with the protocol-level reasons of [`Refusal`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum AuthError {
    /// No token was given and anonymous use is not allowed for this peer.
    #[error("credentials required (user = client id, password = token)")]
    MissingCredentials,
    /// The token matches no consumer.
    #[error("the token matches no consumer")]
    BadCredentials,
    /// The consumer may not reach this client.
    #[error("consumer \"{consumer}\" may not reach client \"{client}\"")]
    Forbidden {
        /// The consumer's name.
        consumer: String,
        /// The client id it asked for.
        client: String,
    },
}

impl AuthError {
    pub(crate) fn label(&self) -> &'static str {
        match self {
            AuthError::MissingCredentials => "missing_credentials",
            AuthError::BadCredentials => "bad_credentials",
            AuthError::Forbidden { .. } => "forbidden",
        }
    }
}

struct Consumer {
    name: String,
    token_sha256: [u8; 32],
    clients: Vec<String>,
}

impl fmt::Debug for Consumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Consumer")
            .field("name", &self.name)
            .field("token_sha256", &"***")
            .field("clients", &self.clients)
            .finish()
    }
}

/// The consumers of the frontends, built from `frontends:`; swapped whole on reload.
#[derive(Debug, Default)]
pub(crate) struct ConsumerTable {
    consumers: Vec<Consumer>,
    anonymous_clients: Vec<String>,
}

impl ConsumerTable {
    /// The table of a validated config (a hash that does not parse is skipped: validation
    /// has already refused it).
    pub(crate) fn from_config(config: &FrontendsConfig) -> Self {
        let consumers = config
            .consumers
            .iter()
            .filter_map(|c| {
                Some(Consumer {
                    name: c.name.clone(),
                    token_sha256: c.token_sha256.bytes().ok()?,
                    clients: c.clients.clone(),
                })
            })
            .collect();
        Self {
            consumers,
            anonymous_clients: config.anonymous_clients.clone(),
        }
    }

    /// The consumer's name if it may reach `credentials.client` from `peer`.
    pub(crate) fn authorize(
        &self,
        credentials: Option<&Credentials>,
        peer: IpAddr,
    ) -> Result<String, AuthError> {
        let Some(credentials) = credentials.filter(|c| !c.token.is_empty()) else {
            let client = credentials.map_or("", |c| c.client.as_str());
            return if peer.is_loopback() && !self.anonymous_clients.is_empty() {
                if self.anonymous_clients.iter().any(|p| matches(p, client)) {
                    Ok(ANONYMOUS.to_owned())
                } else {
                    Err(AuthError::Forbidden {
                        consumer: ANONYMOUS.to_owned(),
                        client: client.to_owned(),
                    })
                }
            } else {
                Err(AuthError::MissingCredentials)
            };
        };
        let presented = digest(&SHA256, credentials.token.as_bytes());
        // Every consumer is compared, so the time taken does not say which one matched.
        let mut found = None;
        for consumer in &self.consumers {
            if verify_slices_are_equal(presented.as_ref(), &consumer.token_sha256).is_ok() {
                found = Some(consumer);
            }
        }
        let consumer = found.ok_or(AuthError::BadCredentials)?;
        if consumer
            .clients
            .iter()
            .any(|p| matches(p, &credentials.client))
        {
            Ok(consumer.name.clone())
        } else {
            Err(AuthError::Forbidden {
                consumer: consumer.name.clone(),
                client: credentials.client.clone(),
            })
        }
    }
}

/// Whether `client` matches `pattern`, where `*` stands for any run of characters.
pub(crate) fn matches(pattern: &str, client: &str) -> bool {
    if client.is_empty() {
        return false;
    }
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = client.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        // No `*`: the whole id must match.
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::net::Ipv4Addr;

    use super::*;
    use crate::config::{ConsumerConfig, TokenHash};

    fn hash(token: &str) -> TokenHash {
        TokenHash::of(token)
    }

    fn creds(client: &str, token: &str) -> Credentials {
        Credentials {
            client: client.into(),
            token: token.into(),
        }
    }

    const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
    const REMOTE: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7));

    fn table(anonymous: &[&str]) -> ConsumerTable {
        ConsumerTable::from_config(&FrontendsConfig {
            consumers: vec![
                ConsumerConfig {
                    name: "ops".into(),
                    token_sha256: hash("s3cret"),
                    clients: vec!["edge-1".into()],
                },
                ConsumerConfig {
                    name: "fleet".into(),
                    token_sha256: hash("fleet-token"),
                    clients: vec!["edge-*".into(), "core".into()],
                },
            ],
            anonymous_clients: anonymous.iter().map(|s| s.to_string()).collect(),
            ..FrontendsConfig::default()
        })
    }

    #[test]
    fn patterns() {
        assert!(matches("edge-1", "edge-1"));
        assert!(!matches("edge-1", "edge-10"));
        assert!(matches("edge-*", "edge-10"));
        assert!(matches("edge-*", "edge-"));
        assert!(!matches("edge-*", "core"));
        assert!(matches("*", "anything"));
        assert!(!matches("*", ""));
        assert!(matches("*-eu-*", "db-eu-1"));
        assert!(!matches("a*a", "a"));
        assert!(matches("a*b*c", "aXbYc"));
        assert!(!matches("a*b*c", "aXcYb"));
    }

    #[test]
    fn a_token_reaches_only_its_clients() {
        let t = table(&[]);
        assert_eq!(
            t.authorize(Some(&creds("edge-1", "s3cret")), REMOTE),
            Ok("ops".into())
        );
        assert_eq!(
            t.authorize(Some(&creds("edge-2", "s3cret")), REMOTE),
            Err(AuthError::Forbidden {
                consumer: "ops".into(),
                client: "edge-2".into()
            })
        );
        assert_eq!(
            t.authorize(Some(&creds("edge-2", "fleet-token")), REMOTE),
            Ok("fleet".into())
        );
        assert_eq!(
            t.authorize(Some(&creds("edge-1", "wrong")), LOOPBACK),
            Err(AuthError::BadCredentials)
        );
    }

    #[test]
    fn anonymous_only_on_loopback_and_only_when_configured() {
        let closed = table(&[]);
        assert_eq!(
            closed.authorize(Some(&creds("edge-1", "")), LOOPBACK),
            Err(AuthError::MissingCredentials)
        );
        assert_eq!(
            closed.authorize(None, LOOPBACK),
            Err(AuthError::MissingCredentials)
        );
        let open = table(&["edge-*"]);
        assert_eq!(
            open.authorize(Some(&creds("edge-1", "")), LOOPBACK),
            Ok(ANONYMOUS.into())
        );
        assert_eq!(
            open.authorize(Some(&creds("edge-1", "")), REMOTE),
            Err(AuthError::MissingCredentials)
        );
        assert!(matches!(
            open.authorize(Some(&creds("core", "")), LOOPBACK),
            Err(AuthError::Forbidden { .. })
        ));
        assert!(matches!(
            open.authorize(None, LOOPBACK),
            Err(AuthError::Forbidden { .. })
        ));
    }

    #[test]
    fn debug_masks_the_token() {
        let text = format!("{:?}", creds("edge-1", "s3cret"));
        assert!(!text.contains("s3cret"), "{text}");
        let text = format!("{:?}", hash("s3cret"));
        assert!(!text.contains(&hash("s3cret").0), "{text}");
        let text = format!("{:?}", table(&[]));
        assert!(
            text.contains("fleet") && !text.contains("token_sha256: ["),
            "{text}"
        );
    }
}
