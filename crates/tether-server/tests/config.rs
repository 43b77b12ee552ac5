//! `ServerConfig` parsing and validation: defaults, relative paths, parse errors with positions,
//! and every validation problem reported at once with its key path.

use std::time::Duration;

use tether_common::config_error::ConfigLoadError;
use tether_common::identity::IdentityMode;
use tether_server::ServerConfig;
use tether_testkit::TestPki;

/// The TestPki's files, named relative to its directory (resolved against `base_dir`).
const TLS_YAML: &str = "tls: { cert: server.pem, key: server-key.pem, client_ca: ca.pem }\n";

fn invalid(err: ConfigLoadError) -> Vec<(String, String)> {
    match err {
        ConfigLoadError::Invalid { errors, .. } => {
            errors.0.into_iter().map(|e| (e.path, e.message)).collect()
        }
        other => panic!("expected validation errors, got {other}"),
    }
}

#[test]
fn full_example_parses_and_relative_paths_resolve() {
    let pki = TestPki::new();
    let yaml = format!(
        r#"
version: 1
listen: "127.0.0.1:8443"
admin_listen: "127.0.0.1:9090"
{}identity: dns_san
allowed_agents: [edge-1, edge-2]
handshake_timeout: 5s
max_pending_handshakes: 10
max_agents: 20
dial_timeout: 3s
drain_timeout: 1m
session: {{ window: 131072, ping_interval: 10s, idle_timeout: 30s }}
forwards:
  - {{ name: db, listen: "127.0.0.1:15432", client: edge-1, target: "db.internal:5432" }}
  - {{ name: v6, listen: "[::1]:0", client: edge-2, target: "tcp/[fd00::1]:22" }}
"#,
        TLS_YAML
    );
    let config = ServerConfig::parse(&yaml, "server.yaml", pki.dir()).unwrap();
    assert_eq!(config.tls.cert, pki.server_cert_path());
    assert_eq!(config.tls.client_ca, pki.ca_path());
    assert_eq!(config.identity, IdentityMode::DnsSan);
    assert_eq!(config.handshake_timeout.0, Duration::from_secs(5));
    assert_eq!(config.drain_timeout.0, Duration::from_secs(60));
    assert_eq!(config.forwards.len(), 2);
    let mux = config.to_mux_config();
    assert_eq!(mux.window, 131072);
    assert_eq!(mux.dial_timeout, Duration::from_secs(3));
    assert_eq!(mux.ping_interval, Duration::from_secs(10));
    assert_eq!(mux.max_data, 64 * 1024);
}

#[test]
fn defaults_apply_to_an_almost_empty_file() {
    let pki = TestPki::new();
    let config = ServerConfig::parse(TLS_YAML, "server.yaml", pki.dir()).unwrap();
    assert_eq!(config.listen, "0.0.0.0:8443");
    assert_eq!(config.admin_listen, "127.0.0.1:9090");
    assert_eq!(config.max_agents, 10_000);
    assert_eq!(config.max_pending_handshakes, 1024);
    assert_eq!(config.handshake_timeout.0, Duration::from_secs(10));
    assert_eq!(config.identity, IdentityMode::UriSan);
    assert!(config.forwards.is_empty());
}

#[test]
fn unknown_key_is_a_parse_error_naming_it() {
    let pki = TestPki::new();
    let yaml = format!("{}max_agent: 5\n", TLS_YAML);
    let err = ServerConfig::parse(&yaml, "server.yaml", pki.dir()).unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, ConfigLoadError::Parse { line: Some(2), .. }),
        "{text}"
    );
    assert!(text.contains("unknown field `max_agent`"), "{text}");

    let yaml = format!(
        "{}forwards: [{{ name: a, listen: x, client: c, target: t, port: 1 }}]\n",
        TLS_YAML
    );
    let text = ServerConfig::parse(&yaml, "server.yaml", pki.dir())
        .unwrap_err()
        .to_string();
    assert!(text.contains("unknown field `port`"), "{text}");
    assert!(text.contains("forwards[0]"), "{text}");
}

#[test]
fn bad_duration_is_a_parse_error_naming_the_key() {
    let pki = TestPki::new();
    let yaml = format!("{}dial_timeout: 10 parsecs\n", TLS_YAML);
    let err = ServerConfig::parse(&yaml, "server.yaml", pki.dir()).unwrap_err();
    let text = err.to_string();
    assert!(text.starts_with("server.yaml:2:"), "{text}");
    assert!(text.contains("dial_timeout"), "{text}");
    assert!(text.contains("unknown unit"), "{text}");
}

#[test]
fn every_validation_error_is_reported_with_its_key_path() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = r#"
version: 2
listen: "localhost:8443"
tls: { cert: missing.pem, key: server-key.pem, client_ca: /nonexistent/ca.pem, crls: [gone.pem] }
allowed_agents: [edge-1, "bad id"]
handshake_timeout: 0s
max_agents: 0
session: { idle_timeout: 5s, ping_interval: 10s }
forwards:
  - { name: db, listen: "127.0.0.1:15432", client: edge-1, target: "db.internal" }
  - { name: db, listen: "127.0.0.1:15432", client: edge-7, target: "db.internal:99999" }
  - { name: "x y", listen: "nope", client: "a/b", target: "udp/x:1" }
"#;
    let errors = invalid(ServerConfig::parse(yaml, "server.yaml", dir.path()).unwrap_err());
    let paths: Vec<&str> = errors.iter().map(|(p, _)| p.as_str()).collect();
    for expected in [
        "version",
        "listen",
        "tls.cert",
        "tls.key",
        "tls.client_ca",
        "tls.crls[0]",
        "allowed_agents[1]",
        "handshake_timeout",
        "max_agents",
        "session.idle_timeout",
        "forwards[0].target",
        "forwards[1].name",
        "forwards[1].listen",
        "forwards[1].client",
        "forwards[1].target",
        "forwards[2].name",
        "forwards[2].listen",
        "forwards[2].client",
        "forwards[2].target",
    ] {
        assert!(
            paths.contains(&expected),
            "{expected} missing from {errors:#?}"
        );
    }
    let message = |path: &str| {
        errors
            .iter()
            .find(|(p, _)| p == path)
            .map(|(_, m)| m.clone())
            .unwrap()
    };
    // Missing files name the resolved path.
    let cert = message("tls.cert");
    assert!(
        cert.contains(&dir.path().join("missing.pem").display().to_string()),
        "{cert}"
    );
    assert!(message("tls.client_ca").contains("/nonexistent/ca.pem"));
    assert!(message("forwards[0].target").contains("missing :port"));
    assert!(message("forwards[1].client").contains("allowed_agents"));
    assert!(message("forwards[1].name").contains("forwards[0]"));
}

#[test]
fn load_reads_a_file_relative_to_its_directory() {
    let pki = TestPki::new();
    let path = pki.write_file("server.yaml", TLS_YAML);
    let config = ServerConfig::load(&path).unwrap();
    assert_eq!(config.tls.key, pki.server_key_path());
    let missing = pki.dir().join("absent.yaml");
    assert!(matches!(
        ServerConfig::load(&missing),
        Err(ConfigLoadError::Read { .. })
    ));
}

#[test]
fn frontend_errors_are_reported_with_their_key_paths() {
    let pki = TestPki::new();
    let hash = "d9310c002af91822beb0b3487d8b04f85bf6bf1f8a5496bff7d35fc7c5a29def";
    let yaml = format!(
        r#"{TLS_YAML}frontends:
  http_connect_listen: "127.0.0.1:3128"
  socks5_listen: "127.0.0.1:3128"
  handshake_timeout: 0s
  max_connections: 0
  consumers:
    - {{ name: ops, token_sha256: "{hash}", clients: [edge-1] }}
    - {{ name: ops, token_sha256: "{hash}", clients: [] }}
    - {{ name: "bad name", token_sha256: "abc", clients: ["edge/1"] }}
  anonymous_clients: ["", "ok-*"]
"#
    );
    let errors = invalid(ServerConfig::parse(&yaml, "server.yaml", pki.dir()).unwrap_err());
    let message = |path: &str| {
        errors
            .iter()
            .find(|(p, _)| p == path)
            .map(|(_, m)| m.clone())
            .unwrap_or_else(|| panic!("{path} missing from {errors:#?}"))
    };
    assert!(message("frontends.socks5_listen").contains("http_connect_listen"));
    assert!(message("frontends.handshake_timeout").contains("above zero"));
    assert!(message("frontends.max_connections").contains("at least 1"));
    assert!(message("frontends.consumers[1].name").contains("consumers[0]"));
    assert!(message("frontends.consumers[1].token_sha256").contains("consumers[0]"));
    assert!(message("frontends.consumers[1].clients").contains("at least one"));
    assert!(message("frontends.consumers[2].name").contains("bad name"));
    assert!(message("frontends.consumers[2].token_sha256").contains("64 hex digits"));
    assert!(message("frontends.consumers[2].clients[0]").contains("edge/1"));
    assert!(message("frontends.anonymous_clients[0]").contains("empty"));
    assert_eq!(errors.len(), 10, "{errors:#?}");
    // The hash stays out of Debug output all the same.
    let ok = format!(
        "{TLS_YAML}frontends: {{ consumers: [{{ name: ops, token_sha256: \"{hash}\", clients: [\"*\"] }}] }}\n"
    );
    let config = ServerConfig::parse(&ok, "server.yaml", pki.dir()).unwrap();
    assert!(!format!("{config:?}").contains(hash));
    assert_eq!(config.frontends.http_connect_addr().unwrap(), None);
}

#[test]
fn allow_without_client_cert_needs_the_token_and_the_tunnel_id_header() {
    use tether_common::tls::ClientCertPolicy;
    let pki = TestPki::new();
    let default = ServerConfig::parse(TLS_YAML, "server.yaml", pki.dir()).unwrap();
    assert!(!default.remotedialer.allow_without_client_cert);
    assert_eq!(default.client_cert_policy(), ClientCertPolicy::Required);

    let alone = format!("{TLS_YAML}remotedialer: {{ allow_without_client_cert: true }}\n");
    let errors = invalid(ServerConfig::parse(&alone, "server.yaml", pki.dir()).unwrap_err());
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert_eq!(errors[0].0, "remotedialer.allow_without_client_cert");
    assert!(
        errors[0].1.contains("needs remotedialer.token_file"),
        "{errors:#?}"
    );

    pki.write_file("rd-token", "s3cret\n");
    let no_header = format!(
        "{TLS_YAML}remotedialer: {{ allow_without_client_cert: true, token_file: rd-token, \
         tunnel_id_header: \"\", enabled: false }}\n"
    );
    let errors = invalid(ServerConfig::parse(&no_header, "server.yaml", pki.dir()).unwrap_err());
    let messages: Vec<&str> = errors
        .iter()
        .filter(|(p, _)| p == "remotedialer.allow_without_client_cert")
        .map(|(_, m)| m.as_str())
        .collect();
    assert_eq!(messages.len(), 2, "{errors:#?}");
    assert!(
        messages[0].contains("remotedialer.enabled: true"),
        "{errors:#?}"
    );
    assert!(
        messages[1].contains("remotedialer.tunnel_id_header"),
        "{errors:#?}"
    );

    let ok = format!(
        "{TLS_YAML}remotedialer: {{ allow_without_client_cert: true, token_file: rd-token }}\n"
    );
    let config = ServerConfig::parse(&ok, "server.yaml", pki.dir()).unwrap();
    assert_eq!(config.client_cert_policy(), ClientCertPolicy::Optional);
}

#[test]
fn audit_log_section_resolves_its_path_and_is_validated() {
    let pki = TestPki::new();
    let config = ServerConfig::parse(TLS_YAML, "server.yaml", pki.dir()).unwrap();
    assert_eq!(config.audit_log.output, tether_server::AuditOutput::Off);
    let yaml = format!("{TLS_YAML}audit_log: {{ output: file, path: audit.jsonl, queue: 16 }}\n");
    let config = ServerConfig::parse(&yaml, "server.yaml", pki.dir()).unwrap();
    assert_eq!(config.audit_log.output, tether_server::AuditOutput::File);
    assert_eq!(config.audit_log.path, pki.dir().join("audit.jsonl"));
    assert_eq!(config.audit_log.queue, 16);

    let yaml = format!("{TLS_YAML}audit_log: {{ output: file, queue: 0 }}\n");
    let err = ServerConfig::parse(&yaml, "server.yaml", pki.dir()).unwrap_err();
    let errors = invalid(err);
    assert!(
        errors
            .iter()
            .any(|(p, m)| p == "audit_log.path" && m.contains("required")),
        "{errors:?}"
    );
    assert!(
        errors
            .iter()
            .any(|(p, m)| p == "audit_log.queue" && m.contains("outside")),
        "{errors:?}"
    );
    let yaml = format!("{TLS_YAML}audit_log: {{ output: syslog }}\n");
    let err = ServerConfig::parse(&yaml, "server.yaml", pki.dir()).unwrap_err();
    assert!(err.to_string().contains("syslog"), "{err}");
}
