//! The daemons' `/metrics` as Prometheus itself sees it: `promtool check metrics` accepts both
//! daemons' output, and a real Prometheus server (Debian package `prometheus`) scrapes a running
//! server and agent, finds the tether series with the expected values and loads the alert rules
//! of docker/prometheus/alerts.yml.

#![allow(clippy::unwrap_used)] // test helpers panic on failure by design

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tether_common::tls::{cert_not_after, load_certs};
use tether_e2e::http::{HttpTarget, get, request_through};
use tether_e2e::tether_testkit::TestPki;
use tether_e2e::{ForwardSpec, TestAgent, TestServer, WAIT, allow_only, consumer_gets_error};
use tether_testkit::metrics::metric;
use tether_testkit::metrics::sample;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::process::{Child, Command};

/// The heap series report jemalloc's heap; make it this process's heap.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Streams opened through the forward before the metrics are read.
const REQUESTS: usize = 25;

/// A server with a forward to an HTTP target and one to a closed port, an agent with an admin
/// listener, both registries carrying the runtime collectors as the binary's do, and traffic
/// (successful and refused dials) so that labelled series exist.
struct Setup {
    pki: TestPki,
    server: TestServer,
    agent: TestAgent,
    agent_admin: SocketAddr,
    _http: HttpTarget,
}

async fn setup(server_extra_yaml: &str) -> Setup {
    setup_with(TestPki::new(), server_extra_yaml).await
}

async fn setup_with(pki: TestPki, server_extra_yaml: &str) -> Setup {
    let http = HttpTarget::start().await.unwrap();
    let closed_port = {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap()
    };
    let server = TestServer::start(
        &pki,
        &[
            ForwardSpec::new("edge-1", http.addr),
            ForwardSpec::new("edge-1", closed_port),
        ],
        server_extra_yaml,
    )
    .await;
    let policy = format!(
        "{}    - {{ cidrs: [\"127.0.0.1/32\"], ports: [\"{}\"] }}\n",
        allow_only(http.addr),
        closed_port.port()
    );
    let (mut agent, agent_admin) =
        TestAgent::start_with_admin(&pki, &pki.agent("edge-1"), server.tunnel_addr, &policy, "")
            .await;
    agent.wait_connected().await;
    server.wait_agents(1).await;
    let runtime = tokio::runtime::Handle::current();
    tether_common::runtime_metrics::register(&server.registry, runtime.clone()).unwrap();
    tether_common::runtime_metrics::register(&agent.registry, runtime).unwrap();
    for _ in 0..REQUESTS {
        request_through(server.forward_addrs[0]).await.unwrap();
    }
    assert!(consumer_gets_error(server.forward_addrs[1]).await);
    Setup {
        pki,
        server,
        agent,
        agent_admin,
        _http: http,
    }
}

/// The body of `GET /metrics`.
async fn scrape(admin: SocketAddr) -> String {
    let response = get(admin, "/metrics").await.unwrap();
    assert_eq!(response.status, 200, "{}", response.body);
    response.body
}

/// Runs `promtool check metrics` on `text`; returns (success, its report).
async fn promtool_check_metrics(text: &str) -> (bool, String) {
    let spawned = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(err) => panic!(
            "cannot run promtool ({err}); install the Debian package `prometheus` \
             (apt-get install prometheus), as .ci/run does"
        ),
    };
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(text.as_bytes()).await.unwrap();
    drop(stdin);
    let output = tokio::time::timeout(WAIT, child.wait_with_output())
        .await
        .expect("promtool finishes in time")
        .unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), report)
}

fn not_after(path: &Path) -> f64 {
    let certs = load_certs(path).unwrap();
    cert_not_after(&certs[0]).unwrap() as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_accepts_both_daemons_metrics() {
    let s = setup("").await;
    let server_text = scrape(s.server.admin_addr).await;
    let agent_text = scrape(s.agent_admin).await;

    for (daemon, text) in [("server", &server_text), ("agent", &agent_text)] {
        let (ok, report) = promtool_check_metrics(text).await;
        assert!(
            ok,
            "promtool check metrics rejects the {daemon}'s /metrics:\n{report}"
        );
        for series in [
            "tether_heap_allocated_bytes",
            "tether_heap_resident_bytes",
            "tether_runtime_alive_tasks",
            "process_open_fds",
            "process_resident_memory_bytes",
        ] {
            let value = sample(text, series)
                .unwrap_or_else(|| panic!("{daemon}: {series} missing:\n{text}"));
            assert!(value > 0.0, "{daemon}: {series} = {value}");
        }
        assert_eq!(
            sample(text, "tether_streams_opened_total"),
            Some((REQUESTS + 1) as f64),
            "{daemon}: every request opened a stream (the refused one too)"
        );
    }
    // Labelled series from the traffic, and certificate expiry equal to the files' notAfter.
    assert_eq!(
        sample(&server_text, "tether_dial_errors_total{code=\"refused\"}"),
        Some(1.0)
    );
    assert_eq!(
        sample(&agent_text, "tether_agent_dials_total{outcome=\"refused\"}"),
        Some(1.0)
    );
    let pki = &s.pki;
    let agent_cert = pki.agent("edge-1");
    for (text, cert, path) in [
        (&server_text, "server", pki.server_cert_path()),
        (&server_text, "client_ca", pki.ca_path()),
        (&agent_text, "server_ca", pki.ca_path()),
    ] {
        let series = format!("tether_tls_cert_expiry_timestamp_seconds{{cert=\"{cert}\"}}");
        assert_eq!(sample(text, &series), Some(not_after(path)), "{series}");
    }
    let agent_expiry = sample(
        &agent_text,
        "tether_tls_cert_expiry_timestamp_seconds{cert=\"agent\"}",
    )
    .unwrap();
    // The harness's agent certificate and the one issued above share the default validity.
    assert!((agent_expiry - not_after(&agent_cert.cert_path)).abs() < 60.0);
    // The remotedialer names are not exported unless asked for.
    assert!(!server_text.contains("session_server_"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remotedialer_compat_counters_balance() {
    let s = setup("metrics: { remotedialer_compat: true }\n").await;
    let registry = &s.server.registry;
    let labels = [("clientkey", "edge-1"), ("proto", "tcp")];
    tether_testkit::eventually("every compat connection removed", || {
        metric(registry, "session_server_total_remove_connections", &labels)
            == Some((REQUESTS + 1) as f64)
    })
    .await;
    assert_eq!(
        metric(registry, "session_server_total_add_connections", &labels),
        Some((REQUESTS + 1) as f64)
    );
    let session = [("clientkey", "edge-1"), ("peer", "false")];
    assert_eq!(
        metric(
            registry,
            "session_server_total_add_websocket_session",
            &session
        ),
        Some(1.0)
    );
    let text = scrape(s.server.admin_addr).await;
    // remotedialer's names break the `_total` suffix rule; those are the only complaints.
    let (_, report) = promtool_check_metrics(&text).await;
    let complaints: Vec<&str> = report
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter(|l| !(l.starts_with("session_server_") && l.contains("\"_total\" suffix")))
        .collect();
    assert!(complaints.is_empty(), "promtool: {complaints:?}\n{report}");

    // The agent goes away: the session is counted removed.
    s.agent.stop().await.unwrap();
    s.server.wait_agents(0).await;
    assert_eq!(
        metric(
            registry,
            "session_server_total_remove_websocket_session",
            &session
        ),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_registers_heap_runtime_and_process_metrics() {
    let pki = TestPki::new();
    let config = pki.write_file(
        "server.yaml",
        &format!(
            "version: 1\n\
             listen: \"127.0.0.1:0\"\n\
             admin_listen: \"127.0.0.1:0\"\n\
             tls: {{ cert: \"{}\", key: \"{}\", client_ca: \"{}\" }}\n",
            pki.server_cert_path().display(),
            pki.server_key_path().display(),
            pki.ca_path().display(),
        ),
    );
    let server = tether_e2e::process::ServerProcess::start(&config, 0).await;
    let text = scrape(server.admin_addr).await;
    let (ok, report) = promtool_check_metrics(&text).await;
    assert!(
        ok,
        "promtool check metrics rejects the binary's /metrics:\n{report}"
    );
    // jemalloc is the binary's allocator: a running server has a real heap (TLS config,
    // runtime, buffers), more than 100 KiB and less than the resident size.
    let allocated = sample(&text, "tether_heap_allocated_bytes").unwrap();
    let resident = sample(&text, "tether_heap_resident_bytes").unwrap();
    assert!(
        allocated > 100_000.0 && allocated < resident,
        "{allocated} / {resident}"
    );
    assert!(sample(&text, "tether_runtime_alive_tasks").unwrap() >= 2.0);
    assert!(sample(&text, "process_open_fds").unwrap() >= 3.0);
    assert_eq!(
        sample(
            &text,
            "tether_tls_cert_expiry_timestamp_seconds{cert=\"server\"}"
        ),
        Some(not_after(pki.server_cert_path()))
    );
    server.kill().await;
}

/// A Prometheus server child process, killed when dropped.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    _storage: tempfile::TempDir,
}

impl Prometheus {
    /// Starts Prometheus with `config` on a free loopback port and waits until it is ready.
    async fn start(config: &Path) -> Prometheus {
        // Prometheus cannot report a port it picked, so pick one here; another process may take
        // it between the probe and Prometheus's bind, hence the retries.
        for _ in 0..5 {
            let addr = {
                let probe = TcpListener::bind("127.0.0.1:0").await.unwrap();
                probe.local_addr().unwrap()
            };
            let storage = tempfile::tempdir().unwrap();
            let spawned = Command::new("prometheus")
                .arg(format!("--config.file={}", config.display()))
                .arg(format!("--storage.tsdb.path={}", storage.path().display()))
                .arg(format!("--web.listen-address={addr}"))
                .arg("--log.level=warn")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn();
            let mut child = match spawned {
                Ok(child) => child,
                Err(err) => panic!(
                    "cannot run prometheus ({err}); install the Debian package `prometheus` \
                     (apt-get install prometheus), as .ci/run does"
                ),
            };
            let deadline = tokio::time::Instant::now() + WAIT;
            loop {
                if let Ok(Some(_)) = child.try_wait() {
                    break; // exited: most likely the port was taken; try another
                }
                if let Ok(response) = get(addr, "/-/ready").await
                    && response.status == 200
                {
                    return Prometheus {
                        child,
                        addr,
                        _storage: storage,
                    };
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "prometheus did not become ready on {addr}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        panic!("prometheus failed to start five times");
    }

    /// `GET /api/v1/<path>`, parsed; panics unless the API reports success.
    async fn api(&self, path: &str) -> serde_json::Value {
        let response = get(self.addr, &format!("/api/v1/{path}")).await.unwrap();
        let value: serde_json::Value = serde_json::from_str(&response.body)
            .unwrap_or_else(|e| panic!("bad API answer to {path}: {e}: {}", response.body));
        assert_eq!(value["status"], "success", "{path}: {value}");
        value
    }

    /// The values of an instant query, one per series.
    async fn query(&self, promql: &str) -> Vec<f64> {
        let value = self
            .api(&format!("query?query={}", percent_encode(promql)))
            .await;
        value["data"]["result"]
            .as_array()
            .map(|series| {
                series
                    .iter()
                    .filter_map(|s| s["value"][1].as_str()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// How many series an instant query of `promql` returns, or Prometheus's error.
    async fn series(&self, promql: &str) -> Result<usize, String> {
        let path = format!("/api/v1/query?query={}", percent_encode(promql));
        let response = get(self.addr, &path).await.map_err(|e| e.to_string())?;
        let value: serde_json::Value =
            serde_json::from_str(&response.body).map_err(|e| format!("{e}: {}", response.body))?;
        if value["status"] != "success" {
            return Err(format!("{}: {}", value["errorType"], value["error"]));
        }
        Ok(value["data"]["result"].as_array().map_or(0, Vec::len))
    }

    /// Polls `promql` until it has exactly one series with value `expected`.
    async fn wait_for(&self, promql: &str, expected: f64) {
        let deadline = tokio::time::Instant::now() + WAIT * 2;
        loop {
            let values = self.query(promql).await;
            if values == [expected] {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "Prometheus: {promql} = {values:?}, expected [{expected}]"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn kill(mut self) {
        self.child.kill().await.unwrap();
    }
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn alerts_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../docker/prometheus/alerts.yml")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_server_and_agent() {
    let s = setup("").await;
    let config = s.pki.write_file(
        "prometheus.yml",
        &format!(
            "global: {{ scrape_interval: 250ms, evaluation_interval: 250ms }}\n\
             rule_files: [\"{}\"]\n\
             scrape_configs:\n\
             \x20 - job_name: tether-server\n\
             \x20   static_configs: [{{ targets: [\"{}\"] }}]\n\
             \x20 - job_name: tether-agent\n\
             \x20   static_configs: [{{ targets: [\"{}\"] }}]\n",
            alerts_file().display(),
            s.server.admin_addr,
            s.agent_admin,
        ),
    );
    let prometheus = Prometheus::start(&config).await;

    let opened = (REQUESTS + 1) as f64;
    let server_cert = not_after(s.pki.server_cert_path());
    for (promql, expected) in [
        ("up{job=\"tether-server\"}", 1.0),
        ("up{job=\"tether-agent\"}", 1.0),
        ("tether_agents_connected{job=\"tether-server\"}", 1.0),
        (
            "tether_sessions{job=\"tether-server\",client=\"edge-1\"}",
            1.0,
        ),
        ("tether_agent_connected{job=\"tether-agent\"}", 1.0),
        ("tether_streams_opened_total{job=\"tether-server\"}", opened),
        ("tether_streams_opened_total{job=\"tether-agent\"}", opened),
        (
            "sum(tether_streams_closed_total{job=\"tether-server\"})",
            opened,
        ),
        ("tether_streams_active{job=\"tether-server\"}", 0.0),
        (
            "tether_dial_errors_total{job=\"tether-server\",code=\"refused\"}",
            1.0,
        ),
        (
            "tether_tls_cert_expiry_timestamp_seconds{job=\"tether-server\",cert=\"server\"}",
            server_cert,
        ),
        ("count(tether_heap_allocated_bytes > 0)", 2.0),
        ("count(tether_runtime_alive_tasks > 0)", 2.0),
        ("count(process_open_fds > 0)", 2.0),
    ] {
        prometheus.wait_for(promql, expected).await;
    }

    // More traffic shows up in the next scrapes.
    for _ in 0..REQUESTS {
        request_through(s.server.forward_addrs[0]).await.unwrap();
    }
    let opened = (2 * REQUESTS + 1) as f64;
    prometheus
        .wait_for("tether_streams_opened_total{job=\"tether-server\"}", opened)
        .await;

    // The shipped alert rules load and evaluate cleanly against real series, and none fires.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let rules = prometheus.api("rules").await;
        let health: Vec<String> = rules["data"]["groups"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|g| g["rules"].as_array().unwrap().iter())
            .map(|r| format!("{}={}", r["name"], r["health"]))
            .collect();
        assert!(health.len() >= 8, "rules loaded: {health:?}");
        if health.iter().all(|h| h.ends_with("=\"ok\"")) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "rules not healthy: {health:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Nothing fires or stays pending (a scrape in the middle of traffic may see a stream
    // counted opened but not yet closed for one evaluation, so poll).
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let alerts = prometheus.query("ALERTS").await;
        if alerts.is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "alerts active: {}",
            prometheus.api("alerts").await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    prometheus.kill().await;
    s.agent.stop().await.unwrap();
    s.server.stop().await.unwrap();
}

fn recording_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../docker/prometheus/recording.yml")
}

fn dashboard_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../docker/grafana/dashboards/tether.json")
}

/// Every PromQL expression of the dashboard, with Grafana's variables replaced by what "All"
/// and the default interval give (`$instance` -> `.+`, `$__rate_interval` -> `1m`); the
/// `instance` variable's `label_values(selector, label)` contributes its selector.
fn dashboard_expressions() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(dashboard_file()).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    let grafana = |expr: &str| {
        expr.replace("$instance", ".+")
            .replace("$__rate_interval", "1m")
    };
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap();
            let title = panel["title"].as_str().unwrap();
            out.push((format!("dashboard panel {title:?}"), grafana(expr)));
        }
    }
    for variable in dashboard["templating"]["list"].as_array().unwrap() {
        if let Some(query) = variable["query"]["query"].as_str() {
            let inner = query
                .strip_prefix("label_values(")
                .and_then(|q| q.rsplit_once(','))
                .map(|(selector, _)| selector.to_owned())
                .unwrap_or_else(|| panic!("unexpected variable query {query}"));
            out.push((format!("dashboard variable {}", variable["name"]), inner));
        }
    }
    out
}

/// The series selectors of a PromQL expression: each tether, process or `up` metric name
/// (recording rule names included) with its `{...}` matchers. Label names, strings and
/// function names are skipped. Enough for the expressions this repository ships.
fn selectors(expr: &str) -> Vec<String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    let mut depth = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '"' {
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
            continue;
        }
        if c == '{' {
            depth += 1;
        } else if c == '}' {
            depth -= 1;
        }
        let ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
        if depth == 0 && ident(c) && (i == 0 || !ident(chars[i - 1])) {
            let start = i;
            while i < chars.len() && ident(chars[i]) {
                i += 1;
            }
            let name: String = chars[start..i].iter().collect();
            let wanted = name.contains("tether_") || name.starts_with("process_") || name == "up";
            let mut j = i;
            while j < chars.len() && chars[j] == ' ' {
                j += 1;
            }
            if wanted && chars.get(j) != Some(&'(') {
                let mut selector = name;
                if chars.get(j) == Some(&'{') {
                    let close = matchers_end(&chars, j);
                    selector.extend(&chars[j..=close]);
                    i = close + 1;
                }
                out.push(selector);
            }
            continue;
        }
        i += 1;
    }
    out
}

/// The index of the `}` closing the matchers that open at `open`, past quoted values.
fn matchers_end(chars: &[char], open: usize) -> usize {
    let mut k = open;
    let mut quoted = false;
    while k < chars.len() {
        match chars[k] {
            '\\' if quoted => k += 1,
            '"' => quoted = !quoted,
            '}' if !quoted => return k,
            _ => {}
        }
        k += 1;
    }
    panic!("unclosed matchers in {}", chars.iter().collect::<String>());
}

#[test]
fn selectors_are_extracted() {
    assert_eq!(
        selectors(
            "sum by (job, instance) (rate(tether_x_total{a=\"b\", c=~\"d|{e}\"}[5m])) \
             - on (job) instance:tether_y:rate5m > 0 and up{job=~\"t\"} offset 6h"
        ),
        [
            "tether_x_total{a=\"b\", c=~\"d|{e}\"}",
            "instance:tether_y:rate5m",
            "up{job=~\"t\"}"
        ]
    );
}

/// The dashboard's and the rules' expressions against a real Prometheus that scraped a server
/// and an agent carrying traffic. Dashboard panels and recording rules must return series;
/// alert rules (conditions, empty while nothing is wrong) must evaluate without error and
/// every series they select must exist. Series that exist only after a failure are provoked
/// before Prometheus starts:
/// - `tether_dial_errors_total{code="refused"}` (dial errors panel, its recording rule): a
///   forward to a closed port (in `setup`);
/// - `tether_frontend_refusals_total > 0` (frontend refusals panel): a CONNECT without
///   credentials;
/// - `tether_tls_handshake_failures_total`: garbage on the tunnel port;
/// - `tether_auth_failures_total`: an agent outside `allowed_agents`;
/// - `tether_config_reloads_total` moves: a reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_and_rule_expression_returns_series() {
    let pki = TestPki::new();
    let audit = pki.dir().join("audit.jsonl");
    let extra = format!(
        "allowed_agents: [edge-1]\n\
         health: {{ interval: 200ms, timeout: 1s }}\n\
         audit_log: {{ output: file, path: \"{}\" }}\n\
         frontends: {{ http_connect_listen: \"127.0.0.1:0\" }}\n",
        audit.display()
    );
    let s = setup_with(pki, &extra).await;

    // Failures that some series need.
    let mut garbage = tokio::net::TcpStream::connect(s.server.tunnel_addr)
        .await
        .unwrap();
    garbage.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    let stranger = TestAgent::start(
        &s.pki,
        &s.pki.agent("edge-2"),
        s.server.tunnel_addr,
        &allow_only(s._http.addr),
        "",
    )
    .await;
    tether_testkit::eventually("a TLS failure and a refused agent counted", || {
        tether_testkit::metrics::metric_sum(
            &s.server.registry,
            "tether_tls_handshake_failures_total",
            &[],
        ) >= 1.0
            && metric(
                &s.server.registry,
                "tether_auth_failures_total",
                &[("reason", "not_allowed")],
            )
            .is_some()
    })
    .await;
    drop(garbage);
    let current = s.server.reloader.current();
    s.server.reloader.reload(current).await.unwrap();
    tether_testkit::eventually("audit lines written", || {
        std::fs::read_to_string(&audit).is_ok_and(|t| t.lines().count() > REQUESTS)
    })
    .await;
    tether_testkit::eventually("a health probe measured the RTT", || {
        metric(
            &s.server.registry,
            "tether_session_rtt_seconds",
            &[("client", "edge-1")],
        )
        .is_some()
    })
    .await;

    let config = s.pki.write_file(
        "prometheus-all.yml",
        &format!(
            "global: {{ scrape_interval: 200ms, evaluation_interval: 200ms }}\n\
             rule_files: [\"{}\", \"{}\"]\n\
             scrape_configs:\n\
             \x20 - job_name: tether-server\n\
             \x20   static_configs: [{{ targets: [\"{}\"] }}]\n\
             \x20 - job_name: tether-agent\n\
             \x20   static_configs: [{{ targets: [\"{}\"] }}]\n",
            alerts_file().display(),
            recording_file().display(),
            s.server.admin_addr,
            s.agent_admin,
        ),
    );
    let prometheus = Prometheus::start(&config).await;
    // Traffic while Prometheus scrapes, so that rates see it, and a refused consumer (the
    // refusals panel shows only rates above 0), after a first scrape of both daemons.
    prometheus
        .wait_for("count(up{job=~\"tether-server|tether-agent\"} == 1)", 2.0)
        .await;
    for _ in 0..REQUESTS {
        request_through(s.server.forward_addrs[0]).await.unwrap();
    }
    let proxy = s.server.http_connect_addr.unwrap();
    let mut consumer = tokio::net::TcpStream::connect(proxy).await.unwrap();
    consumer
        .write_all(b"CONNECT 127.0.0.1:9 HTTP/1.1\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut consumer, &mut answer)
        .await
        .unwrap();
    assert!(answer.starts_with(b"HTTP/1.1 407"));

    // The rules as Prometheus loaded them.
    let rules = prometheus.api("rules").await;
    let rules: Vec<serde_json::Value> = rules["data"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap().clone())
        .collect();
    let alerts = rules.iter().filter(|r| r["type"] == "alerting").count();
    let recordings = rules.iter().filter(|r| r["type"] == "recording").count();
    assert!(
        alerts >= 11 && recordings >= 11,
        "{alerts} alerts, {recordings} recordings"
    );

    let mut must_have_series: Vec<(String, String)> = dashboard_expressions();
    let mut must_evaluate: Vec<(String, String)> = Vec::new();
    for rule in &rules {
        let name = rule["name"].as_str().unwrap();
        let query = rule["query"].as_str().unwrap().to_owned();
        if rule["type"] == "recording" {
            must_have_series.push((format!("recording rule {name}"), query));
            must_have_series.push((format!("recorded series {name}"), name.to_owned()));
        } else {
            for selector in selectors(&query) {
                must_have_series.push((format!("alert {name} selects"), selector));
            }
            must_evaluate.push((format!("alert {name}"), query));
        }
    }
    for (what, expr) in dashboard_expressions() {
        for selector in selectors(&expr) {
            must_have_series.push((format!("{what} selects"), selector));
        }
    }
    assert!(must_have_series.len() > 80, "{}", must_have_series.len());

    // Rates need two scrapes and rules an evaluation after them: poll until everything has
    // series, then report what still has none.
    let deadline = tokio::time::Instant::now() + WAIT * 2;
    let failures = loop {
        let mut failures = Vec::new();
        for (what, expr) in &must_have_series {
            match prometheus.series(expr).await {
                Ok(0) => failures.push(format!("{what}: no series for {expr}")),
                Ok(_) => {}
                Err(err) => failures.push(format!("{what}: {expr}: {err}")),
            }
        }
        for (what, expr) in &must_evaluate {
            if let Err(err) = prometheus.series(expr).await {
                failures.push(format!("{what}: {expr}: {err}"));
            }
        }
        if failures.is_empty() || tokio::time::Instant::now() >= deadline {
            break failures;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // And Prometheus evaluated every rule without an error.
    let rules = prometheus.api("rules").await;
    for rule in rules["data"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
    {
        assert_eq!(rule["health"], "ok", "{rule}");
    }

    prometheus.kill().await;
    stranger.kill().await;
    s.agent.stop().await.unwrap();
    s.server.stop().await.unwrap();
}
