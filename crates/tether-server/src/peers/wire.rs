//! The relay request on a peer stream: which client and which target the opening replica
//! wants, and the answer (opened, no session here, or the agent's refusal). Pure encoding.

use tether_proto::{OpenErrorCode, TargetAddr};

/// Version of the request encoding (first byte).
const VERSION: u8 = 1;
/// Longest reason text carried back.
pub(crate) const MAX_REASON: usize = 512;
/// Longest request: version, kind, client (length-prefixed), target (length-prefixed).
pub(crate) const MAX_REQUEST: usize = 4 + 255 + 512;

/// What the opening replica asks of the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Request {
    /// Dial `target` through a local session of agent `client` and splice it onto this stream.
    Dial { client: String, target: TargetAddr },
    /// Answer with the replica's server id (used to find oneself among the members).
    Whoami,
}

/// The answer, written before any spliced byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Answer {
    /// The stream now carries the target's bytes.
    Opened,
    /// This replica holds no session of the client.
    NoSession,
    /// The agent (or the dial) refused: its code and reason.
    Refused { code: OpenErrorCode, reason: String },
    /// The server id of the answering replica (to [`Request::Whoami`]).
    ServerId(String),
    /// The request could not be read.
    BadRequest(String),
}

/// Why bytes do not form a request or an answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum WireError {
    #[error("unsupported relay request version {0}")]
    Version(u8),
    #[error("unknown relay {what} kind {kind}")]
    Kind { what: &'static str, kind: u8 },
    #[error("relay request field is not valid: {0}")]
    Invalid(String),
}

impl Request {
    /// The bytes of the request.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = vec![VERSION];
        match self {
            Request::Dial { client, target } => {
                out.push(1);
                push_short(&mut out, client.as_bytes());
                push_long(&mut out, target.to_string().as_bytes());
            }
            Request::Whoami => out.push(2),
        }
        out
    }

    /// Parses a whole request; `Ok(None)` while more bytes are needed.
    pub(crate) fn decode(bytes: &[u8]) -> Result<Option<(Request, usize)>, WireError> {
        let mut r = Reader { bytes, at: 0 };
        let Some(version) = r.byte() else {
            return Ok(None);
        };
        if version != VERSION {
            return Err(WireError::Version(version));
        }
        let Some(kind) = r.byte() else {
            return Ok(None);
        };
        let request = match kind {
            1 => {
                let Some(client) = r.short() else {
                    return Ok(None);
                };
                let Some(target) = r.long() else {
                    return Ok(None);
                };
                let client = text(client)?;
                tether_common::identity::validate_agent_id(&client)
                    .map_err(|e| WireError::Invalid(e.to_string()))?;
                let target = text(target)?
                    .parse::<TargetAddr>()
                    .map_err(|e| WireError::Invalid(e.to_string()))?;
                Request::Dial { client, target }
            }
            2 => Request::Whoami,
            kind => {
                return Err(WireError::Kind {
                    what: "request",
                    kind,
                });
            }
        };
        Ok(Some((request, r.at)))
    }
}

impl Answer {
    /// The bytes of the answer.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            Answer::Opened => out.push(0),
            Answer::NoSession => out.push(1),
            Answer::Refused { code, reason } => {
                out.push(2);
                out.push(code.to_u8());
                push_long(&mut out, clip(reason).as_bytes());
            }
            Answer::ServerId(id) => {
                out.push(3);
                push_short(&mut out, id.as_bytes());
            }
            Answer::BadRequest(reason) => {
                out.push(4);
                push_long(&mut out, clip(reason).as_bytes());
            }
        }
        out
    }

    /// Parses a whole answer; `Ok(None)` while more bytes are needed.
    pub(crate) fn decode(bytes: &[u8]) -> Result<Option<(Answer, usize)>, WireError> {
        let mut r = Reader { bytes, at: 0 };
        let Some(kind) = r.byte() else {
            return Ok(None);
        };
        let answer = match kind {
            0 => Answer::Opened,
            1 => Answer::NoSession,
            2 => {
                let Some(code) = r.byte() else {
                    return Ok(None);
                };
                let Some(reason) = r.long() else {
                    return Ok(None);
                };
                Answer::Refused {
                    code: OpenErrorCode::from_u8(code),
                    reason: String::from_utf8_lossy(reason).into_owned(),
                }
            }
            3 => {
                let Some(id) = r.short() else {
                    return Ok(None);
                };
                Answer::ServerId(text(id)?)
            }
            4 => {
                let Some(reason) = r.long() else {
                    return Ok(None);
                };
                Answer::BadRequest(String::from_utf8_lossy(reason).into_owned())
            }
            kind => {
                return Err(WireError::Kind {
                    what: "answer",
                    kind,
                });
            }
        };
        Ok(Some((answer, r.at)))
    }
}

fn clip(reason: &str) -> &str {
    let mut end = reason.len().min(MAX_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

fn text(bytes: &[u8]) -> Result<String, WireError> {
    String::from_utf8(bytes.to_vec()).map_err(|_| WireError::Invalid("not UTF-8".to_owned()))
}

fn push_short(out: &mut Vec<u8>, bytes: &[u8]) {
    let len = bytes.len().min(255);
    out.push(len as u8);
    out.extend_from_slice(&bytes[..len]);
}

fn push_long(out: &mut Vec<u8>, bytes: &[u8]) {
    let len = bytes.len().min(usize::from(u16::MAX));
    out.extend_from_slice(&(len as u16).to_be_bytes());
    out.extend_from_slice(&bytes[..len]);
}

/// A cursor over a prefix of the bytes received so far.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n)?;
        let out = self.bytes.get(self.at..end)?;
        self.at = end;
        Some(out)
    }

    fn byte(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn short(&mut self) -> Option<&'a [u8]> {
        let len = self.byte()?;
        self.take(usize::from(len))
    }

    fn long(&mut self) -> Option<&'a [u8]> {
        let len = self.take(2)?;
        self.take(usize::from(u16::from_be_bytes([len[0], len[1]])))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> TargetAddr {
        "10.0.0.7:5432".parse().unwrap()
    }

    #[test]
    fn requests_and_answers_round_trip_and_need_every_byte() {
        let requests = [
            Request::Dial {
                client: "edge-7".into(),
                target: target(),
            },
            Request::Whoami,
        ];
        for request in requests {
            let bytes = request.encode();
            for cut in 0..bytes.len() {
                assert_eq!(
                    Request::decode(&bytes[..cut]),
                    Ok(None),
                    "{request:?} cut {cut}"
                );
            }
            let mut longer = bytes.clone();
            longer.extend_from_slice(b"payload");
            assert_eq!(
                Request::decode(&longer),
                Ok(Some((request.clone(), bytes.len())))
            );
        }
        let answers = [
            Answer::Opened,
            Answer::NoSession,
            Answer::Refused {
                code: OpenErrorCode::Refused,
                reason: "connection refused".into(),
            },
            Answer::ServerId("replica-2".into()),
            Answer::BadRequest("nope".into()),
        ];
        for answer in answers {
            let bytes = answer.encode();
            for cut in 0..bytes.len() {
                assert_eq!(
                    Answer::decode(&bytes[..cut]),
                    Ok(None),
                    "{answer:?} cut {cut}"
                );
            }
            assert_eq!(
                Answer::decode(&bytes),
                Ok(Some((answer.clone(), bytes.len())))
            );
        }
    }

    #[test]
    fn bad_requests_are_errors_not_panics() {
        assert_eq!(Request::decode(&[9]), Err(WireError::Version(9)));
        assert!(matches!(
            Request::decode(&[1, 7]),
            Err(WireError::Kind { .. })
        ));
        let mut bad_client = vec![1, 1, 3];
        bad_client.extend_from_slice(b"a b");
        bad_client.extend_from_slice(&[0, 3]);
        bad_client.extend_from_slice(b"x:1");
        assert!(matches!(
            Request::decode(&bad_client),
            Err(WireError::Invalid(_))
        ));
        let mut bad_target = vec![1, 1, 1, b'a', 0, 7];
        bad_target.extend_from_slice(b"x:99999");
        assert!(matches!(
            Request::decode(&bad_target),
            Err(WireError::Invalid(_))
        ));
        assert!(matches!(Answer::decode(&[77]), Err(WireError::Kind { .. })));
        let long = "é".repeat(MAX_REASON);
        let bytes = Answer::Refused {
            code: OpenErrorCode::Refused,
            reason: long,
        }
        .encode();
        let Ok(Some((Answer::Refused { reason, .. }, _))) = Answer::decode(&bytes) else {
            panic!("an answer");
        };
        assert!(reason.len() <= MAX_REASON);
    }
}
