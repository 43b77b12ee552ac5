//! `tether status`: fetches `GET /v1/clients` from a server's admin listener and prints it as
//! a table (or the raw JSON with `--json`).
//!
//! The admin listener is plain HTTP on loopback or a private network, so a small HTTP/1.0
//! client is enough: one request, a close-delimited answer, bounded in size and time.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{Context, bail};
use tether_server::ClientsResponse;
use tether_server::admin::ClientDetail;
use tether_server::registry::SessionSnapshot;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The listing path on the admin listener.
pub(crate) const CLIENTS_PATH: &str = "/v1/clients";
/// Largest answer accepted.
const MAX_RESPONSE: u64 = 32 * 1024 * 1024;

/// Fetches the listing (or, with `client`, what the server knows about that client) from
/// `admin` (`http://host:port`) within `timeout` and prints it.
pub(crate) async fn run(
    admin: &str,
    client: Option<&str>,
    json: bool,
    timeout: Duration,
) -> anyhow::Result<()> {
    let url = AdminUrl::parse(admin)?;
    if let Some(client) = client {
        return run_client(&url, client, json, timeout).await;
    }
    let body = fetch_within(&url, CLIENTS_PATH, timeout).await?;
    if json {
        println!("{body}");
        return Ok(());
    }
    let listing: ClientsResponse = serde_json::from_str(&body).with_context(|| {
        format!(
            "{}{CLIENTS_PATH} did not answer with a client listing (is this a tether server's \
             admin_listen address?)",
            url.display()
        )
    })?;
    print!("{}", render(&listing));
    Ok(())
}

/// `tether status CLIENT`: `GET /v1/clients/{CLIENT}`.
async fn run_client(
    url: &AdminUrl,
    client: &str,
    json: bool,
    timeout: Duration,
) -> anyhow::Result<()> {
    // A source address names refusals whose certificate carried no readable identity.
    let is_source = client.parse::<std::net::IpAddr>().is_ok();
    if let (false, Err(err)) = (
        is_source,
        tether_common::identity::validate_agent_id(client),
    ) {
        bail!("`{client}` is not a client id: {err}");
    }
    let path = format!("{CLIENTS_PATH}/{client}");
    let body = fetch_within(url, &path, timeout).await?;
    if json {
        println!("{body}");
        return Ok(());
    }
    let detail: ClientDetail = serde_json::from_str(&body)
        .with_context(|| format!("{}{path} did not answer with a client", url.display()))?;
    print!("{}", render_client(&detail));
    Ok(())
}

/// One client: its sessions, its last refused attempt and its last session end.
pub(crate) fn render_client(detail: &ClientDetail) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "client {}: {}",
        detail.client,
        match detail.sessions.len() {
            0 => "not connected".to_owned(),
            n => format!("connected, {}", counted(n, "session", "sessions")),
        }
    );
    for session in &detail.sessions {
        let row = session_row(&detail.client, "", session);
        let _ = writeln!(
            out,
            "  session {} instance {} since {} rtt {} {} streams {} {} labels {}",
            row[2], row[3], row[4], row[5], row[6], row[7], row[8], row[9]
        );
    }
    match &detail.history.last_refusal {
        Some(r) => {
            let _ = writeln!(
                out,
                "last refused: {} from {}: {} ({})",
                r.at, r.peer_addr, r.detail, r.reason
            );
        }
        None => out.push_str("last refused: never (since the server started)\n"),
    }
    match &detail.history.last_session_end {
        Some(e) => {
            let _ = writeln!(
                out,
                "last session end: {} session {} after {}: {} ({})",
                e.at,
                e.session_id,
                age(e.lived_seconds),
                e.detail,
                e.reason
            );
        }
        None => out.push_str("last session end: none (since the server started)\n"),
    }
    out
}

/// A parsed `--admin` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AdminUrl {
    /// Host name or IP literal (IPv6 without brackets).
    pub(crate) host: String,
    pub(crate) port: u16,
    /// Path prefix before `/v1/clients` (empty, or starting with `/`, no trailing `/`).
    pub(crate) prefix: String,
}

impl AdminUrl {
    /// Accepts `http://host[:port][/prefix]` and `host:port`; the port defaults to 80.
    pub(crate) fn parse(text: &str) -> anyhow::Result<AdminUrl> {
        let text = text.trim();
        let rest = if let Some(rest) = text.strip_prefix("http://") {
            rest
        } else if text.starts_with("https://") {
            bail!(
                "--admin {text}: the admin listener speaks plain HTTP; use http:// (put TLS in \
                 front of it with a proxy if it must cross a network)"
            );
        } else if text.contains("://") {
            bail!("--admin {text}: only http:// URLs are supported");
        } else {
            text
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        let prefix = path.trim_end_matches('/').to_owned();
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let Some((host, after)) = v6.split_once(']') else {
                bail!("--admin {text}: `[` without a matching `]`");
            };
            (host, after.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            bail!("--admin {text}: no host (expected e.g. http://127.0.0.1:9090)");
        }
        let port = match port {
            None => 80,
            Some(port) => port
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .with_context(|| {
                    format!("--admin {text}: `{port}` is not a port number (1-65535)")
                })?,
        };
        Ok(AdminUrl {
            host: host.to_owned(),
            port,
            prefix,
        })
    }

    fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    pub(crate) fn display(&self) -> String {
        format!("http://{}{}", self.authority(), self.prefix)
    }
}

/// [`fetch`] within `timeout`, naming the listener when it does not answer in time.
pub(crate) async fn fetch_within(
    url: &AdminUrl,
    path: &str,
    timeout: Duration,
) -> anyhow::Result<String> {
    tokio::time::timeout(timeout, fetch(url, path))
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "no answer from the admin listener at {} within {timeout:?}",
                url.display()
            )
        })?
}

/// One `GET {prefix}{path}`; the body when the status is 200.
pub(crate) async fn fetch(url: &AdminUrl, path: &str) -> anyhow::Result<String> {
    let mut tcp = TcpStream::connect((url.host.as_str(), url.port))
        .await
        .with_context(|| {
            format!(
                "cannot reach the admin listener at {} (is the server running, and is this its \
                 admin_listen address?)",
                url.display()
            )
        })?;
    // HTTP/1.0: the answer is delimited by the server closing the connection, never chunked.
    let request = format!(
        "GET {}{path} HTTP/1.0\r\nHost: {}\r\nAccept: application/json\r\n\
         User-Agent: tether-status/{}\r\n\r\n",
        url.prefix,
        url.authority(),
        env!("CARGO_PKG_VERSION")
    );
    tcp.write_all(request.as_bytes())
        .await
        .with_context(|| format!("sending the request to {}", url.display()))?;
    let mut raw = Vec::new();
    (&mut tcp)
        .take(MAX_RESPONSE + 1)
        .read_to_end(&mut raw)
        .await
        .with_context(|| format!("reading the answer of {}", url.display()))?;
    if raw.len() as u64 > MAX_RESPONSE {
        bail!(
            "the answer of {} is larger than {MAX_RESPONSE} bytes",
            url.display()
        );
    }
    let (status, body) = split_response(&raw)
        .with_context(|| format!("{} did not answer with HTTP", url.display()))?;
    let body = String::from_utf8_lossy(body).into_owned();
    if status != 200 {
        let excerpt: String = body.trim().chars().take(200).collect();
        bail!(
            "{}{path} answered HTTP {status}{}",
            url.display(),
            if excerpt.is_empty() {
                String::new()
            } else {
                format!(": {excerpt}")
            }
        );
    }
    Ok(body)
}

/// The status code and body of a raw HTTP/1.x answer.
fn split_response(raw: &[u8]) -> anyhow::Result<(u16, &[u8])> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("the header never ended")?;
    let (head, rest) = raw.split_at(end);
    let body = rest.get(4..).unwrap_or_default();
    let head = String::from_utf8_lossy(head);
    let status_line = head.lines().next().unwrap_or_default();
    let mut parts = status_line.split_whitespace();
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        bail!("unexpected status line `{status_line}`");
    }
    let status = parts
        .next()
        .and_then(|s| s.parse::<u16>().ok())
        .with_context(|| format!("no status code in `{status_line}`"))?;
    Ok((status, body))
}

/// The listing as a table: one row per session; a client without sessions gets one row
/// with `0` sessions. The forwards and frontends follow, then a summary line.
pub(crate) fn render(listing: &ClientsResponse) -> String {
    let header = [
        "CLIENT", "SESSIONS", "SESSION", "INSTANCE", "SINCE", "RTT", "HEALTH", "STREAMS", "BYTES",
        "LABELS",
    ];
    let mut rows: Vec<Vec<String>> = Vec::new();
    for client in &listing.clients {
        let count = client.sessions.len().to_string();
        if client.sessions.is_empty() {
            let mut row = vec![client.client.clone(), count.clone()];
            row.resize(header.len(), "-".to_owned());
            rows.push(row);
        }
        for session in &client.sessions {
            rows.push(session_row(&client.client, &count, session));
        }
    }
    let mut out = table(&header, rows);
    if !listing.forwards.is_empty() {
        out.push('\n');
        let rows = listing
            .forwards
            .iter()
            .map(|f| {
                vec![
                    f.name.clone(),
                    f.listen.clone(),
                    f.client.clone(),
                    f.target.clone(),
                    f.last_error
                        .as_ref()
                        .map_or_else(|| "-".to_owned(), |e| format!("{} {}", e.at, e.error)),
                ]
            })
            .collect();
        out.push_str(&table(
            &["FORWARD", "LISTEN", "CLIENT", "TARGET", "LAST ERROR"],
            rows,
        ));
    }
    if !listing.frontends.is_empty() {
        out.push('\n');
        let rows = listing
            .frontends
            .iter()
            .map(|f| {
                vec![
                    f.kind.clone(),
                    f.listen.clone(),
                    if f.consumers.is_empty() {
                        "-".to_owned()
                    } else {
                        f.consumers.join(",")
                    },
                ]
            })
            .collect();
        out.push_str(&table(&["FRONTEND", "LISTEN", "CONSUMERS"], rows));
    }
    let sessions: usize = listing.clients.iter().map(|c| c.sessions.len()).sum();
    let _ = writeln!(
        out,
        "{}, {}, {}, {} (server {})",
        counted(listing.clients.len(), "client", "clients"),
        counted(sessions, "session", "sessions"),
        counted(listing.forwards.len(), "forward", "forwards"),
        counted(listing.frontends.len(), "frontend", "frontends"),
        listing.server_id
    );
    out
}

/// `1 client`, `0 clients`, `2 clients`.
pub(crate) fn counted(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// A header and rows as left-aligned columns.
pub(crate) fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    write_row(&mut out, &widths, header.iter().map(|s| s.to_string()));
    for row in rows {
        write_row(&mut out, &widths, row.into_iter());
    }
    out
}

fn session_row(client: &str, count: &str, session: &SessionSnapshot) -> Vec<String> {
    vec![
        client.to_owned(),
        count.to_owned(),
        session.session_id.to_string(),
        if session.instance.is_empty() {
            "-".to_owned()
        } else {
            session.instance.clone()
        },
        format!(
            "{} ({})",
            session.connected_since,
            age(session.connected_seconds)
        ),
        session
            .rtt_seconds
            .map_or_else(|| "-".to_owned(), |rtt| format!("{:.1}ms", rtt * 1000.0)),
        if session.healthy {
            "healthy".to_owned()
        } else {
            "UNHEALTHY".to_owned()
        },
        session.streams.to_string(),
        format!(
            "rx {} / tx {}",
            bytes(session.bytes_rx),
            bytes(session.bytes_tx)
        ),
        labels(&session.labels),
    ]
}

/// `role=db,site=eu-west`, or `-` without labels.
fn labels(labels: &std::collections::BTreeMap<String, String>) -> String {
    if labels.is_empty() {
        return "-".to_owned();
    }
    let pairs: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    pairs.join(",")
}

fn write_row(out: &mut String, widths: &[usize], cells: impl Iterator<Item = String>) {
    let line: Vec<String> = cells
        .zip(widths)
        .map(|(cell, width)| format!("{cell:<width$}"))
        .collect();
    let _ = writeln!(out, "{}", line.join("  ").trim_end());
}

/// `3d4h`, `2h5m`, `4m10s`, `12s`.
fn age(seconds: f64) -> String {
    let s = if seconds.is_finite() && seconds > 0.0 {
        seconds as u64
    } else {
        0
    };
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        3600..86_400 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// `512 B`, `1.5 KiB`, `3.2 MiB`, `1.0 GiB`.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = UNITS[0];
    for next in &UNITS[1..] {
        if value < 1024.0 {
            break;
        }
        value /= 1024.0;
        unit = next;
    }
    format!("{value:.1} {unit}")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use tether_server::registry::ClientSnapshot;

    #[test]
    fn admin_urls() {
        let url = AdminUrl::parse("http://127.0.0.1:9090").unwrap();
        assert_eq!(
            (url.host.as_str(), url.port, url.prefix.as_str()),
            ("127.0.0.1", 9090, "")
        );
        let url = AdminUrl::parse("127.0.0.1:9090/").unwrap();
        assert_eq!((url.host.as_str(), url.port), ("127.0.0.1", 9090));
        let url = AdminUrl::parse("http://[::1]:9091/tether/").unwrap();
        assert_eq!(
            (url.host.as_str(), url.port, url.prefix.as_str()),
            ("::1", 9091, "/tether")
        );
        assert_eq!(url.display(), "http://[::1]:9091/tether");
        let url = AdminUrl::parse("http://admin.internal").unwrap();
        assert_eq!((url.host.as_str(), url.port), ("admin.internal", 80));
        for bad in [
            "https://x:1",
            "ftp://x",
            "http://:9090",
            "http://x:99999",
            "http://x:0",
            "[::1",
        ] {
            assert!(AdminUrl::parse(bad).is_err(), "{bad} accepted");
        }
        let err = AdminUrl::parse("http://x:port").unwrap_err().to_string();
        assert!(err.contains("`port` is not a port number"), "{err}");
    }

    #[test]
    fn responses_split() {
        let (status, body) = split_response(b"HTTP/1.1 200 OK\r\nA: b\r\n\r\n{}").unwrap();
        assert_eq!((status, body), (200, &b"{}"[..]));
        let (status, body) = split_response(b"HTTP/1.0 404 Not Found\r\n\r\n").unwrap();
        assert_eq!((status, body), (404, &b""[..]));
        assert!(split_response(b"SSH-2.0-OpenSSH\r\n\r\n").is_err());
        assert!(split_response(b"HTTP/1.1 200 OK\r\n").is_err());
    }

    #[test]
    fn table_lists_sessions_and_clients_without_any() {
        let listing = ClientsResponse {
            server_id: "abc".into(),
            clients: vec![
                ClientSnapshot {
                    client: "edge-1".into(),
                    sessions: vec![SessionSnapshot {
                        session_id: 7,
                        instance: "f00d".into(),
                        peer_addr: "10.0.0.1:5555".into(),
                        connected_since: "2026-01-02T03:04:05Z".into(),
                        connected_seconds: 3725.0,
                        rtt_seconds: Some(0.0123),
                        healthy: false,
                        streams: 3,
                        bytes_rx: 1536,
                        bytes_tx: 10,
                        protocol: "tether.v1".into(),
                        labels: [("site".to_owned(), "eu-west".to_owned())].into(),
                    }],
                },
                ClientSnapshot {
                    client: "edge-2".into(),
                    sessions: vec![],
                },
            ],
            forwards: Vec::new(),
            frontends: Vec::new(),
            placement: None,
        };
        let table = render(&listing);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4, "{table}");
        assert!(
            lines[0].starts_with("CLIENT  SESSIONS  SESSION  INSTANCE"),
            "{table}"
        );
        let cells: Vec<&str> = lines[1]
            .split("  ")
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .collect();
        assert_eq!(
            cells,
            vec![
                "edge-1",
                "1",
                "7",
                "f00d",
                "2026-01-02T03:04:05Z (1h2m)",
                "12.3ms",
                "UNHEALTHY",
                "3",
                "rx 1.5 KiB / tx 10 B",
                "site=eu-west"
            ]
        );
        let cells: Vec<&str> = lines[2].split_whitespace().collect();
        assert_eq!(
            cells,
            vec!["edge-2", "0", "-", "-", "-", "-", "-", "-", "-", "-"]
        );
        assert_eq!(
            lines[3],
            "2 clients, 1 session, 0 forwards, 0 frontends (server abc)"
        );
        assert_eq!(counted(1, "client", "clients"), "1 client");
        assert_eq!(counted(0, "client", "clients"), "0 clients");
    }

    #[test]
    fn ages_and_sizes() {
        assert_eq!(age(12.9), "12s");
        assert_eq!(age(250.0), "4m10s");
        assert_eq!(age(f64::NAN), "0s");
        assert_eq!(age(3.0 * 86_400.0 + 4.0 * 3600.0), "3d4h");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(3 * 1024 * 1024 + 200 * 1024), "3.2 MiB");
        assert!(bytes(u64::MAX).ends_with(" TiB"));
    }
}
