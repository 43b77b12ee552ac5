//! The HTTP CONNECT proxy: reads one bounded `CONNECT host:port` request head, authorizes the
//! consumer (`Proxy-Authorization: Basic client:token` or `X-Tether-Client`), dials through
//! the client's agent, answers 200 and splices, or answers the failure with a clear status.

use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use tether_common::identity::validate_agent_id;
use tether_proto::TargetAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::debug;

use crate::consumers::auth::{AuthError, Credentials};
use crate::consumers::dial::DialError;
use crate::consumers::proxy::{Admission, Frontend, record_request};
use crate::consumers::splice::splice;

/// Largest request head (request line and headers) accepted.
pub(crate) const MAX_HEAD_BYTES: usize = 8 * 1024;
/// Most header lines accepted.
const MAX_HEADERS: usize = 64;
/// How long an error answer may take to be written and the rest of the request drained.
const LINGER: Duration = Duration::from_millis(500);

/// A parsed CONNECT request.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct ConnectRequest {
    pub(crate) target: TargetAddr,
    pub(crate) credentials: Option<Credentials>,
    /// Bytes the consumer sent after the head (the start of its tunnelled stream).
    pub(crate) leftover: Vec<u8>,
}

/// An answer that ends the exchange: status, reason phrase, body, and its refusal reason.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Failure {
    pub(crate) status: u16,
    pub(crate) reason: &'static str,
    pub(crate) body: String,
}

impl Failure {
    fn new(status: u16, reason: &'static str, body: impl Into<String>) -> Self {
        Self {
            status,
            reason,
            body: body.into(),
        }
    }
}

fn status_text(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        403 => "Forbidden",
        405 => "Method Not Allowed",
        407 => "Proxy Authentication Required",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        502 => "Bad Gateway",
        504 => "Gateway Timeout",
        _ => "Error",
    }
}

/// Reads until a complete head is buffered, bounded by [`MAX_HEAD_BYTES`]; `Ok(None)` when
/// the consumer closed before sending anything.
async fn read_head(tcp: &mut TcpStream) -> Result<Option<ConnectRequest>, Failure> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        let n = tcp.read(&mut chunk).await.map_err(|err| {
            Failure::new(400, "malformed", format!("cannot read the request: {err}"))
        })?;
        if n == 0 {
            if buf.is_empty() {
                return Ok(None);
            }
            return Err(Failure::new(
                400,
                "malformed",
                "the connection ended inside the request head",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(request) = parse_head(&buf)? {
            return Ok(Some(request));
        }
        if buf.len() >= MAX_HEAD_BYTES {
            return Err(too_large());
        }
    }
}

fn too_large() -> Failure {
    Failure::new(
        431,
        "too_large",
        format!("the request head exceeds {MAX_HEAD_BYTES} bytes or {MAX_HEADERS} headers"),
    )
}

/// Parses a buffered head: `Ok(None)` when incomplete.
pub(crate) fn parse_head(buf: &[u8]) -> Result<Option<ConnectRequest>, Failure> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let len = match request.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(too_large()),
        Err(err) => {
            return Err(Failure::new(
                400,
                "malformed",
                format!("not an HTTP request: {err}"),
            ));
        }
    };
    if len > MAX_HEAD_BYTES {
        return Err(too_large());
    }
    let method = request.method.unwrap_or("");
    if method != "CONNECT" {
        return Err(Failure::new(
            405,
            "unsupported",
            format!("method {method} is not supported: this proxy only tunnels with CONNECT"),
        ));
    }
    let authority = request.path.unwrap_or("");
    let target = TargetAddr::parse_host_port(authority).map_err(|err| {
        Failure::new(
            400,
            "bad_target",
            format!("`{authority}` is not a host:port target: {err}"),
        )
    })?;
    let credentials = credentials(request.headers)?;
    Ok(Some(ConnectRequest {
        target,
        credentials,
        leftover: buf[len..].to_vec(),
    }))
}

/// The consumer's credentials from `Proxy-Authorization: Basic` and `X-Tether-Client`: the
/// user name is the client id (or the header names it), the password the token.
fn credentials(headers: &[httparse::Header<'_>]) -> Result<Option<Credentials>, Failure> {
    let mut basic = None;
    let mut header_client = None;
    for header in headers {
        if header.name.eq_ignore_ascii_case("proxy-authorization") {
            basic = Some(parse_basic(header.value)?);
        } else if header.name.eq_ignore_ascii_case("x-tether-client") {
            let value = std::str::from_utf8(header.value)
                .map_err(|_| Failure::new(400, "malformed", "X-Tether-Client is not UTF-8"))?;
            header_client = Some(value.trim().to_owned());
        }
    }
    let credentials = match (basic, header_client) {
        (None, None) => None,
        (Some(mut credentials), header) => {
            if credentials.client.is_empty() {
                credentials.client = header.unwrap_or_default();
            } else if header.is_some_and(|h| h != credentials.client) {
                return Err(Failure::new(
                    400,
                    "malformed",
                    "the proxy user name and X-Tether-Client name different clients",
                ));
            }
            Some(credentials)
        }
        (None, Some(client)) => Some(Credentials {
            client,
            token: String::new(),
        }),
    };
    if let Some(credentials) = &credentials {
        if credentials.client.is_empty() {
            return Err(Failure::new(
                400,
                "malformed",
                "no client id: give it as the proxy user name or in X-Tether-Client",
            ));
        }
        if let Err(err) = validate_agent_id(&credentials.client) {
            return Err(Failure::new(
                400,
                "malformed",
                format!("bad client id: {err}"),
            ));
        }
    }
    Ok(credentials)
}

/// `Basic base64(client:token)`.
fn parse_basic(value: &[u8]) -> Result<Credentials, Failure> {
    let bad = |why: &str| {
        Failure::new(
            407,
            "bad_credentials",
            format!("Proxy-Authorization: {why} (expected Basic with client id:token)"),
        )
    };
    let value = std::str::from_utf8(value)
        .map_err(|_| bad("not UTF-8"))?
        .trim();
    let (scheme, encoded) = value.split_once(' ').ok_or_else(|| bad("no scheme"))?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(bad("unsupported scheme"));
    }
    let decoded = STANDARD
        .decode(encoded.trim())
        .map_err(|_| bad("not base64"))?;
    let decoded = String::from_utf8(decoded).map_err(|_| bad("not UTF-8"))?;
    let (client, token) = decoded.split_once(':').unwrap_or((decoded.as_str(), ""));
    Ok(Credentials {
        client: client.to_owned(),
        token: token.to_owned(),
    })
}

/// The answer to a failed dial: 504 for timeouts, 502 otherwise, with the agent's reason.
pub(crate) fn dial_failure(client: &str, err: &DialError) -> Failure {
    match err {
        DialError::NoSession(_) => Failure::new(502, "no_session", err.to_string()),
        _ if err.is_timeout() => {
            Failure::new(504, "dial_failed", format!("agent \"{client}\": {err}"))
        }
        _ => Failure::new(502, "dial_failed", format!("agent \"{client}\": {err}")),
    }
}

fn auth_failure(err: &AuthError) -> Failure {
    match err {
        AuthError::Forbidden { .. } => Failure::new(403, err.label(), err.to_string()),
        _ => Failure::new(407, err.label(), err.to_string()),
    }
}

/// Serves one consumer connection.
pub(crate) async fn serve(
    frontend: &Frontend,
    mut tcp: TcpStream,
    peer: SocketAddr,
    admission: &mut Admission,
) {
    let settings = frontend.control.current();
    let head = tokio::time::timeout(settings.handshake_timeout, read_head(&mut tcp)).await;
    let request = match head {
        Err(_) => {
            let failure = Failure::new(408, "timeout", "the request head did not arrive in time");
            return refuse(frontend, tcp, None, "", failure).await;
        }
        Ok(Ok(None)) => {
            debug!("consumer closed before sending a request");
            return;
        }
        Ok(Ok(Some(request))) => request,
        Ok(Err(failure)) => return refuse(frontend, tcp, None, "", failure).await,
    };
    let client = request
        .credentials
        .as_ref()
        .map_or(String::new(), |c| c.client.clone());
    let consumer = match settings
        .consumers
        .authorize(request.credentials.as_ref(), peer.ip())
    {
        Ok(consumer) => consumer,
        Err(err) => {
            let consumer = match &err {
                AuthError::Forbidden { consumer, .. } => Some(consumer.clone()),
                _ => None,
            };
            return refuse(
                frontend,
                tcp,
                consumer.as_deref(),
                &client,
                auth_failure(&err),
            )
            .await;
        }
    };
    drop(settings);
    if !admission.authorized(frontend) {
        let failure = Failure::new(503, "limit", "too many consumer connections");
        return refuse(frontend, tcp, Some(&consumer), &client, failure).await;
    }
    record_request(&consumer, &client, &request.target);
    let mut audit = frontend.audit(peer, &consumer, &client, &request.target);
    let mut conn = match frontend.ctx.dialer.dial(&client, &request.target).await {
        Ok(conn) => conn,
        Err(err) => {
            let failure = dial_failure(&client, &err);
            audit.dial_failed(&err);
            return refuse(frontend, tcp, Some(&consumer), &client, failure).await;
        }
    };
    audit.dialed(&conn, &request.target);
    tracing::Span::current().record("stream.id", conn.stream.id());
    if let Err(err) = tcp
        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .await
    {
        debug!(error = %err, "consumer left before the tunnel opened");
        return audit.ended("consumer_left", &err);
    }
    if !request.leftover.is_empty() {
        if let Err(err) = conn.stream.write_all(&request.leftover).await {
            debug!(error = %err, "stream failed before the consumer's first bytes");
            crate::consumers::splice::reset(&tcp);
            return audit.ended("tunnel_error", &err);
        }
        audit.sent(request.leftover.len() as u64);
    }
    debug!("stream open");
    let end = splice(conn, tcp, &frontend.ctx.hard_stop).await;
    audit.spliced(&end);
}

/// Counts and logs the refusal, writes the answer, and closes after draining briefly (so the
/// consumer reads the answer rather than a reset caused by unread request bytes).
async fn refuse(
    frontend: &Frontend,
    mut tcp: TcpStream,
    consumer: Option<&str>,
    client: &str,
    failure: Failure,
) {
    frontend.refused(failure.reason, consumer, client, &failure.body);
    let authenticate = if failure.status == 407 {
        "Proxy-Authenticate: Basic realm=\"tether\"\r\n"
    } else {
        ""
    };
    let body = format!("{}\n", failure.body);
    let answer = format!(
        "HTTP/1.1 {} {}\r\n{authenticate}Content-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        failure.status,
        status_text(failure.status),
        body.len(),
    );
    let linger = async {
        tcp.write_all(answer.as_bytes()).await?;
        tcp.shutdown().await?;
        let mut sink = [0u8; 4096];
        while tcp.read(&mut sink).await? > 0 {}
        Ok::<_, std::io::Error>(())
    };
    if let Ok(Err(err)) = tokio::time::timeout(LINGER, linger).await {
        debug!(error = %err, "could not deliver the refusal");
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn parse(text: &str) -> Result<Option<ConnectRequest>, Failure> {
        parse_head(text.as_bytes())
    }

    #[test]
    fn basic_credentials_and_leftover() {
        let auth = STANDARD.encode("edge-1:tok:en");
        let req = parse(&format!(
            "CONNECT db.internal:5432 HTTP/1.1\r\nHost: x\r\nProxy-Authorization: Basic {auth}\r\n\r\nhello"
        ))
        .unwrap()
        .unwrap();
        assert_eq!(req.target.to_string(), "db.internal:5432");
        let creds = req.credentials.unwrap();
        assert_eq!(creds.client, "edge-1");
        assert_eq!(creds.token, "tok:en");
        assert_eq!(req.leftover, b"hello");
    }

    #[test]
    fn client_header_and_incomplete_heads() {
        let req = parse("CONNECT [::1]:22 HTTP/1.1\r\nX-Tether-Client: edge-2\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(req.target.to_string(), "[::1]:22");
        assert_eq!(req.credentials.unwrap().client, "edge-2");
        assert_eq!(parse("CONNECT a:1 HTTP/1.1\r\nHost: x\r\n"), Ok(None));
        assert_eq!(
            parse("CONNECT a:1 HTTP/1.1\r\n\r\n")
                .unwrap()
                .unwrap()
                .credentials,
            None
        );
    }

    #[test]
    fn each_bad_request_has_its_status() {
        let status = |text: &str| parse(text).unwrap_err().status;
        assert_eq!(status("\x16\x03\x01garbage\r\n\r\n"), 400);
        assert_eq!(status("GET http://a/ HTTP/1.1\r\n\r\n"), 405);
        assert_eq!(status("CONNECT nohost HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(status("CONNECT a:0 HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(
            status("CONNECT a:1 HTTP/1.1\r\nProxy-Authorization: Bearer x\r\n\r\n"),
            407
        );
        assert_eq!(
            status("CONNECT a:1 HTTP/1.1\r\nX-Tether-Client: bad/id\r\n\r\n"),
            400
        );
        let many: String = (0..MAX_HEADERS + 1)
            .map(|i| format!("H{i}: v\r\n"))
            .collect();
        assert_eq!(status(&format!("CONNECT a:1 HTTP/1.1\r\n{many}\r\n")), 431);
    }
}
