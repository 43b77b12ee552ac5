//! Capabilities negotiated in the WebSocket upgrade (`x-tether-caps`): what a peer of this
//! version can do beyond tether.v1 as first specified. A peer that sends no header, or a
//! token it does not know, gets today's behaviour.

/// The header both sides send: the agent in its upgrade request, the server in its answer
/// (only with the capabilities it accepts of those the agent offered).
pub const CAPS_HEADER: &str = "x-tether-caps";

/// The token of the one-round-trip open: `early-data=N` means "on a stream you open, I accept
/// up to N bytes of DATA right after your OPEN, before my OPEN_OK".
pub const EARLY_DATA: &str = "early-data";

/// Longest header value parsed (anything beyond is ignored).
const MAX_HEADER_LEN: usize = 1024;

/// Capabilities one side offers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Caps {
    /// Bytes of DATA accepted before OPEN_OK on a stream the peer opens (`None`: not offered).
    pub early_data: Option<u32>,
}

impl Caps {
    /// Parses a header value: comma-separated `token` or `token=value`; unknown tokens and
    /// malformed values are ignored (so that newer peers can add tokens).
    pub fn parse(value: &str) -> Caps {
        let mut caps = Caps::default();
        let value = value.get(..MAX_HEADER_LEN).unwrap_or(value);
        for item in value.split(',') {
            let (token, arg) = match item.split_once('=') {
                Some((token, arg)) => (token.trim(), Some(arg.trim())),
                None => (item.trim(), None),
            };
            if token.eq_ignore_ascii_case(EARLY_DATA)
                && let Some(n) = arg.and_then(|a| a.parse::<u32>().ok())
                && n > 0
            {
                caps.early_data = Some(n);
            }
        }
        caps
    }

    /// The header value (empty when nothing is offered).
    pub fn to_header(&self) -> String {
        match self.early_data {
            Some(n) => format!("{EARLY_DATA}={n}"),
            None => String::new(),
        }
    }

    /// Whether nothing is offered.
    pub fn is_empty(&self) -> bool {
        self.early_data.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_unknown_tokens() {
        let caps = Caps {
            early_data: Some(65536),
        };
        assert_eq!(Caps::parse(&caps.to_header()), caps);
        assert_eq!(
            Caps::parse("future-thing, early-data = 4096 ,x=y").early_data,
            Some(4096)
        );
        assert_eq!(Caps::parse("early-data").early_data, None);
        assert_eq!(Caps::parse("early-data=0").early_data, None);
        assert_eq!(Caps::parse("early-data=-1").early_data, None);
        assert!(Caps::parse("").is_empty());
        assert_eq!(Caps::default().to_header(), "");
    }
}
