//! The remotedialer Error texts: what a Go peer's failure texts mean in tether's terms (a dial
//! error code, or a reset code), and the texts tether sends for its own refusals so that a Go
//! peer, or a tether peer reading them back, sees the same words.
//!
//! A Go agent reports a failed dial with `err.Error()` of Go's dialer (`dial tcp ADDR: connect:
//! connection refused`, `... i/o timeout`, `... no route to host`, `lookup HOST ...: no such
//! host`) or of its own checks (`connect not allowed`); the words below are matched
//! case-insensitively anywhere in the text.

use tether_proto::{OpenErrorCode, ResetCode};

/// Words of a failed dial, by the code they mean; the first match wins (a lookup that timed
/// out is a resolution failure, not a dial timeout).
const DIAL_WORDS: &[(&str, OpenErrorCode)] = &[
    ("connection refused", OpenErrorCode::Refused),
    ("no such host", OpenErrorCode::ResolveFailed),
    ("server misbehaving", OpenErrorCode::ResolveFailed),
    ("lookup ", OpenErrorCode::ResolveFailed),
    ("resolving the target failed", OpenErrorCode::ResolveFailed),
    ("no route to host", OpenErrorCode::Unreachable),
    ("network is unreachable", OpenErrorCode::Unreachable),
    ("host is down", OpenErrorCode::Unreachable),
    ("is unreachable", OpenErrorCode::Unreachable),
    ("i/o timeout", OpenErrorCode::TimedOut),
    ("connection timed out", OpenErrorCode::TimedOut),
    ("dial timed out", OpenErrorCode::TimedOut),
    ("deadline exceeded", OpenErrorCode::TimedOut),
    ("connect not allowed", OpenErrorCode::Denied),
    ("not allowed", OpenErrorCode::Denied),
    ("permission denied", OpenErrorCode::Denied),
    ("operation not permitted", OpenErrorCode::Denied),
    ("forbidden", OpenErrorCode::Denied),
    ("denied", OpenErrorCode::Denied),
    ("too many connections", OpenErrorCode::Limit),
    ("cannot assign requested address", OpenErrorCode::Limit),
    ("missing port in address", OpenErrorCode::Unsupported),
    ("unknown network", OpenErrorCode::Unsupported),
    ("unsupported protocol", OpenErrorCode::Unsupported),
    ("bad address", OpenErrorCode::Unsupported),
    (
        "failed to parse connect address",
        OpenErrorCode::Unsupported,
    ),
    ("draining", OpenErrorCode::Draining),
];

/// Words of a connection that failed after it was established, by reset code.
const RESET_WORDS: &[(&str, ResetCode)] = &[
    ("connection reset by peer", ResetCode::TargetReset),
    ("broken pipe", ResetCode::TargetReset),
    ("i/o timeout", ResetCode::Timeout),
    ("deadline exceeded", ResetCode::Timeout),
    ("sync from client", ResetCode::Cancelled),
    ("tunnel disconnect", ResetCode::Cancelled),
    ("operation was canceled", ResetCode::Cancelled),
    ("connection not found", ResetCode::UnknownStream),
];

fn find<T: Copy>(words: &[(&str, T)], text: &str) -> Option<T> {
    let text = text.to_ascii_lowercase();
    words
        .iter()
        .find(|(word, _)| text.contains(word))
        .map(|(_, code)| *code)
}

/// The dial error code that a peer's Error text stands for, if it reads as a failed dial.
pub(crate) fn dial_error_code(text: &str) -> Option<OpenErrorCode> {
    find(DIAL_WORDS, text)
}

/// The reset code of a peer's Error text for an established connection.
pub(crate) fn reset_code(text: &str) -> ResetCode {
    find(RESET_WORDS, text).unwrap_or(ResetCode::Internal)
}

/// The Error text for a local refusal: `message`, with the words Go would use for `code`
/// added when it does not read as that code already (so that [`dial_error_code`] on the
/// other side recovers `code`).
pub(crate) fn refusal_text(code: OpenErrorCode, message: &str) -> String {
    let words = match code {
        OpenErrorCode::Refused => "connection refused",
        OpenErrorCode::ResolveFailed => "no such host",
        OpenErrorCode::TimedOut => "i/o timeout",
        OpenErrorCode::Unreachable => "no route to host",
        OpenErrorCode::Denied => "connect not allowed",
        OpenErrorCode::Limit => "too many connections",
        OpenErrorCode::Unsupported => "unsupported protocol",
        OpenErrorCode::Draining => "draining",
        OpenErrorCode::Internal | OpenErrorCode::Other(_) => {
            return if message.is_empty() {
                code.label().to_owned()
            } else {
                message.to_owned()
            };
        }
    };
    if message.is_empty() {
        words.to_owned()
    } else if dial_error_code(message) == Some(code) {
        message.to_owned()
    } else {
        format!("{message}: {words}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The texts Go's agent sends (net.Dialer errors on Linux, remotedialer's own).
    #[test]
    fn go_dial_failures_map_to_their_codes() {
        let cases = [
            (
                "dial tcp 127.0.0.1:1: connect: connection refused",
                OpenErrorCode::Refused,
            ),
            (
                "dial tcp 10.255.0.1:80: i/o timeout",
                OpenErrorCode::TimedOut,
            ),
            (
                "dial tcp 10.0.0.1:80: connect: connection timed out",
                OpenErrorCode::TimedOut,
            ),
            (
                "dial tcp 192.0.2.1:80: connect: no route to host",
                OpenErrorCode::Unreachable,
            ),
            (
                "dial tcp [2001:db8::1]:80: connect: network is unreachable",
                OpenErrorCode::Unreachable,
            ),
            (
                "dial tcp: lookup nowhere.invalid on 127.0.0.53:53: no such host",
                OpenErrorCode::ResolveFailed,
            ),
            (
                "dial tcp: lookup slow.example: i/o timeout",
                OpenErrorCode::ResolveFailed,
            ),
            ("connect not allowed", OpenErrorCode::Denied),
            (
                "dial tcp 127.0.0.1:22: connect: permission denied",
                OpenErrorCode::Denied,
            ),
            (
                "dial tcp 127.0.0.1:80: connect: operation not permitted",
                OpenErrorCode::Denied,
            ),
            (
                "dial tcp 127.0.0.1:80: connect: cannot assign requested address",
                OpenErrorCode::Limit,
            ),
            (
                "dial tcp: address nowhere: missing port in address",
                OpenErrorCode::Unsupported,
            ),
            (
                "dial udpx: unknown network udpx",
                OpenErrorCode::Unsupported,
            ),
            ("context deadline exceeded", OpenErrorCode::TimedOut),
        ];
        for (text, code) in cases {
            assert_eq!(dial_error_code(text), Some(code), "{text}");
        }
        for text in [
            "EOF",
            "tunnel disconnect",
            "read: connection reset by peer",
            "",
        ] {
            assert_eq!(dial_error_code(text), None, "{text}");
        }
    }

    #[test]
    fn failures_of_established_connections_map_to_reset_codes() {
        let cases = [
            (
                "read tcp 127.0.0.1:4000->127.0.0.1:5000: read: connection reset by peer",
                ResetCode::TargetReset,
            ),
            ("write: broken pipe", ResetCode::TargetReset),
            ("sync from client", ResetCode::Cancelled),
            ("tunnel disconnect", ResetCode::Cancelled),
            ("connection not found client/1/7", ResetCode::UnknownStream),
            ("deadline exceeded", ResetCode::Timeout),
            ("io: read/write on closed pipe", ResetCode::Internal),
        ];
        for (text, code) in cases {
            assert_eq!(reset_code(text), code, "{text}");
        }
    }

    /// Every code tether refuses with survives the trip through a text.
    #[test]
    fn refusal_texts_read_back_as_their_code() {
        let codes = [
            OpenErrorCode::Refused,
            OpenErrorCode::ResolveFailed,
            OpenErrorCode::TimedOut,
            OpenErrorCode::Unreachable,
            OpenErrorCode::Denied,
            OpenErrorCode::Limit,
            OpenErrorCode::Unsupported,
            OpenErrorCode::Draining,
        ];
        for code in codes {
            for message in ["", "some words", "connection to 127.0.0.1:1 refused"] {
                let text = refusal_text(code, message);
                assert_eq!(
                    dial_error_code(&text),
                    Some(code),
                    "{code:?} {message:?}: {text}"
                );
                assert!(text.contains(message), "{text}");
            }
        }
        // Already Go's words: unchanged.
        assert_eq!(
            refusal_text(
                OpenErrorCode::Refused,
                "dial tcp 1.2.3.4:5: connect: connection refused"
            ),
            "dial tcp 1.2.3.4:5: connect: connection refused"
        );
        assert_eq!(refusal_text(OpenErrorCode::Internal, ""), "internal");
        assert_eq!(refusal_text(OpenErrorCode::Internal, "boom"), "boom");
    }
}
