//! The SOCKS5 handshake on the wire (RFC 1928 greeting and CONNECT request, RFC 1929
//! username/password sub-negotiation), over any `AsyncRead + AsyncWrite`: what a consumer asks
//! for, or why it is refused and what to answer it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use tether_proto::{Host, TargetAddr};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::consumers::auth::{AuthError, ConsumerTable, Credentials};

pub(crate) const VERSION: u8 = 5;
const AUTH_VERSION: u8 = 1;
/// RFC 1929 status of a failed authentication (any non-zero value).
const AUTH_FAILED: u8 = 1;
const METHOD_PASSWORD: u8 = 0x02;
const METHOD_UNACCEPTABLE: u8 = 0xff;
const CMD_CONNECT: u8 = 1;
const ATYP_V4: u8 = 1;
const ATYP_DOMAIN: u8 = 3;
const ATYP_V6: u8 = 4;
/// RFC 1928 reply codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Reply {
    Succeeded = 0,
    GeneralFailure = 1,
    NotAllowed = 2,
    NetworkUnreachable = 3,
    HostUnreachable = 4,
    ConnectionRefused = 5,
    TtlExpired = 6,
    CommandNotSupported = 7,
    AddressTypeNotSupported = 8,
}

/// Why a handshake ended before a dial: the refusal reason, what to log, and the answer to
/// send before a graceful close (none: the connection is reset, as for garbage or a timeout).
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) reason: &'static str,
    pub(crate) detail: String,
    pub(crate) answer: Option<Vec<u8>>,
    /// The client id, when the handshake got as far as the user name.
    pub(crate) client: String,
}

impl Failure {
    pub(crate) fn malformed(detail: impl Into<String>) -> Self {
        Self {
            reason: "malformed",
            detail: detail.into(),
            answer: None,
            client: String::new(),
        }
    }

    pub(crate) fn reply(reason: &'static str, detail: impl Into<String>, reply: Reply) -> Self {
        Self {
            reason,
            detail: detail.into(),
            answer: Some(reply_bytes(reply)),
            client: String::new(),
        }
    }
}

/// A reply with the unspecified bound address `0.0.0.0:0` (the agent's local address is not
/// known here and clients do not need it for CONNECT).
pub(crate) fn reply_bytes(reply: Reply) -> Vec<u8> {
    vec![VERSION, reply as u8, 0, ATYP_V4, 0, 0, 0, 0, 0, 0]
}

/// What a finished handshake asks for.
#[derive(Debug)]
pub(crate) struct Request {
    pub(crate) credentials: Credentials,
    pub(crate) target: TargetAddr,
}

async fn read_u8<S: AsyncRead + Unpin>(tcp: &mut S, what: &str) -> Result<u8, Failure> {
    tcp.read_u8()
        .await
        .map_err(|err| Failure::malformed(format!("truncated {what}: {err}")))
}

async fn read_exact<S: AsyncRead + Unpin>(
    tcp: &mut S,
    len: usize,
    what: &str,
) -> Result<Vec<u8>, Failure> {
    let mut buf = vec![0u8; len];
    tcp.read_exact(&mut buf)
        .await
        .map_err(|err| Failure::malformed(format!("truncated {what}: {err}")))?;
    Ok(buf)
}

async fn write<S: AsyncWrite + Unpin>(tcp: &mut S, bytes: &[u8]) -> Result<(), Failure> {
    tcp.write_all(bytes)
        .await
        .map_err(|err| Failure::malformed(format!("cannot answer: {err}")))
}

/// Greeting, method selection, authentication and request; every read is bounded by the
/// protocol's one-byte lengths.
pub(crate) async fn handshake<S>(
    io: &mut S,
    consumers: &ConsumerTable,
    peer: IpAddr,
) -> Result<Request, Failure>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    negotiate_method(io).await?;
    let credentials = read_credentials(io).await?;
    // A wrong token fails the sub-negotiation (RFC 1929); a consumer that may not reach the
    // client is refused at the request, with "not allowed by ruleset".
    if let Err(err @ (AuthError::BadCredentials | AuthError::MissingCredentials)) =
        consumers.authorize(Some(&credentials), peer)
    {
        return Err(Failure {
            reason: err.label(),
            detail: err.to_string(),
            answer: Some(vec![AUTH_VERSION, AUTH_FAILED]),
            client: credentials.client,
        });
    }
    write(io, &[AUTH_VERSION, 0]).await?;
    let target = read_request(io).await?;
    Ok(Request {
        credentials,
        target,
    })
}

/// The greeting: SOCKS5 offering username/password, which is chosen.
async fn negotiate_method<S>(io: &mut S) -> Result<(), Failure>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let version = read_u8(io, "greeting").await?;
    if version != VERSION {
        return Err(Failure::malformed(format!(
            "not SOCKS5 (version byte {version:#04x})"
        )));
    }
    let count = read_u8(io, "greeting").await?;
    let methods = read_exact(io, count.into(), "greeting").await?;
    if !methods.contains(&METHOD_PASSWORD) {
        // Without a user name there is no client id to route by, so "no authentication" is
        // never chosen; anonymous consumers send their client id with an empty password.
        return Err(Failure {
            reason: "missing_credentials",
            detail: "no acceptable authentication method (username/password required)".into(),
            answer: Some(vec![VERSION, METHOD_UNACCEPTABLE]),
            client: String::new(),
        });
    }
    write(io, &[VERSION, METHOD_PASSWORD]).await
}

/// The RFC 1929 sub-negotiation: user name (the client id) and password (the token).
async fn read_credentials<S: AsyncRead + Unpin>(io: &mut S) -> Result<Credentials, Failure> {
    let version = read_u8(io, "authentication").await?;
    if version != AUTH_VERSION {
        return Err(Failure::malformed(format!(
            "unknown authentication version {version:#04x}"
        )));
    }
    let len = read_u8(io, "authentication").await?;
    let user = read_exact(io, len.into(), "authentication").await?;
    let len = read_u8(io, "authentication").await?;
    let password = read_exact(io, len.into(), "authentication").await?;
    let (Ok(client), Ok(token)) = (String::from_utf8(user), String::from_utf8(password)) else {
        return Err(Failure {
            answer: Some(vec![AUTH_VERSION, AUTH_FAILED]),
            ..Failure::malformed("user name or password is not UTF-8")
        });
    };
    Ok(Credentials { client, token })
}

/// The request: CONNECT to an IPv4, IPv6 or domain target with a non-zero port.
async fn read_request<S: AsyncRead + Unpin>(io: &mut S) -> Result<TargetAddr, Failure> {
    let head = read_exact(io, 4, "request").await?;
    if head[0] != VERSION {
        return Err(Failure::malformed(format!(
            "request version byte {:#04x}",
            head[0]
        )));
    }
    if head[1] != CMD_CONNECT {
        return Err(Failure::reply(
            "unsupported",
            format!("command {} (only CONNECT is supported)", head[1]),
            Reply::CommandNotSupported,
        ));
    }
    let host = read_host(io, head[3]).await?;
    let port = io
        .read_u16()
        .await
        .map_err(|err| Failure::malformed(format!("truncated request: {err}")))?;
    if port == 0 {
        return Err(Failure::reply(
            "bad_target",
            "port 0",
            Reply::HostUnreachable,
        ));
    }
    Ok(TargetAddr { host, port })
}

/// The target host of address type `atyp`.
async fn read_host<S: AsyncRead + Unpin>(io: &mut S, atyp: u8) -> Result<Host, Failure> {
    match atyp {
        ATYP_V4 => {
            let b = read_exact(io, 4, "request").await?;
            Ok(Host::Ip(IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))))
        }
        ATYP_V6 => {
            let b = read_exact(io, 16, "request").await?;
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&b);
            Ok(Host::Ip(IpAddr::V6(Ipv6Addr::from(octets))))
        }
        ATYP_DOMAIN => {
            let len = read_u8(io, "request").await?;
            let name = read_exact(io, len.into(), "request").await?;
            let name = String::from_utf8(name).map_err(|_| {
                Failure::reply("bad_target", "domain is not UTF-8", Reply::HostUnreachable)
            })?;
            // Reuse the target parser's host rules (characters, length, IP literals).
            let parsed = TargetAddr::parse_host_port(&format!("{name}:1")).map_err(|err| {
                Failure::reply(
                    "bad_target",
                    format!("domain `{}`: {err}", name.escape_debug()),
                    Reply::HostUnreachable,
                )
            })?;
            Ok(parsed.host)
        }
        other => Err(Failure::reply(
            "unsupported",
            format!("address type {other}"),
            Reply::AddressTypeNotSupported,
        )),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::net::Ipv4Addr;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::config::{ConsumerConfig, FrontendsConfig, TokenHash};

    const REMOTE: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7));
    const GREETING: [u8; 3] = [VERSION, 1, METHOD_PASSWORD];

    fn table() -> ConsumerTable {
        ConsumerTable::from_config(&FrontendsConfig {
            consumers: vec![ConsumerConfig {
                name: "ops".into(),
                token_sha256: TokenHash::of("s3cret"),
                clients: vec!["edge-1".into()],
            }],
            ..FrontendsConfig::default()
        })
    }

    fn auth(user: &[u8], password: &[u8]) -> Vec<u8> {
        let mut out = vec![AUTH_VERSION, user.len() as u8];
        out.extend_from_slice(user);
        out.push(password.len() as u8);
        out.extend_from_slice(password);
        out
    }

    fn connect_domain(name: &str, port: u16) -> Vec<u8> {
        let mut out = vec![VERSION, CMD_CONNECT, 0, ATYP_DOMAIN, name.len() as u8];
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&port.to_be_bytes());
        out
    }

    /// Runs the handshake over an in-memory pipe fed `input` (then EOF); returns its outcome
    /// and every byte it answered.
    async fn run(input: &[u8]) -> (Result<Request, Failure>, Vec<u8>) {
        let (mut client, mut server) = tokio::io::duplex(4096);
        client.write_all(input).await.unwrap();
        client.shutdown().await.unwrap();
        let result = handshake(&mut server, &table(), REMOTE).await;
        drop(server);
        let mut answered = Vec::new();
        client.read_to_end(&mut answered).await.unwrap();
        (result, answered)
    }

    fn good(request: &[u8]) -> Vec<u8> {
        [&GREETING[..], &auth(b"edge-1", b"s3cret"), request].concat()
    }

    /// The refusal's reason and answer.
    async fn refusal(input: &[u8]) -> (&'static str, Option<Vec<u8>>) {
        let failure = run(input).await.0.unwrap_err();
        (failure.reason, failure.answer)
    }

    #[tokio::test]
    async fn a_connect_request_yields_credentials_and_target() {
        let (result, answered) = run(&good(&connect_domain("db.internal", 5432))).await;
        let request = result.unwrap();
        assert_eq!(request.credentials.client, "edge-1");
        assert_eq!(request.credentials.token, "s3cret");
        assert_eq!(request.target.to_string(), "db.internal:5432");
        assert_eq!(answered, [VERSION, METHOD_PASSWORD, AUTH_VERSION, 0]);

        let v4 = [VERSION, CMD_CONNECT, 0, ATYP_V4, 10, 0, 0, 7, 0x1f, 0x90];
        let request = run(&good(&v4)).await.0.unwrap();
        assert_eq!(request.target.to_string(), "10.0.0.7:8080");
        let mut v6 = vec![VERSION, CMD_CONNECT, 0, ATYP_V6];
        v6.extend_from_slice(&std::net::Ipv6Addr::LOCALHOST.octets());
        v6.extend_from_slice(&22u16.to_be_bytes());
        let request = run(&good(&v6)).await.0.unwrap();
        assert_eq!(request.target.port, 22);
        assert_eq!(
            request.target.host,
            Host::Ip(IpAddr::V6(std::net::Ipv6Addr::LOCALHOST))
        );
    }

    #[tokio::test]
    async fn each_refusal_has_its_reason_and_answer() {
        let auth_failed = Some(vec![AUTH_VERSION, AUTH_FAILED]);
        let reply = |r: Reply| Some(reply_bytes(r));
        // Not SOCKS5 at all: reset, no answer.
        assert_eq!(refusal(b"GET / HTTP/1.1\r\n").await, ("malformed", None));
        // No username/password method offered.
        assert_eq!(
            refusal(&[VERSION, 1, 0]).await,
            (
                "missing_credentials",
                Some(vec![VERSION, METHOD_UNACCEPTABLE])
            )
        );
        // A sub-negotiation of another version.
        let bad_auth = [&GREETING[..], &[2, 0, 0]].concat();
        assert_eq!(refusal(&bad_auth).await, ("malformed", None));
        // A user name that is not UTF-8.
        let not_utf8 = [&GREETING[..], &auth(&[0xff, 0xfe], b"x")].concat();
        assert_eq!(refusal(&not_utf8).await, ("malformed", auth_failed.clone()));
        // A wrong token.
        let wrong = [&GREETING[..], &auth(b"edge-1", b"nope")].concat();
        assert_eq!(refusal(&wrong).await, ("bad_credentials", auth_failed));
        // A request of another version, a command other than CONNECT, an unknown address
        // type, a bad domain, port 0.
        let bad_version = good(&[4, CMD_CONNECT, 0, ATYP_V4, 1, 2, 3, 4, 0, 80]);
        assert_eq!(refusal(&bad_version).await, ("malformed", None));
        let bind = good(&[VERSION, 2, 0, ATYP_V4, 1, 2, 3, 4, 0, 80]);
        assert_eq!(
            refusal(&bind).await,
            ("unsupported", reply(Reply::CommandNotSupported))
        );
        let atyp = good(&[VERSION, CMD_CONNECT, 0, 9, 1, 2, 3, 4, 0, 80]);
        assert_eq!(
            refusal(&atyp).await,
            ("unsupported", reply(Reply::AddressTypeNotSupported))
        );
        let domain = good(&connect_domain("bad host", 80));
        assert_eq!(
            refusal(&domain).await,
            ("bad_target", reply(Reply::HostUnreachable))
        );
        let port0 = good(&connect_domain("db.internal", 0));
        assert_eq!(
            refusal(&port0).await,
            ("bad_target", reply(Reply::HostUnreachable))
        );
    }

    #[tokio::test]
    async fn truncated_input_is_malformed_at_every_cut() {
        let whole = good(&connect_domain("db.internal", 5432));
        for cut in 0..whole.len() {
            let failure = run(&whole[..cut]).await.0.unwrap_err();
            assert_eq!(failure.reason, "malformed", "cut at {cut}");
            assert!(
                failure.detail.contains("truncated"),
                "cut at {cut}: {}",
                failure.detail
            );
        }
    }
}
