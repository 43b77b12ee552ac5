//! How the remotedialer route authenticates beyond the client certificate, read from the
//! `remotedialer:` section: the tunnel-id header, the shared token (compared in constant
//! time) and whether certless clients are admitted.

use http::HeaderName;
use tether_common::config_error::FieldError;

use crate::config::RemotedialerConfig;

/// How remotedialer requests are authenticated beyond the client certificate.
#[derive(Debug)]
pub(crate) struct RdAuth {
    /// Header that, when present, must equal the certificate identity.
    pub(crate) tunnel_id_header: Option<HeaderName>,
    pub(crate) require_tunnel_id: bool,
    /// Header and expected value of the shared token.
    pub(crate) token: Option<(HeaderName, Vec<u8>)>,
    /// Clients without a certificate get in with the token, named by `tunnel_id_header`.
    pub(crate) allow_without_client_cert: bool,
}

/// The route's path and checks from the `remotedialer:` section (reads the token file);
/// `None` when the section is disabled.
pub(crate) fn auth_from_config(
    config: &RemotedialerConfig,
) -> Result<Option<(String, RdAuth)>, FieldError> {
    if !config.enabled {
        return Ok(None);
    }
    let header = |key: &str, value: &str| {
        HeaderName::from_bytes(value.as_bytes())
            .map_err(|_| FieldError::new(key, format!("`{value}` is not a valid HTTP header name")))
    };
    let tunnel_id_header = if config.tunnel_id_header.is_empty() {
        None
    } else {
        Some(header(
            "remotedialer.tunnel_id_header",
            &config.tunnel_id_header,
        )?)
    };
    let token = match &config.token_file {
        None => None,
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|err| {
                FieldError::new(
                    "remotedialer.token_file",
                    format!("cannot read {}: {err}", path.display()),
                )
            })?;
            let token = text.trim();
            if token.is_empty() {
                return Err(FieldError::new(
                    "remotedialer.token_file",
                    format!("{} holds no token", path.display()),
                ));
            }
            Some((
                header("remotedialer.token_header", &config.token_header)?,
                token.as_bytes().to_vec(),
            ))
        }
    };
    Ok(Some((
        config.path.clone(),
        RdAuth {
            tunnel_id_header,
            require_tunnel_id: config.require_tunnel_id,
            token,
            allow_without_client_cert: config.allow_without_client_cert,
        },
    )))
}

/// Equal lengths and bytes, in time that depends on the lengths only.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn token_compare() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
    }
}
