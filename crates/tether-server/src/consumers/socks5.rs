//! The SOCKS5 proxy (RFC 1928 CONNECT; IPv4, IPv6 and domain names, which the agent resolves)
//! with username/password authentication (RFC 1929: user = client id, password = token).

use std::net::SocketAddr;
use std::time::Duration;

use tether_common::identity::validate_agent_id;
use tether_mux::OpenError;
use tether_proto::OpenErrorCode;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tracing::debug;

use crate::consumers::auth::AuthError;
use crate::consumers::dial::DialError;
use crate::consumers::proxy::{Admission, Frontend, record_request};
use crate::consumers::socks5_handshake::{Failure, Reply, Request, handshake, reply_bytes};
use crate::consumers::splice::{reset, splice};

/// How long a refusal reply may take to be written.
const LINGER: Duration = Duration::from_millis(500);

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

/// Serves one consumer connection: handshake, authorization, dial, splice.
pub(crate) async fn serve(
    frontend: &Frontend,
    tcp: TcpStream,
    peer: SocketAddr,
    admission: &mut Admission,
) {
    let (tcp, request, consumer) = match admit(frontend, tcp, peer, admission).await {
        Ok(admitted) => admitted,
        Err((tcp, consumer, client, failure)) => {
            return refuse(frontend, tcp, consumer.as_deref(), &client, failure).await;
        }
    };
    dial_and_splice(frontend, tcp, peer, request, consumer).await;
}

/// A refused connection: its socket, the consumer and client when known, and why.
type Refused = (TcpStream, Option<String>, String, Failure);

/// The handshake within `handshake_timeout`, then the consumer's authorization for the client
/// and an established slot; the request and the consumer's name.
async fn admit(
    frontend: &Frontend,
    mut tcp: TcpStream,
    peer: SocketAddr,
    admission: &mut Admission,
) -> Result<(TcpStream, Request, String), Refused> {
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
            return Err((tcp, None, client, failure));
        }
        Err(_) => {
            let failure = Failure {
                reason: "timeout",
                ..Failure::malformed("the handshake did not finish in time")
            };
            return Err((tcp, None, String::new(), failure));
        }
    };
    let client = request.credentials.client.clone();
    if let Err(err) = validate_agent_id(&client) {
        let detail = format!("bad client id: {err}");
        let failure = Failure::reply("malformed", detail, Reply::NotAllowed);
        return Err((tcp, None, String::new(), failure));
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
            return Err((tcp, consumer, client, failure));
        }
    };
    drop(settings);
    if !admission.authorized(frontend) {
        let detail = "too many consumer connections";
        let failure = Failure::reply("limit", detail, Reply::GeneralFailure);
        return Err((tcp, Some(consumer), client, failure));
    }
    Ok((tcp, request, consumer))
}

/// Dials the request's target through the client's agent, answers, and splices.
async fn dial_and_splice(
    frontend: &Frontend,
    mut tcp: TcpStream,
    peer: SocketAddr,
    request: Request,
    consumer: String,
) {
    let client = request.credentials.client;
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

    use tether_proto::{Host, TargetAddr};

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
