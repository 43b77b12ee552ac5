//! The SOCKS5 proxy (RFC 1928 CONNECT; IPv4, IPv6 and domain names, which the agent resolves)
//! with username/password authentication (RFC 1929: user = client id, password = token).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tether_common::identity::validate_agent_id;
use tether_mux::OpenError;
use tether_proto::{Host, OpenErrorCode, TargetAddr};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::debug;

use crate::consumers::auth::{AuthError, ConsumerTable, Credentials};
use crate::consumers::dial::DialError;
use crate::consumers::proxy::{Admission, Frontend, record_request};
use crate::consumers::splice::{reset, splice};

const VERSION: u8 = 5;
const AUTH_VERSION: u8 = 1;
/// RFC 1929 status of a failed authentication (any non-zero value).
const AUTH_FAILED: u8 = 1;
const METHOD_PASSWORD: u8 = 0x02;
const METHOD_UNACCEPTABLE: u8 = 0xff;
const CMD_CONNECT: u8 = 1;
const ATYP_V4: u8 = 1;
const ATYP_DOMAIN: u8 = 3;
const ATYP_V6: u8 = 4;
/// How long a refusal reply may take to be written.
const LINGER: Duration = Duration::from_millis(500);

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
struct Failure {
    reason: &'static str,
    detail: String,
    answer: Option<Vec<u8>>,
    /// The client id, when the handshake got as far as the user name.
    client: String,
}

impl Failure {
    fn malformed(detail: impl Into<String>) -> Self {
        Self {
            reason: "malformed",
            detail: detail.into(),
            answer: None,
            client: String::new(),
        }
    }

    fn reply(reason: &'static str, detail: impl Into<String>, reply: Reply) -> Self {
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
fn reply_bytes(reply: Reply) -> Vec<u8> {
    vec![VERSION, reply as u8, 0, ATYP_V4, 0, 0, 0, 0, 0, 0]
}

/// The reply for a failed dial.
pub(crate) fn dial_reply(err: &DialError) -> Reply {
    match err {
        DialError::NoSession(_) => Reply::NetworkUnreachable,
        _ if err.is_timeout() => Reply::TtlExpired,
        DialError::Open {
            source: OpenError::Refused { code, .. },
            ..
        } => match code {
            OpenErrorCode::Denied => Reply::NotAllowed,
            OpenErrorCode::ResolveFailed => Reply::HostUnreachable,
            OpenErrorCode::Refused => Reply::ConnectionRefused,
            OpenErrorCode::Unreachable => Reply::NetworkUnreachable,
            OpenErrorCode::Unsupported => Reply::AddressTypeNotSupported,
            _ => Reply::GeneralFailure,
        },
        DialError::Open { .. } => Reply::GeneralFailure,
    }
}

/// What a finished handshake asks for.
#[derive(Debug)]
struct Request {
    credentials: Credentials,
    target: TargetAddr,
}

async fn read_u8(tcp: &mut TcpStream, what: &str) -> Result<u8, Failure> {
    tcp.read_u8()
        .await
        .map_err(|err| Failure::malformed(format!("truncated {what}: {err}")))
}

async fn read_exact(tcp: &mut TcpStream, len: usize, what: &str) -> Result<Vec<u8>, Failure> {
    let mut buf = vec![0u8; len];
    tcp.read_exact(&mut buf)
        .await
        .map_err(|err| Failure::malformed(format!("truncated {what}: {err}")))?;
    Ok(buf)
}

async fn write(tcp: &mut TcpStream, bytes: &[u8]) -> Result<(), Failure> {
    tcp.write_all(bytes)
        .await
        .map_err(|err| Failure::malformed(format!("cannot answer: {err}")))
}

/// Greeting, method selection, authentication and request; every read is bounded by the
/// protocol's one-byte lengths.
async fn handshake(
    tcp: &mut TcpStream,
    consumers: &ConsumerTable,
    peer: IpAddr,
) -> Result<Request, Failure> {
    let version = read_u8(tcp, "greeting").await?;
    if version != VERSION {
        return Err(Failure::malformed(format!(
            "not SOCKS5 (version byte {version:#04x})"
        )));
    }
    let count = read_u8(tcp, "greeting").await?;
    let methods = read_exact(tcp, count.into(), "greeting").await?;
    let credentials = if methods.contains(&METHOD_PASSWORD) {
        write(tcp, &[VERSION, METHOD_PASSWORD]).await?;
        let version = read_u8(tcp, "authentication").await?;
        if version != AUTH_VERSION {
            return Err(Failure::malformed(format!(
                "unknown authentication version {version:#04x}"
            )));
        }
        let len = read_u8(tcp, "authentication").await?;
        let user = read_exact(tcp, len.into(), "authentication").await?;
        let len = read_u8(tcp, "authentication").await?;
        let password = read_exact(tcp, len.into(), "authentication").await?;
        let (Ok(client), Ok(token)) = (String::from_utf8(user), String::from_utf8(password)) else {
            return Err(Failure {
                answer: Some(vec![AUTH_VERSION, AUTH_FAILED]),
                ..Failure::malformed("user name or password is not UTF-8")
            });
        };
        Credentials { client, token }
    } else {
        // Without a user name there is no client id to route by, so "no authentication" is
        // never chosen; anonymous consumers send their client id with an empty password.
        return Err(Failure {
            reason: "missing_credentials",
            detail: "no acceptable authentication method (username/password required)".into(),
            answer: Some(vec![VERSION, METHOD_UNACCEPTABLE]),
            client: String::new(),
        });
    };
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
    write(tcp, &[AUTH_VERSION, 0]).await?;
    let head = read_exact(tcp, 4, "request").await?;
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
    let host = match head[3] {
        ATYP_V4 => {
            let b = read_exact(tcp, 4, "request").await?;
            Host::Ip(IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3])))
        }
        ATYP_V6 => {
            let b = read_exact(tcp, 16, "request").await?;
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&b);
            Host::Ip(IpAddr::V6(Ipv6Addr::from(octets)))
        }
        ATYP_DOMAIN => {
            let len = read_u8(tcp, "request").await?;
            let name = read_exact(tcp, len.into(), "request").await?;
            let name = String::from_utf8(name).map_err(|_| {
                Failure::reply("bad_target", "domain is not UTF-8", Reply::HostUnreachable)
            })?;
            // Reuse the target parser's host rules (characters, length, IP literals).
            TargetAddr::parse_host_port(&format!("{name}:1"))
                .map_err(|err| {
                    Failure::reply(
                        "bad_target",
                        format!("domain `{}`: {err}", name.escape_debug()),
                        Reply::HostUnreachable,
                    )
                })?
                .host
        }
        other => {
            return Err(Failure::reply(
                "unsupported",
                format!("address type {other}"),
                Reply::AddressTypeNotSupported,
            ));
        }
    };
    let port = tcp
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
    Ok(Request {
        credentials,
        target: TargetAddr { host, port },
    })
}

/// Serves one consumer connection.
pub(crate) async fn serve(
    frontend: &Frontend,
    mut tcp: TcpStream,
    peer: SocketAddr,
    admission: &mut Admission,
) {
    let settings = frontend.control.current();
    let handshake = tokio::time::timeout(
        settings.handshake_timeout,
        handshake(&mut tcp, &settings.consumers, peer.ip()),
    )
    .await;
    let request = match handshake {
        Ok(Ok(request)) => request,
        Ok(Err(failure)) => {
            let client = failure.client.clone();
            return refuse(frontend, tcp, None, &client, failure).await;
        }
        Err(_) => {
            let failure = Failure::malformed("the handshake did not finish in time");
            let failure = Failure {
                reason: "timeout",
                ..failure
            };
            return refuse(frontend, tcp, None, "", failure).await;
        }
    };
    let client = request.credentials.client.clone();
    if let Err(err) = validate_agent_id(&client) {
        let failure = Failure::reply(
            "malformed",
            format!("bad client id: {err}"),
            Reply::NotAllowed,
        );
        return refuse(frontend, tcp, None, "", failure).await;
    }
    let consumer = match settings
        .consumers
        .authorize(Some(&request.credentials), peer.ip())
    {
        Ok(consumer) => consumer,
        Err(err) => {
            let consumer = match &err {
                AuthError::Forbidden { consumer, .. } => Some(consumer.clone()),
                _ => None,
            };
            let failure = Failure::reply(err.label(), err.to_string(), Reply::NotAllowed);
            return refuse(frontend, tcp, consumer.as_deref(), &client, failure).await;
        }
    };
    drop(settings);
    if !admission.authorized(frontend) {
        let failure = Failure::reply(
            "limit",
            "too many consumer connections",
            Reply::GeneralFailure,
        );
        return refuse(frontend, tcp, Some(&consumer), &client, failure).await;
    }
    record_request(&consumer, &client, &request.target);
    let mut audit = frontend.audit(peer, &consumer, &client, &request.target);
    let conn = match frontend.ctx.dialer.dial(&client, &request.target).await {
        Ok(conn) => conn,
        Err(err) => {
            let reason = match err {
                DialError::NoSession(_) => "no_session",
                _ => "dial_failed",
            };
            let failure = Failure::reply(reason, err.to_string(), dial_reply(&err));
            audit.dial_failed(&err);
            return refuse(frontend, tcp, Some(&consumer), &client, failure).await;
        }
    };
    audit.dialed(&conn, &request.target);
    tracing::Span::current().record("stream.id", conn.stream.id());
    if let Err(err) = tcp.write_all(&reply_bytes(Reply::Succeeded)).await {
        debug!(error = %err, "consumer left before the tunnel opened");
        return audit.ended("consumer_left", &err);
    }
    debug!("stream open");
    let end = splice(conn, tcp, &frontend.ctx.hard_stop).await;
    audit.spliced(&end);
}

async fn refuse(
    frontend: &Frontend,
    mut tcp: TcpStream,
    consumer: Option<&str>,
    client: &str,
    failure: Failure,
) {
    frontend.refused(failure.reason, consumer, client, &failure.detail);
    // A written answer is followed by a FIN, not a reset that could discard it in flight.
    if let Some(answer) = failure.answer {
        let answer = async {
            tcp.write_all(&answer).await?;
            tcp.shutdown().await
        };
        if let Ok(Err(err)) = tokio::time::timeout(LINGER, answer).await {
            debug!(error = %err, "could not deliver the refusal");
        }
    } else {
        reset(&tcp);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::agents::registry::NoSession;

    fn open(source: OpenError) -> DialError {
        DialError::Open {
            target: TargetAddr {
                host: Host::Name("db.internal".into()),
                port: 5432,
            },
            source,
        }
    }

    fn refused(code: OpenErrorCode) -> DialError {
        open(OpenError::Refused {
            code,
            message: String::new(),
        })
    }

    #[test]
    fn dial_failures_map_to_rfc1928_replies() {
        let no_session = DialError::NoSession(NoSession {
            client: "edge-1".into(),
            replica: String::new(),
        });
        assert_eq!(dial_reply(&no_session), Reply::NetworkUnreachable);
        for (code, reply) in [
            (OpenErrorCode::Denied, Reply::NotAllowed),
            (OpenErrorCode::ResolveFailed, Reply::HostUnreachable),
            (OpenErrorCode::Refused, Reply::ConnectionRefused),
            (OpenErrorCode::TimedOut, Reply::TtlExpired),
            (OpenErrorCode::Unreachable, Reply::NetworkUnreachable),
            (OpenErrorCode::Unsupported, Reply::AddressTypeNotSupported),
            (OpenErrorCode::Limit, Reply::GeneralFailure),
            (OpenErrorCode::Draining, Reply::GeneralFailure),
        ] {
            assert_eq!(dial_reply(&refused(code)), reply, "{code:?}");
        }
        let timeout = open(OpenError::Timeout(Duration::from_secs(1)));
        assert_eq!(dial_reply(&timeout), Reply::TtlExpired);
        assert_eq!(
            dial_reply(&open(OpenError::SessionClosed)),
            Reply::GeneralFailure
        );
        assert_eq!(
            reply_bytes(Reply::NotAllowed),
            [5, 2, 0, 1, 0, 0, 0, 0, 0, 0]
        );
    }
}
