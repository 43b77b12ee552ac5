//! `GET /` on the server's admin listener: for a browser, a page that lists the clients with
//! their labels, sessions, streams, bytes and RTT and refreshes itself from `/v1/clients`; for
//! `Accept: application/json`, the endpoints and a summary. Both link every endpoint.

use axum::Json;
use axum::http::{HeaderMap, header};
use axum::response::{Html, IntoResponse, Response};
use serde::Serialize;

use crate::admin::state::AdminState;

/// The admin endpoints and what each answers.
pub const ENDPOINTS: &[(&str, &str)] = &[
    ("/", "this page (JSON with Accept: application/json)"),
    ("/healthz", "200 while the process runs"),
    (
        "/readyz",
        "200 once serving, 503 while starting or draining",
    ),
    ("/metrics", "Prometheus metrics"),
    (
        "/v1/clients",
        "clients, sessions, labels, forwards and frontends (JSON)",
    ),
    (
        "/v1/clients/{id}",
        "one client: sessions, last refused attempt, last session end (JSON)",
    ),
];

/// The JSON form of the index.
#[derive(Debug, Serialize)]
struct Index<'a> {
    service: &'static str,
    version: &'static str,
    server_id: &'a str,
    clients: usize,
    sessions: usize,
    endpoints: Vec<Endpoint>,
}

#[derive(Debug, Serialize)]
struct Endpoint {
    path: &'static str,
    what: &'static str,
}

/// Whether the request asks for JSON rather than a page.
pub(crate) fn wants_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| accept.contains("application/json") && !accept.contains("text/html"))
}

/// The index for `state`, as a page or JSON.
pub(crate) fn index(state: &AdminState, headers: &HeaderMap) -> Response {
    if wants_json(headers) {
        let clients = state.registry.snapshot();
        return Json(Index {
            service: "tether-server",
            version: env!("CARGO_PKG_VERSION"),
            server_id: &state.server_id,
            sessions: clients.iter().map(|c| c.sessions.len()).sum(),
            clients: clients.len(),
            endpoints: ENDPOINTS
                .iter()
                .map(|(path, what)| Endpoint { path, what })
                .collect(),
        })
        .into_response();
    }
    let links: String = ENDPOINTS
        .iter()
        .map(|(path, what)| {
            // Relative links: the page also works behind a proxy under a path prefix.
            let href = match *path {
                "/" => "./",
                p if p.contains('{') => "v1/clients",
                p => p.trim_start_matches('/'),
            };
            format!("<li><a href=\"{href}\">{path}</a> {what}</li>")
        })
        .collect();
    Html(PAGE.replace("{{LINKS}}", &links)).into_response()
}

/// The page; its script renders `/v1/clients` with `textContent` only (labels and ids are
/// peer-supplied: never parsed as HTML) and fetches it again every two seconds.
const PAGE: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>tether server</title>
<style>
body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}th{background:#eee}
.bad{color:#b00}#updated{color:#666}
</style></head>
<body>
<h1>tether server <span id="server"></span></h1>
<p id="summary">loading /v1/clients&hellip;</p>
<table><thead><tr><th>client</th><th>labels</th><th>session</th><th>since</th><th>rtt</th>
<th>health</th><th>streams</th><th>bytes rx / tx</th></tr></thead><tbody id="clients"></tbody></table>
<h2>forwards</h2>
<table><thead><tr><th>name</th><th>listen</th><th>client</th><th>target</th></tr></thead>
<tbody id="forwards"></tbody></table>
<p id="updated"></p>
<h2>endpoints</h2><ul>{{LINKS}}</ul>
<noscript>This page renders with JavaScript; the data is at <a href="/v1/clients">/v1/clients</a>.</noscript>
<script>
"use strict";
function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  row.appendChild(td);
}
function size(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + " " + units[i];
}
function plural(n, one, many) { return n + " " + (n === 1 ? one : many); }
function render(listing) {
  document.getElementById("server").textContent = listing.server_id;
  const body = document.getElementById("clients");
  body.replaceChildren();
  let sessions = 0;
  for (const client of listing.clients) {
    const labels = Object.entries(client.sessions.length ? (client.sessions[client.sessions.length - 1].labels || {}) : {})
      .map(([k, v]) => k + "=" + v).join(", ");
    if (client.sessions.length === 0) {
      const row = body.insertRow();
      row.className = "client";
      cell(row, client.client); cell(row, labels || "-"); cell(row, "not connected", "bad");
      for (let i = 0; i < 5; i++) cell(row, "-");
    }
    for (const s of client.sessions) {
      sessions++;
      const row = body.insertRow();
      row.className = "client";
      cell(row, client.client);
      cell(row, Object.entries(s.labels || {}).map(([k, v]) => k + "=" + v).join(", ") || "-");
      cell(row, String(s.session_id));
      cell(row, s.connected_since);
      cell(row, s.rtt_seconds == null ? "-" : (s.rtt_seconds * 1000).toFixed(1) + " ms");
      cell(row, s.healthy ? "healthy" : "UNHEALTHY", s.healthy ? "" : "bad");
      cell(row, String(s.streams));
      cell(row, size(s.bytes_rx) + " / " + size(s.bytes_tx));
    }
  }
  const forwards = document.getElementById("forwards");
  forwards.replaceChildren();
  for (const f of listing.forwards || []) {
    const row = forwards.insertRow();
    cell(row, f.name); cell(row, f.listen); cell(row, f.client); cell(row, f.target);
  }
  document.getElementById("summary").textContent =
    plural(listing.clients.length, "client", "clients") + ", " + plural(sessions, "session", "sessions");
  document.getElementById("updated").textContent = "updated " + new Date().toISOString();
}
async function refresh() {
  try {
    const answer = await fetch("v1/clients", { headers: { Accept: "application/json" } });
    if (!answer.ok) throw new Error("HTTP " + answer.status);
    render(await answer.json());
  } catch (err) {
    document.getElementById("summary").textContent = "cannot fetch /v1/clients: " + err;
  }
  setTimeout(refresh, 2000);
}
refresh();
</script>
</body></html>
"#;

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn json_only_when_asked_for_without_html() {
        let mut headers = HeaderMap::new();
        assert!(!wants_json(&headers));
        headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        assert!(wants_json(&headers));
        headers.insert(
            header::ACCEPT,
            HeaderValue::from_static("text/html,application/xhtml+xml,application/json;q=0.9"),
        );
        assert!(!wants_json(&headers));
    }
}
