//! One HTTP/1.1 request over TLS to the server's enrollment routes (`/v1/enroll/ca`,
//! `/v1/enroll`, `/v1/renew`): `Connection: close`, the whole exchange under one deadline, the
//! response bounded in size.

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::config::{AgentConfig, ServerUrl};

/// Largest response accepted (a certificate chain or a CA bundle).
const MAX_RESPONSE: u64 = 1024 * 1024;

/// Where the enrollment routes are: the first server URL's host and port, and the TLS name.
#[derive(Debug, Clone)]
pub(crate) struct EnrollTarget {
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) server_name: ServerName<'static>,
    pub(crate) timeout: Duration,
}

impl EnrollTarget {
    /// The target of `config` (its first server URL; replicas share the token store).
    pub(crate) fn of(config: &AgentConfig) -> Result<EnrollTarget, String> {
        let url = config
            .urls()
            .into_iter()
            .next()
            .ok_or_else(|| "no server URL".to_owned())?;
        let server = ServerUrl::parse(&url)?;
        let server_name = server.tls_name(&config.server_name)?;
        Ok(EnrollTarget {
            host: server.host,
            port: server.port,
            server_name,
            timeout: config.connect_timeout.0.max(Duration::from_secs(10)),
        })
    }

    fn host_header(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// Why an exchange failed before a response arrived.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HttpError {
    /// TCP connect failed.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    /// The TLS handshake failed or the server refused the certificate (an alert).
    #[error("TLS with {addr}: {reason}")]
    Tls { addr: String, reason: String },
    /// Reading or writing failed, or the response is not HTTP.
    #[error("{0}")]
    Protocol(String),
    /// The deadline passed.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

impl HttpError {
    /// A refusal by the server at the TLS layer (revoked, unknown or expired certificate):
    /// retrying does not help.
    pub(crate) fn is_tls_refusal(&self) -> bool {
        matches!(self, Self::Tls { reason, .. } if reason.contains("alert") || reason.contains("certificate"))
    }
}

/// A response: status and body text.
#[derive(Debug)]
pub(crate) struct Reply {
    pub(crate) status: u16,
    pub(crate) body: String,
}

/// Sends one request (`body` as JSON when given) and reads the whole response.
pub(crate) async fn exchange(
    target: &EnrollTarget,
    tls: Arc<rustls::ClientConfig>,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
) -> Result<Reply, HttpError> {
    tokio::time::timeout(
        target.timeout,
        exchange_inner(target, tls, method, path, body),
    )
    .await
    .map_err(|_| HttpError::Timeout(target.timeout))?
}

async fn exchange_inner(
    target: &EnrollTarget,
    tls: Arc<rustls::ClientConfig>,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
) -> Result<Reply, HttpError> {
    let addr = target.host_header();
    let tcp = TcpStream::connect((target.host.as_str(), target.port))
        .await
        .map_err(|source| HttpError::Connect {
            addr: addr.clone(),
            source,
        })?;
    let _ = tcp.set_nodelay(true);
    let tls_error = |err: std::io::Error| HttpError::Tls {
        addr: addr.clone(),
        reason: tls_reason(&err),
    };
    let mut stream = TlsConnector::from(tls)
        .connect(target.server_name.clone(), tcp)
        .await
        .map_err(tls_error)?;
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nUser-Agent: tether-agent/{}\r\n",
        target.host_header(),
        env!("CARGO_PKG_VERSION")
    );
    if let Some(body) = body {
        request.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    request.push_str("\r\n");
    let mut bytes = request.into_bytes();
    bytes.extend_from_slice(body.unwrap_or_default());
    stream.write_all(&bytes).await.map_err(tls_error)?;
    stream.flush().await.map_err(tls_error)?;
    let mut raw = Vec::new();
    // TLS 1.3: a server that refuses the client certificate says so here, with an alert.
    let read = (&mut stream).take(MAX_RESPONSE).read_to_end(&mut raw).await;
    if let Err(err) = read {
        // A server that closes without close_notify after a full response is fine.
        if raw.is_empty() || err.kind() != std::io::ErrorKind::UnexpectedEof {
            return Err(tls_error(err));
        }
    }
    parse_response(&raw)
}

/// The reason inside a TLS I/O error: the alert the server sent, or rustls' error.
fn tls_reason(err: &std::io::Error) -> String {
    match err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    {
        Some(rustls::Error::AlertReceived(alert)) => {
            format!("the server refused our certificate (TLS alert: {alert:?})")
        }
        Some(other) => other.to_string(),
        None => err.to_string(),
    }
}

/// Parses a complete HTTP/1.1 response (Content-Length, chunked, or until close).
fn parse_response(raw: &[u8]) -> Result<Reply, HttpError> {
    let bad = |what: &str| HttpError::Protocol(format!("the server's answer is not HTTP: {what}"));
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no end of headers"))?;
    let head = std::str::from_utf8(&raw[..split]).map_err(|_| bad("headers not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| bad("no status line"))?;
    let mut chunked = false;
    let mut length = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
        if name == "transfer-encoding" && value.eq_ignore_ascii_case("chunked") {
            chunked = true;
        } else if name == "content-length" {
            length = value.parse::<usize>().ok();
        }
    }
    let rest = &raw[split + 4..];
    let body = if chunked {
        dechunk(rest).ok_or_else(|| bad("broken chunked body"))?
    } else {
        match length {
            Some(n) if n <= rest.len() => rest[..n].to_vec(),
            Some(_) => return Err(bad("body shorter than Content-Length")),
            None => rest.to_vec(),
        }
    };
    Ok(Reply {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn dechunk(mut rest: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let end = rest.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&rest[..end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        rest = &rest[end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(rest.get(..size)?);
        rest = rest.get(size + 2..)?;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn responses_parse_with_length_chunks_or_until_close() {
        let r =
            parse_response(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 5\r\n\r\nnope\nX").unwrap();
        assert_eq!((r.status, r.body.as_str()), (403, "nope\n"));
        let r = parse_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "abcde"));
        let r = parse_response(b"HTTP/1.1 200 OK\r\n\r\nall of it").unwrap();
        assert_eq!(r.body, "all of it");
        assert!(parse_response(b"garbage").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 50\r\n\r\nshort").is_err());
    }
}
