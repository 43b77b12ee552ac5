//! Integration tests of the `tether` binary: certs, check-config (and config/*.yaml), demo, --version.

// Test helpers panic on failure by design.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_tether");
/// Exit code of `check-config` (and the daemons) for an invalid configuration.
const EXIT_CONFIG: i32 = 2;

/// What one run of the binary produced.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn from_output(output: Output) -> Run {
        Run {
            code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    #[track_caller]
    fn assert_code(&self, code: i32) -> &Run {
        assert_eq!(self.code, Some(code), "unexpected exit code\n{self}");
        self
    }
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit code: {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Runs `tether ARGS` to completion, with logs kept quiet and no inherited `TETHER_*` settings.
fn tether<I, S>(args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let output = Command::new(BIN)
        .args(args)
        .env_remove("TETHER_CONFIG")
        .env_remove("TETHER_LOG_FORMAT")
        .env("TETHER_LOG", "warn")
        .output()
        .expect("running the tether binary");
    Run::from_output(output)
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// The checked-in example config `config/<name>`.
fn example_config(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../config")
        .join(name)
}

/// A temp dir with `tether certs init` + `certs issue --agent edge-1` done in it.
fn pki_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    tether(["certs", "init", "--dir", d]).assert_code(0);
    tether(["certs", "issue", "--dir", d, "--agent", "edge-1"]).assert_code(0);
    dir
}

/// Writes `text` as `name` into `dir` and returns its path.
fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

// === certs ===

#[test]
fn certs_init_writes_the_ca_and_server_files_with_private_keys() {
    let tmp = tempfile::tempdir().unwrap();
    // `--dir` is created when missing.
    let dir = tmp.path().join("pki");
    let run = tether(["certs", "init", "--dir", dir.to_str().unwrap()]);
    run.assert_code(0);
    for (file, expected_mode) in [
        ("ca.pem", None),
        ("ca-key.pem", Some(0o600)),
        ("server.pem", None),
        ("server-key.pem", Some(0o600)),
    ] {
        let path = dir.join(file);
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e}\n{run}", path.display()));
        assert!(text.starts_with("-----BEGIN "), "{file} is not PEM");
        if let Some(expected) = expected_mode {
            assert_eq!(mode(&path), expected, "mode of {file}");
        }
        assert!(run.stdout.contains(file), "output lists {file}\n{run}");
    }
}

#[test]
fn certs_init_refuses_to_overwrite_an_existing_ca_key() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().to_str().unwrap();
    tether(["certs", "init", "--dir", d]).assert_code(0);
    let ca_key = tmp.path().join("ca-key.pem");
    let before = std::fs::read(&ca_key).unwrap();

    let run = tether(["certs", "init", "--dir", d]);
    assert_ne!(run.code, Some(0), "second init must fail\n{run}");
    assert!(
        run.stderr.contains("refusing to overwrite") && run.stderr.contains("ca-key.pem"),
        "the message says what was refused\n{run}"
    );
    assert_eq!(std::fs::read(&ca_key).unwrap(), before, "CA key unchanged");
    assert_eq!(mode(&ca_key), 0o600);
}

#[test]
fn certs_issue_writes_the_agent_files() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().to_str().unwrap();
    tether(["certs", "init", "--dir", d]).assert_code(0);
    let run = tether(["certs", "issue", "--dir", d, "--agent", "edge-1"]);
    run.assert_code(0);
    assert!(run.stdout.contains("tether://agent/edge-1"), "{run}");

    let cert = tmp.path().join("agent-edge-1.pem");
    let key = tmp.path().join("agent-edge-1-key.pem");
    assert!(
        std::fs::read_to_string(&cert)
            .unwrap()
            .starts_with("-----BEGIN CERTIFICATE-----")
    );
    assert!(
        std::fs::read_to_string(&key)
            .unwrap()
            .starts_with("-----BEGIN ")
    );
    assert_eq!(mode(&key), 0o600, "agent key mode");
}

#[test]
fn certs_issue_refuses_an_invalid_agent_id() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().to_str().unwrap();
    tether(["certs", "init", "--dir", d]).assert_code(0);
    let run = tether(["certs", "issue", "--dir", d, "--agent", "bad id!"]);
    assert_ne!(run.code, Some(0), "{run}");
    assert!(run.stderr.contains("bad id!"), "names the id\n{run}");
    assert!(
        run.stderr.contains("A-Z a-z 0-9 . _ -"),
        "names the rule for ids\n{run}"
    );
    let written: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("agent-"))
        .collect();
    assert!(written.is_empty(), "nothing written: {written:?}");
}

// === the example configs ===

#[test]
fn example_configs_pass_check_config() {
    let dir = pki_dir();
    for (name, kind, label) in [
        ("server.yaml", "server", "Server"),
        ("agent.yaml", "agent", "Agent"),
    ] {
        let copy = dir.path().join(name);
        std::fs::copy(example_config(name), &copy).unwrap();
        let copy = copy.to_str().unwrap();

        let run = tether(["check-config", copy]);
        run.assert_code(0);
        assert!(
            run.stdout.contains(&format!("valid {label} config")),
            "kind guessed from the keys\n{run}"
        );
        tether(["check-config", "--kind", kind, copy]).assert_code(0);
    }
}

/// Every key path of a YAML value (`a`, `a.b`, `list[].c`); map keys of free-form maps
/// (`labels`) are included, which is harmless for a subset check.
fn key_paths(value: &serde_yaml_ng::Value, prefix: &str, out: &mut BTreeSet<String>) {
    match value {
        serde_yaml_ng::Value::Mapping(map) => {
            for (key, value) in map {
                let key = key.as_str().expect("string keys");
                let path = if prefix.is_empty() {
                    key.to_owned()
                } else {
                    format!("{prefix}.{key}")
                };
                out.insert(path.clone());
                key_paths(value, &path, out);
            }
        }
        serde_yaml_ng::Value::Sequence(items) => {
            for item in items {
                key_paths(item, &format!("{prefix}[]"), out);
            }
        }
        _ => {}
    }
}

/// Asserts that the example file spells out every key that re-serializing it produces, i.e.
/// every field of the config structs (including those inside list entries).
fn assert_every_key_written<T>(name: &str)
where
    T: serde::de::DeserializeOwned + serde::Serialize,
{
    let text = std::fs::read_to_string(example_config(name)).unwrap();
    let raw: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).unwrap();
    let typed: T = serde_yaml_ng::from_str(&text).unwrap();
    let full = serde_yaml_ng::to_value(&typed).unwrap();
    let (mut written, mut all) = (BTreeSet::new(), BTreeSet::new());
    key_paths(&raw, "", &mut written);
    key_paths(&full, "", &mut all);
    let missing: Vec<_> = all.difference(&written).collect();
    assert!(
        missing.is_empty(),
        "config/{name} does not document these keys: {missing:?}"
    );
}

#[test]
fn server_yaml_header_lists_the_keys_applied_in_place() {
    let text = std::fs::read_to_string(example_config("server.yaml")).unwrap();
    let header: String = text
        .lines()
        .take_while(|l| l.starts_with('#'))
        .collect::<Vec<_>>()
        .join(" ");
    let list = header
        .split("Applied in place:")
        .nth(1)
        .and_then(|rest| rest.split("Every other key").next())
        .expect("the header says what a reload applies in place");
    for key in tether_server::reload::IN_PLACE_KEYS {
        assert!(list.contains(key), "header omits `{key}`: {list}");
    }
    assert!(
        !text.contains("Control::"),
        "no internal API names in the example"
    );
}

#[test]
fn certs_init_keeps_localhost_next_to_given_names() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().to_str().unwrap();
    let run = tether(["certs", "init", "--dir", d, "--dns", "tether.example.com"]);
    run.assert_code(0);
    assert!(
        run.stdout
            .contains("server certificate names: localhost, tether.example.com, 127.0.0.1"),
        "{run}"
    );
}

#[test]
fn example_configs_spell_out_every_key() {
    assert_every_key_written::<tether_server::ServerConfig>("server.yaml");
    assert_every_key_written::<tether_agent::AgentConfig>("agent.yaml");
}

// === invalid configs ===

const SERVER_OK: &str = "listen: \"127.0.0.1:8443\"\n";

#[test]
fn unknown_key_is_named_with_its_line() {
    let dir = pki_dir();
    let path = write(
        dir.path(),
        "server.yaml",
        &format!("{SERVER_OK}admin_listen: \"127.0.0.1:9090\"\nmax_agentz: 5\n"),
    );
    let run = tether(["check-config", path.to_str().unwrap()]);
    run.assert_code(EXIT_CONFIG);
    assert!(run.stderr.contains("`max_agentz`"), "names the key\n{run}");
    assert!(
        run.stderr.contains("server.yaml:3:"),
        "names file and line 3\n{run}"
    );

    // Nested, in the agent config.
    let path = write(
        dir.path(),
        "agent.yaml",
        "server_url: \"wss://localhost:8443/v1/connect\"\n\
         tls: {cert: agent-edge-1.pem, key: agent-edge-1-key.pem, server_ca: ca.pem}\n\
         reconnect:\n  min_delay: 1s\n  max_dealy: 2s\n",
    );
    let run = tether(["check-config", "--kind", "agent", path.to_str().unwrap()]);
    run.assert_code(EXIT_CONFIG);
    assert!(run.stderr.contains("`max_dealy`"), "names the key\n{run}");
    assert!(run.stderr.contains("agent.yaml:5:"), "line 5\n{run}");
}

#[test]
fn bad_duration_is_named_with_its_key_and_line() {
    let dir = pki_dir();
    let path = write(
        dir.path(),
        "server.yaml",
        &format!("{SERVER_OK}drain_timeout: 10 parsecs\n"),
    );
    let run = tether(["check-config", "--kind", "server", path.to_str().unwrap()]);
    run.assert_code(EXIT_CONFIG);
    assert!(run.stderr.contains("drain_timeout"), "names the key\n{run}");
    assert!(run.stderr.contains("10 parsecs"), "quotes the value\n{run}");
    assert!(run.stderr.contains("server.yaml:2:"), "line 2\n{run}");
}

/// Durations parsed by `HumanDuration`'s own `Deserialize` (the agent's top-level timeouts and
/// every `session.*` duration) lose the key and the line: the message is
/// `agent.yaml:1:1: `5x`: unknown unit ...`.
#[test]
fn bad_duration_in_agent_and_session_is_named_with_its_key_and_line() {
    let dir = pki_dir();
    let path = write(
        dir.path(),
        "agent.yaml",
        "server_url: \"wss://localhost:8443/v1/connect\"\n\
         tls: {cert: agent-edge-1.pem, key: agent-edge-1-key.pem, server_ca: ca.pem}\n\
         connect_timeout: 5x\n",
    );
    let run = tether(["check-config", "--kind", "agent", path.to_str().unwrap()]);
    run.assert_code(EXIT_CONFIG);
    assert!(
        run.stderr.contains("connect_timeout"),
        "names the key\n{run}"
    );
    assert!(run.stderr.contains("agent.yaml:3:"), "line 3\n{run}");

    let path = write(
        dir.path(),
        "server.yaml",
        &format!("{SERVER_OK}session:\n  window: 65536\n  ping_interval: 5x\n"),
    );
    let run = tether(["check-config", "--kind", "server", path.to_str().unwrap()]);
    run.assert_code(EXIT_CONFIG);
    assert!(
        run.stderr.contains("session.ping_interval"),
        "names the key\n{run}"
    );
    assert!(run.stderr.contains("server.yaml:4:"), "line 4\n{run}");
}

#[test]
fn server_validation_errors_are_reported_together() {
    let dir = pki_dir();
    let path = write(
        dir.path(),
        "server.yaml",
        "listen: \"127.0.0.1:8443\"\n\
         admin_listen: \"localhost:9090\"\n\
         tls:\n  cert: server.pem\n  key: no-such-key.pem\n  client_ca: ca.pem\n\
         forwards:\n\
         \x20 - {name: db, listen: \"127.0.0.1:15432\", client: edge-1, target: \"db.internal\"}\n\
         \x20 - {name: ssh, listen: \"127.0.0.1:15022\", client: edge-1, target: \"10.0.0.5:99999\"}\n",
    );
    let run = tether(["check-config", path.to_str().unwrap()]);
    run.assert_code(EXIT_CONFIG);
    for needle in [
        "`admin_listen`",
        "`tls.key`",
        "no-such-key.pem",
        "`forwards[0].target`",
        "`forwards[1].target`",
    ] {
        assert!(run.stderr.contains(needle), "reports {needle}\n{run}");
    }
    assert!(
        !run.stderr.contains("`tls.cert`"),
        "only bad keys are named\n{run}"
    );
}

#[test]
fn agent_validation_errors_are_reported_together() {
    let dir = pki_dir();
    let path = write(
        dir.path(),
        "agent.yaml",
        "server_url: \"ws://localhost:8443/v1/connect\"\n\
         tls: {cert: agent-edge-1.pem, key: agent-edge-1-key.pem, server_ca: missing-ca.pem}\n\
         connect_timeout: 0s\n\
         session: {window: 5}\n\
         policy:\n  allow:\n    - {cidrs: [\"10.0.0.0/33\"], ports: [\"22\"]}\n",
    );
    let run = tether(["check-config", path.to_str().unwrap()]);
    run.assert_code(EXIT_CONFIG);
    for needle in [
        "`server_url`",
        "`tls.server_ca`",
        "missing-ca.pem",
        "`connect_timeout`",
        "`session.window`",
        "`policy.allow[0].cidrs[0]`",
    ] {
        assert!(run.stderr.contains(needle), "reports {needle}\n{run}");
    }
}

/// One file, five different mistakes: all five are listed in one run, each with its line and
/// key path, in file order.
#[test]
fn check_config_lists_five_different_mistakes_at_once() {
    let dir = pki_dir();
    let path = write(
        dir.path(),
        "server.yaml",
        "listen: \"127.0.0.1:8443\"\n\
         admin_listen: \"localhost:9090\"\n\
         max_agnets: 5\n\
         max_pending_handshakes: lots\n\
         drain_timeout: 10 parsecs\n\
         tls:\n  cert: server.pem\n  key: no-such-key.pem\n\
         allowed_agents: edge-1\n",
    );
    let run = tether(["check-config", path.to_str().unwrap()]);
    run.assert_code(EXIT_CONFIG);
    let file = path.display().to_string();
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert!(
        lines[0].ends_with("server.yaml: 6 problems:"),
        "a count first\n{run}"
    );
    let expected = [
        (2, "`admin_listen`", "localhost:9090"),
        (3, "`max_agnets`", "did you mean `max_agents`?"),
        (4, "`max_pending_handshakes`", "expected a whole number"),
        (5, "`drain_timeout`", "10 parsecs"),
        (8, "`tls.key`", "no-such-key.pem"),
        (9, "`allowed_agents`", "expected a list"),
    ];
    for (i, (line, key, words)) in expected.iter().enumerate() {
        let got = lines.get(i + 1).copied().unwrap_or_default();
        assert!(
            got.starts_with(&format!("{file}:{line}:")) && got.contains(key) && got.contains(words),
            "line {} of the report should name {key} at line {line} with `{words}`\n{run}",
            i + 2
        );
    }
    // The missing file is named by the path that was tried (the config's directory).
    let tried = dir.path().join("no-such-key.pem");
    assert!(
        run.stderr.contains(&tried.display().to_string()),
        "resolved path\n{run}"
    );
}

#[test]
fn duplicate_keys_are_errors() {
    let dir = pki_dir();
    let cases = [
        (
            "server",
            "listen: \"127.0.0.1:8443\"\nlisten: \"127.0.0.1:8444\"\n",
            "`listen`",
        ),
        (
            "server",
            "listen: \"127.0.0.1:8443\"\ntls:\n  cert: server.pem\n  cert: other.pem\n",
            "`cert`",
        ),
        (
            "agent",
            "server_url: \"wss://localhost:8443/v1/connect\"\n\
             tls: {cert: agent-edge-1.pem, key: agent-edge-1-key.pem, server_ca: ca.pem}\n\
             labels: {site: a, site: b}\n",
            "`site`",
        ),
    ];
    for (kind, text, key) in cases {
        let path = write(dir.path(), &format!("{kind}.yaml"), text);
        let run = tether(["check-config", "--kind", kind, path.to_str().unwrap()]);
        run.assert_code(EXIT_CONFIG);
        assert!(
            run.stderr.contains("duplicate key") && run.stderr.contains(key),
            "names the duplicate {key}\n{run}"
        );
    }
}

/// Without `--kind`, a duplicate key makes the kind guess fail and the message hides the real
/// problem (`cannot tell whether this is a server or an agent config`).
#[test]
fn duplicate_key_is_reported_without_kind() {
    let dir = pki_dir();
    let path = write(
        dir.path(),
        "server.yaml",
        "listen: \"127.0.0.1:8443\"\nlisten: \"127.0.0.1:8444\"\n",
    );
    let run = tether(["check-config", path.to_str().unwrap()]);
    run.assert_code(EXIT_CONFIG);
    assert!(run.stderr.contains("duplicate key `listen`"), "{run}");
}

// === demo and version ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_once_moves_bytes_exactly() {
    let child = tokio::process::Command::new(BIN)
        .args(["demo", "--once", "--bytes", "1048576"])
        .env_remove("TETHER_LOG")
        .env_remove("TETHER_LOG_FORMAT")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawning tether demo");
    let output = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
        .await
        .expect("tether demo --once finished within 120 s")
        .expect("waiting for tether demo");
    let run = Run::from_output(output);
    run.assert_code(0);
    let forward = run
        .stdout
        .lines()
        .find(|l| l.trim_start().starts_with("forward"))
        .unwrap_or_else(|| panic!("a forward line\n{run}"));
    assert!(forward.contains("127.0.0.1:"), "forward address\n{run}");
    // The daemons are gone when --once returns: no URL to follow.
    assert!(!run.stdout.contains("http://"), "no dead URLs\n{run}");
    assert!(run.stdout.contains("1048576 bytes"), "{run}");
    assert!(run.stdout.contains("byte-exact"), "{run}");
}

#[test]
fn demo_keep_leaves_its_working_configs_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("demo");
    let d = dir.to_str().unwrap();
    let run = tether(["demo", "--once", "--bytes", "65536", "--keep", d]);
    run.assert_code(0);
    assert!(run.stdout.contains(&format!("kept in {d}")), "{run}");
    for name in ["server.yaml", "agent.yaml"] {
        let path = dir.join(name);
        tether(["check-config", path.to_str().unwrap()]).assert_code(0);
    }
    assert!(dir.join("ca.pem").exists() && dir.join("agent-demo-agent.pem").exists());
    // A directory that already holds a setup is refused.
    tether(["demo", "--once", "--keep", d]).assert_code(1);
}

#[test]
fn version_flag_prints_the_version() {
    let run = tether(["--version"]);
    run.assert_code(0);
    assert_eq!(
        run.stdout.trim(),
        format!("tether {}", env!("CARGO_PKG_VERSION"))
    );
}
