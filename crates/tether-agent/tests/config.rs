//! agent.yaml parsing and validation: defaults, unknown keys, bad URLs, and every error
//! reported at once with its key path.

// Helpers outside #[test] functions panic on failure too; that is what a test wants.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use tether_agent::AgentConfig;
use tether_common::config_error::{ConfigErrors, ConfigLoadError, parse_yaml};
use tether_testkit::TestPki;

fn parse(yaml: &str) -> Result<AgentConfig, ConfigLoadError> {
    parse_yaml(yaml, "agent.yaml")
}

/// Parses, resolves against `dir` and validates.
fn load(yaml: &str, dir: &Path) -> Result<AgentConfig, ConfigErrors> {
    let mut config = parse(yaml).expect("parses");
    config.resolve_paths(dir);
    config.validate().map(|()| config)
}

fn paths(errors: &ConfigErrors) -> Vec<&str> {
    errors.0.iter().map(|e| e.path.as_str()).collect()
}

fn valid_yaml(pki: &TestPki) -> String {
    let agent = pki.agent("edge-1");
    format!(
        "version: 1\n\
         server_url: \"wss://tether.example.com:8443/v1/connect\"\n\
         tls: {{ cert: {}, key: {}, server_ca: ca.pem }}\n",
        agent.cert_path.file_name().unwrap().to_str().unwrap(),
        agent.key_path.file_name().unwrap().to_str().unwrap(),
    )
}

#[test]
fn a_minimal_config_is_valid_with_defaults() {
    let pki = TestPki::new();
    let config = load(&valid_yaml(&pki), pki.dir()).unwrap();
    assert_eq!(config.tls.server_ca, pki.dir().join("ca.pem"));
    assert_eq!(config.admin_listen, "127.0.0.1:9091");
    assert_eq!(config.connect_timeout.to_string(), "10s");
    assert_eq!(config.dial_timeout.to_string(), "10s");
    assert_eq!(config.reconnect.min_delay.to_string(), "500ms");
    assert_eq!(config.reconnect.max_delay.to_string(), "1m");
    assert_eq!(config.reconnect.reset_after.to_string(), "30s");
    assert!(config.policy.allow.is_empty(), "deny by default");
    assert!(config.labels.is_empty());
    assert_eq!(config.to_mux_config().window, 256 * 1024);
}

#[test]
fn the_full_example_parses() {
    let pki = TestPki::new();
    let yaml = format!(
        "{}server_name: tether.example.com\n\
         labels: {{ role: upstream, cluster: eu-1 }}\n\
         admin_listen: \"\"\n\
         connect_timeout: 5s\n\
         reconnect: {{ min_delay: 100ms, max_delay: 30s, reset_after: 1m }}\n\
         dial_timeout: 3s\n\
         session: {{ window: 131072, max_frame: 32768, max_streams: 64, ping_interval: 10s, idle_timeout: 30s, sync_interval: 1m }}\n\
         policy:\n  allow:\n    - {{ hosts: [\"*.internal\"], ports: [443, \"8000-8100\"] }}\n    - {{ cidrs: [\"10.0.0.0/8\"] }}\n",
        valid_yaml(&pki)
    );
    let config = load(&yaml, pki.dir()).unwrap();
    assert_eq!(config.admin_addr(), None);
    assert_eq!(config.labels_header(), "cluster=eu-1,role=upstream");
    let mux = config.to_mux_config();
    assert_eq!(mux.max_data, 32768);
    assert_eq!(mux.max_streams, 64);
    assert_eq!(mux.dial_timeout, std::time::Duration::from_secs(3));
}

#[test]
fn every_error_is_reported_with_its_path() {
    let pki = TestPki::new();
    let yaml = "version: 2\n\
                server_url: \"ws://tether.example.com/v1/connect\"\n\
                tls: { cert: missing.pem, key: missing-key.pem, server_ca: ca.pem }\n\
                labels: { \"bad key\": ok, role: \"a,b\" }\n\
                admin_listen: \"localhost\"\n\
                connect_timeout: 0s\n\
                dial_timeout: 10m\n\
                reconnect: { min_delay: 5s, max_delay: 1s, reset_after: 0s }\n\
                session: { window: 10, idle_timeout: 1s, ping_interval: 5s }\n\
                policy: { allow: [ { cidrs: [\"10.0.0.0/33\"] }, { ports: [\"80\"] } ] }\n";
    let errors = load(yaml, pki.dir()).unwrap_err();
    let got = paths(&errors);
    for expected in [
        "version",
        "server_url",
        "tls.cert",
        "tls.key",
        "labels.bad key",
        "labels.role",
        "admin_listen",
        "connect_timeout",
        "dial_timeout",
        "reconnect.max_delay",
        "reconnect.reset_after",
        "session.window",
        "session.idle_timeout",
        "policy.allow[0].cidrs[0]",
        "policy.allow[1]",
    ] {
        assert!(got.contains(&expected), "{expected} missing from {got:?}");
    }
    // ca.pem exists: no error for it.
    assert!(!got.contains(&"tls.server_ca"), "{got:?}");
    let text = errors.to_string();
    assert!(text.contains("wss://"), "{text}");
}

#[test]
fn bad_urls_are_explained() {
    let pki = TestPki::new();
    let base = valid_yaml(&pki);
    for (url, needle) in [
        ("http://example.com/", "scheme"),
        ("ws://example.com/", "wss://"),
        ("wss:///v1/connect", "not a URL"),
        ("wss://:8443/v1/connect", "server_url"),
        ("example.com:8443", "wss://"),
        ("wss://example.com:0/", "port 0"),
    ] {
        let yaml = base.replace("wss://tether.example.com:8443/v1/connect", url);
        let errors = load(&yaml, pki.dir()).unwrap_err();
        assert_eq!(paths(&errors), ["server_url"], "{url}: {errors}");
        assert!(errors.to_string().contains(needle), "{url}: {errors}");
    }
    let yaml = format!("{base}server_name: \"not a name!\"\n");
    let errors = load(&yaml, pki.dir()).unwrap_err();
    assert_eq!(paths(&errors), ["server_name"], "{errors}");
}

#[test]
fn unknown_keys_are_parse_errors_naming_the_key() {
    let pki = TestPki::new();
    for (extra, key) in [
        ("sever_url: x\n", "sever_url"),
        ("reconnect: { min: 1s }\n", "min"),
        ("tls2: {}\n", "tls2"),
        (
            "policy: { allow: [ { cidr: [\"10.0.0.0/8\"] } ] }\n",
            "cidr",
        ),
        ("session: { windows: 1 }\n", "windows"),
    ] {
        let yaml = format!("{}{extra}", valid_yaml(&pki));
        let err = parse(&yaml).unwrap_err();
        let text = err.to_string();
        assert!(text.contains(&format!("unknown field `{key}`")), "{text}");
        assert!(text.starts_with("agent.yaml:"), "{text}");
    }
}

#[test]
fn server_url_or_servers_is_required_and_not_both() {
    let pki = TestPki::new();
    let valid = valid_yaml(&pki);
    let without_url: String = valid
        .lines()
        .filter(|l| !l.starts_with("server_url:"))
        .map(|l| format!("{l}\n"))
        .collect();
    let errors = load(&without_url, pki.dir()).unwrap_err();
    assert_eq!(paths(&errors), ["server_url"], "{errors}");
    assert!(errors.to_string().contains("servers"), "{errors}");

    let both = format!("{valid}servers: [\"wss://a.example:8443/v1/connect\"]\n");
    let errors = load(&both, pki.dir()).unwrap_err();
    assert_eq!(paths(&errors), ["servers"], "{errors}");

    let list = format!(
        "{without_url}servers: [\"wss://a.example:8443/v1/connect\", \"ws://b.example/v1/connect\"]\n"
    );
    let errors = load(&list, pki.dir()).unwrap_err();
    assert_eq!(paths(&errors), ["servers[1]"], "{errors}");

    let ok = format!(
        "{without_url}servers: [\"wss://a.example:8443/v1/connect\", \"wss://10.0.0.2:8443/v1/connect\"]\n\
         discovery: {{ interval: 5s, min_connected: 2 }}\n"
    );
    let config = load(&ok, pki.dir()).unwrap();
    assert_eq!(config.urls().len(), 2);
    assert_eq!(config.discovery.min_connected, 2);

    let bad = format!("{valid}discovery: {{ interval: 0s, min_connected: 0 }}\n");
    let errors = load(&bad, pki.dir()).unwrap_err();
    assert_eq!(
        paths(&errors),
        ["discovery.interval", "discovery.min_connected"],
        "{errors}"
    );
}

#[test]
fn tls_material_that_does_not_load_is_an_error() {
    let pki = TestPki::new();
    pki.write_file("garbage.pem", "not a certificate\n");
    let yaml = valid_yaml(&pki).replace("server_ca: ca.pem", "server_ca: garbage.pem");
    let errors = load(&yaml, pki.dir()).unwrap_err();
    assert_eq!(paths(&errors), ["tls"], "{errors}");
}
