//! The agent's admin index page (`GET /`): the gate, the connection and the dial and policy
//! counters, refreshed every two seconds from `/v1/status` and `/metrics`, with links to every
//! endpoint.

/// The admin endpoints and what each answers.
pub const ENDPOINTS: &[(&str, &str)] = &[
    ("/", "this page (JSON with Accept: application/json)"),
    ("/healthz", "200 while the process runs"),
    (
        "/readyz",
        "200 when connected (or idle by the activation gate), else 503 and why",
    ),
    ("/metrics", "Prometheus metrics"),
    ("/v1/status", "the connection state (JSON)"),
];

/// The page with its links. Its script writes peer-supplied text with `textContent` only.
pub fn page() -> String {
    let links: String = ENDPOINTS
        .iter()
        .map(|(path, what)| {
            let href = if *path == "/" {
                "./"
            } else {
                path.trim_start_matches('/')
            };
            format!("<li><a href=\"{href}\">{path}</a> {what}</li>")
        })
        .collect();
    PAGE.replace("{{LINKS}}", &links)
}

const PAGE: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>tether agent</title>
<style>
body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}th{background:#eee}
#updated{color:#666}
</style></head>
<body>
<h1>tether agent</h1>
<table><tbody id="status"><tr><td>loading v1/status&hellip;</td></tr></tbody></table>
<h2>dials and policy</h2>
<table><thead><tr><th>series</th><th>value</th></tr></thead><tbody id="counters"></tbody></table>
<p id="updated"></p>
<h2>endpoints</h2><ul>{{LINKS}}</ul>
<noscript>This page renders with JavaScript; the data is at <a href="v1/status">/v1/status</a>.</noscript>
<script>
"use strict";
function row(body, name, value) {
  const tr = body.insertRow();
  const a = document.createElement("th"); a.textContent = name; tr.appendChild(a);
  const b = document.createElement("td"); b.textContent = value; tr.appendChild(b);
}
async function refresh() {
  try {
    const status = await (await fetch("v1/status", { headers: { Accept: "application/json" } })).json();
    const body = document.getElementById("status");
    body.replaceChildren();
    row(body, "gate", status.gate_disabled == null ? "enabled" : "disabled: " + status.gate_disabled);
    row(body, "connection", status.connected ? "connected" : "not connected");
    row(body, "server", status.server_id || "-");
    row(body, "session", status.session_id || "-");
    row(body, "sessions since start", String(status.sessions));
    row(body, "failed attempts", String(status.attempts));
    row(body, "last error", status.last_error || "-");
    row(body, "instance", status.instance_id);
    const metrics = await (await fetch("metrics")).text();
    const counters = document.getElementById("counters");
    counters.replaceChildren();
    for (const line of metrics.split("\n")) {
      if (/^tether_agent_(dials_total|policy_denials_total|gate)[{ ]/.test(line)) {
        const at = line.lastIndexOf(" ");
        row(counters, line.slice(0, at), line.slice(at + 1));
      }
    }
    document.getElementById("updated").textContent = "updated " + new Date().toISOString();
  } catch (err) {
    document.getElementById("updated").textContent = "cannot fetch the status: " + err;
  }
  setTimeout(refresh, 2000);
}
refresh();
</script>
</body></html>
"#;
