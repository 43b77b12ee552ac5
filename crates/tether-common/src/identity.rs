//! Agent identity: extracting and validating the agent id carried by a client certificate.
//!
//! The default identity is the certificate's URI SAN `tether://agent/<id>` (DESIGN.md §5).
//! Everything here looks at bytes a peer controls, so nothing panics and every refusal has a
//! distinct [`IdentityError`] variant with a bounded metric label ([`IdentityError::reason`]).

use serde::{Deserialize, Serialize};
use x509_parser::extensions::GeneralName;

/// Prefix of the URI SAN that names an agent: `tether://agent/<id>`.
pub const AGENT_URI_PREFIX: &str = "tether://agent/";

/// Prefix of the URI SAN that names a server replica's peer certificate:
/// `tether://server/<server_id>`. Such a certificate never passes as an agent.
pub const SERVER_URI_PREFIX: &str = "tether://server/";

/// Maximum length of an agent id, in bytes (ids are ASCII).
pub const MAX_AGENT_ID_LEN: usize = 128;

/// Longest peer-supplied string we copy into an error (and so into a log line).
const MAX_ECHOED_LEN: usize = 200;

/// Where the agent id is read from in a client certificate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdentityMode {
    /// Exactly one URI SAN of the form `tether://agent/<id>` (the default).
    #[default]
    UriSan,
    /// The first DNS SAN of the certificate is the id.
    DnsSan,
}

/// Why a certificate does not yield a usable agent id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// The peer presented no certificate at all.
    #[error("the peer presented no client certificate")]
    NoPeerCertificate,
    /// The certificate could not be parsed as X.509.
    #[error("the client certificate could not be parsed: {0}")]
    BadCertificate(String),
    /// The certificate has no URI SAN.
    #[error("the client certificate has no URI SAN (expected `{AGENT_URI_PREFIX}<id>`)")]
    MissingUriSan,
    /// The certificate has URI SANs, but none starts with `tether://agent/`.
    #[error("the client certificate's URI SAN `{uri}` does not start with `{AGENT_URI_PREFIX}`")]
    WrongPrefix {
        /// The first URI SAN found (truncated).
        uri: String,
    },
    /// The certificate carries more than one `tether://agent/` URI SAN.
    #[error(
        "the client certificate has {count} `{AGENT_URI_PREFIX}` URI SANs; exactly one is required"
    )]
    Ambiguous {
        /// How many agent URIs were found.
        count: usize,
    },
    /// The certificate has no DNS SAN (in [`IdentityMode::DnsSan`]).
    #[error("the client certificate has no DNS SAN")]
    MissingDnsSan,
    /// The id is empty, too long or uses characters outside `[A-Za-z0-9._-]`.
    #[error("invalid agent id `{id}`: {problem}")]
    InvalidId {
        /// The offending id (truncated).
        id: String,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// The certificate names a server replica (`tether://server/<id>`), not an agent.
    #[error("the certificate is a server peer certificate (`{uri}`), not an agent's")]
    ServerPeer {
        /// Its `tether://server/` URI SAN (truncated).
        uri: String,
    },
    /// A peer certificate without exactly one valid `tether://server/<id>` URI SAN.
    #[error("not a server peer certificate: {0}")]
    NotServerPeer(String),
}

impl IdentityError {
    /// A short, closed-set label for metrics (`tether_auth_failures_total{reason}`, ...).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NoPeerCertificate => "no_peer_certificate",
            Self::BadCertificate(_) => "bad_certificate",
            Self::MissingUriSan => "missing_uri_san",
            Self::WrongPrefix { .. } => "wrong_prefix",
            Self::Ambiguous { .. } => "ambiguous",
            Self::MissingDnsSan => "missing_dns_san",
            Self::InvalidId { .. } => "invalid_id",
            Self::ServerPeer { .. } => "server_peer",
            Self::NotServerPeer(_) => "not_server_peer",
        }
    }
}

/// Checks that `id` is 1..=128 characters of `[A-Za-z0-9._-]`.
///
/// The restriction keeps ids safe as file names (`agent-<id>.pem`), metric label values and
/// URI path segments.
pub fn validate_agent_id(id: &str) -> Result<(), IdentityError> {
    let problem = if id.is_empty() {
        Some("it is empty")
    } else if id.len() > MAX_AGENT_ID_LEN {
        Some("it is longer than 128 characters")
    } else if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        Some("only the characters A-Z a-z 0-9 . _ - are allowed")
    } else if id == "." || id == ".." {
        // Would make `agent-<id>.pem` fine but a path segment of `tether://agent/..` is a trap.
        Some("`.` and `..` are reserved")
    } else {
        None
    };
    match problem {
        None => Ok(()),
        Some(problem) => Err(IdentityError::InvalidId {
            id: truncate(id),
            problem,
        }),
    }
}

/// Extracts the agent id from a DER-encoded certificate according to `mode`.
pub fn agent_id_from_cert(cert_der: &[u8], mode: IdentityMode) -> Result<String, IdentityError> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
    let sans = cert
        .subject_alternative_name()
        .map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
    let names: &[GeneralName<'_>] = match &sans {
        Some(ext) => &ext.value.general_names,
        None => &[],
    };
    // Whatever the mode, a replica's peer certificate never registers as an agent.
    if let Some(uri) = names.iter().find_map(|n| match n {
        GeneralName::URI(uri) if uri.starts_with(SERVER_URI_PREFIX) => Some(*uri),
        _ => None,
    }) {
        return Err(IdentityError::ServerPeer { uri: truncate(uri) });
    }
    match mode {
        IdentityMode::UriSan => id_from_uri_sans(names),
        IdentityMode::DnsSan => id_from_dns_sans(names),
    }
}

/// Extracts the server id of a replica's peer certificate: exactly one URI SAN
/// `tether://server/<id>` with a valid server id, and no agent URI SAN.
pub fn server_id_from_peer_cert(cert_der: &[u8]) -> Result<String, IdentityError> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
    let sans = cert
        .subject_alternative_name()
        .map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
    let names: &[GeneralName<'_>] = match &sans {
        Some(ext) => &ext.value.general_names,
        None => &[],
    };
    let uris: Vec<&str> = names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        })
        .collect();
    if uris.iter().any(|u| u.starts_with(AGENT_URI_PREFIX)) {
        return Err(IdentityError::NotServerPeer(
            "it carries an agent identity".to_owned(),
        ));
    }
    let ids: Vec<&str> = uris
        .iter()
        .filter_map(|u| u.strip_prefix(SERVER_URI_PREFIX))
        .collect();
    match ids.as_slice() {
        [id] => crate::host::validate_server_id(id)
            .map(|()| (*id).to_owned())
            .map_err(|problem| {
                IdentityError::NotServerPeer(format!("server id `{}` {problem}", truncate(id)))
            }),
        [] => Err(IdentityError::NotServerPeer(format!(
            "no `{SERVER_URI_PREFIX}<id>` URI SAN"
        ))),
        several => Err(IdentityError::NotServerPeer(format!(
            "{} `{SERVER_URI_PREFIX}` URI SANs; exactly one is required",
            several.len()
        ))),
    }
}

fn id_from_uri_sans(names: &[GeneralName<'_>]) -> Result<String, IdentityError> {
    let uris: Vec<&str> = names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        })
        .collect();
    let Some(first_uri) = uris.first() else {
        return Err(IdentityError::MissingUriSan);
    };
    let ids: Vec<&str> = uris
        .iter()
        .filter_map(|uri| uri.strip_prefix(AGENT_URI_PREFIX))
        .collect();
    match ids.as_slice() {
        [] => Err(IdentityError::WrongPrefix {
            uri: truncate(first_uri),
        }),
        [id] => {
            validate_agent_id(id)?;
            Ok((*id).to_owned())
        }
        several => Err(IdentityError::Ambiguous {
            count: several.len(),
        }),
    }
}

fn id_from_dns_sans(names: &[GeneralName<'_>]) -> Result<String, IdentityError> {
    let first = names.iter().find_map(|n| match n {
        GeneralName::DNSName(name) => Some(*name),
        _ => None,
    });
    let id = first.ok_or(IdentityError::MissingDnsSan)?;
    validate_agent_id(id)?;
    Ok(id.to_owned())
}

/// Bounds a peer-controlled string before it goes into an error message.
fn truncate(s: &str) -> String {
    if s.len() <= MAX_ECHOED_LEN {
        return s.to_owned();
    }
    let mut end = MAX_ECHOED_LEN;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair, SanType};

    fn cert_with_sans(sans: Vec<SanType>) -> Vec<u8> {
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        let key = KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(s.try_into().unwrap())
    }

    fn dns(s: &str) -> SanType {
        SanType::DnsName(s.try_into().unwrap())
    }

    #[test]
    fn a_server_peer_certificate_is_never_an_agent_and_only_it_is_a_peer() {
        let peer = cert_with_sans(vec![uri("tether://server/replica-2"), dns("edge-1")]);
        for mode in [IdentityMode::UriSan, IdentityMode::DnsSan] {
            assert_eq!(
                agent_id_from_cert(&peer, mode),
                Err(IdentityError::ServerPeer {
                    uri: "tether://server/replica-2".into()
                })
            );
        }
        assert_eq!(server_id_from_peer_cert(&peer).as_deref(), Ok("replica-2"));
        let agent = cert_with_sans(vec![uri("tether://agent/edge-1")]);
        assert!(matches!(
            server_id_from_peer_cert(&agent),
            Err(IdentityError::NotServerPeer(_))
        ));
        let both = cert_with_sans(vec![uri("tether://server/r"), uri("tether://agent/a")]);
        assert!(matches!(
            server_id_from_peer_cert(&both),
            Err(IdentityError::NotServerPeer(_))
        ));
        let two = cert_with_sans(vec![uri("tether://server/r"), uri("tether://server/s")]);
        assert!(matches!(
            server_id_from_peer_cert(&two),
            Err(IdentityError::NotServerPeer(_))
        ));
        let bad_id = cert_with_sans(vec![uri("tether://server/a%20b")]);
        assert!(matches!(
            server_id_from_peer_cert(&bad_id),
            Err(IdentityError::NotServerPeer(_))
        ));
    }

    #[test]
    fn valid_ids() {
        for id in ["a", "edge-1", "site_7.rack-3", &"x".repeat(128)] {
            assert_eq!(validate_agent_id(id), Ok(()), "{id}");
        }
    }

    #[test]
    fn invalid_ids() {
        for id in [
            "",
            &"x".repeat(129),
            "a b",
            "a/b",
            "é",
            "a:b",
            ".",
            "..",
            "a\n",
        ] {
            let err = validate_agent_id(id).unwrap_err();
            assert_eq!(err.reason(), "invalid_id", "{id:?}");
        }
        let msg = validate_agent_id("a/b").unwrap_err().to_string();
        assert!(
            msg.contains("`a/b`") && msg.contains("A-Z a-z 0-9 . _ -"),
            "{msg}"
        );
    }

    #[test]
    fn uri_san_yields_id() {
        let der = cert_with_sans(vec![uri("tether://agent/edge-1"), dns("example.com")]);
        assert_eq!(
            agent_id_from_cert(&der, IdentityMode::UriSan).unwrap(),
            "edge-1"
        );
    }

    #[test]
    fn other_uris_beside_the_agent_uri_are_ignored() {
        let der = cert_with_sans(vec![
            uri("spiffe://cluster/ns/x"),
            uri("tether://agent/edge-2"),
        ]);
        assert_eq!(
            agent_id_from_cert(&der, IdentityMode::UriSan).unwrap(),
            "edge-2"
        );
    }

    #[test]
    fn missing_uri_san() {
        let der = cert_with_sans(vec![dns("edge-1")]);
        let err = agent_id_from_cert(&der, IdentityMode::UriSan).unwrap_err();
        assert_eq!(err, IdentityError::MissingUriSan);
        assert_eq!(err.reason(), "missing_uri_san");
        let der = cert_with_sans(vec![]);
        assert_eq!(
            agent_id_from_cert(&der, IdentityMode::UriSan).unwrap_err(),
            IdentityError::MissingUriSan
        );
    }

    #[test]
    fn wrong_prefix() {
        let der = cert_with_sans(vec![uri("https://agent/edge-1")]);
        let err = agent_id_from_cert(&der, IdentityMode::UriSan).unwrap_err();
        assert_eq!(
            err,
            IdentityError::WrongPrefix {
                uri: "https://agent/edge-1".into()
            }
        );
        assert_eq!(err.reason(), "wrong_prefix");
    }

    #[test]
    fn ambiguous() {
        let der = cert_with_sans(vec![uri("tether://agent/a"), uri("tether://agent/b")]);
        let err = agent_id_from_cert(&der, IdentityMode::UriSan).unwrap_err();
        assert_eq!(err, IdentityError::Ambiguous { count: 2 });
        assert_eq!(err.reason(), "ambiguous");
    }

    #[test]
    fn invalid_id_in_uri() {
        let der = cert_with_sans(vec![uri("tether://agent/a/b")]);
        let err = agent_id_from_cert(&der, IdentityMode::UriSan).unwrap_err();
        assert_eq!(err.reason(), "invalid_id");
        let der = cert_with_sans(vec![uri("tether://agent/")]);
        let err = agent_id_from_cert(&der, IdentityMode::UriSan).unwrap_err();
        assert_eq!(err.reason(), "invalid_id");
    }

    #[test]
    fn dns_san_mode() {
        let der = cert_with_sans(vec![
            uri("tether://agent/ignored"),
            dns("edge-3.example.com"),
            dns("second.example.com"),
        ]);
        assert_eq!(
            agent_id_from_cert(&der, IdentityMode::DnsSan).unwrap(),
            "edge-3.example.com"
        );
        let der = cert_with_sans(vec![uri("tether://agent/x")]);
        let err = agent_id_from_cert(&der, IdentityMode::DnsSan).unwrap_err();
        assert_eq!(err, IdentityError::MissingDnsSan);
        let der = cert_with_sans(vec![dns("*.example.com")]);
        let err = agent_id_from_cert(&der, IdentityMode::DnsSan).unwrap_err();
        assert_eq!(err.reason(), "invalid_id");
    }

    #[test]
    fn garbage_is_a_bad_certificate() {
        let err = agent_id_from_cert(b"not a certificate", IdentityMode::UriSan).unwrap_err();
        assert_eq!(err.reason(), "bad_certificate");
        assert_eq!(
            agent_id_from_cert(&[], IdentityMode::DnsSan)
                .unwrap_err()
                .reason(),
            "bad_certificate"
        );
    }

    #[test]
    fn long_peer_strings_are_truncated_in_errors() {
        let long = format!("https://{}", "x".repeat(1000));
        let der = cert_with_sans(vec![uri(&long)]);
        let err = agent_id_from_cert(&der, IdentityMode::UriSan).unwrap_err();
        assert!(err.to_string().len() < 400, "{err}");
    }

    #[test]
    fn mode_parses_from_yaml() {
        let m: IdentityMode = serde_yaml_ng::from_str("dns_san").unwrap();
        assert_eq!(m, IdentityMode::DnsSan);
        let m: IdentityMode = serde_yaml_ng::from_str("uri_san").unwrap();
        assert_eq!(m, IdentityMode::UriSan);
        assert_eq!(IdentityMode::default(), IdentityMode::UriSan);
    }
}
