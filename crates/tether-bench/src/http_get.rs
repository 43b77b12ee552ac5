//! A minimal HTTP/1.1 GET for the daemons' admin endpoints (`/metrics`), and reading one
//! sample out of the Prometheus text format.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The largest response accepted (a `/metrics` page is a few tens of KiB).
const MAX_RESPONSE: u64 = 16 << 20;

/// GETs `path` from `addr` and returns the body of a 200 response.
pub(crate) async fn get(addr: SocketAddr, path: &str) -> Result<String> {
    tokio::time::timeout(Duration::from_secs(10), async {
        let mut tcp = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        tcp.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        (&mut tcp)
            .take(MAX_RESPONSE)
            .read_to_end(&mut response)
            .await?;
        let text = String::from_utf8_lossy(&response);
        let (head, body) = text
            .split_once("\r\n\r\n")
            .with_context(|| format!("GET {path}: no header end in the response"))?;
        let status = head.lines().next().unwrap_or_default();
        if !status.contains(" 200 ") {
            bail!("GET {path}: {status}");
        }
        if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            return Ok(dechunk(body));
        }
        Ok(body.to_owned())
    })
    .await
    .with_context(|| format!("GET {path} from {addr} timed out"))?
}

/// Decodes a chunked body (axum answers `/metrics` with a length; this is for safety).
fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if size == 0 || after.len() < size {
            break;
        }
        out.push_str(&after[..size]);
        rest = after[size..].trim_start_matches("\r\n");
    }
    out
}

/// The value of the sample named exactly `series` (name plus labels as exposed, e.g.
/// `tether_agents_connected` or `tether_sessions{client="a"}`).
pub(crate) fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(series)?;
        if !rest.starts_with(' ') {
            return None;
        }
        rest.split_whitespace().next()?.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_exact_series_only() {
        let text = "# HELP x y\ntether_agents_connected_total 9\ntether_agents_connected 3\n";
        assert_eq!(sample(text, "tether_agents_connected"), Some(3.0));
        assert_eq!(sample(text, "tether_agents"), None);
    }

    #[test]
    fn dechunks() {
        assert_eq!(dechunk("3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"), "abcde");
    }
}
