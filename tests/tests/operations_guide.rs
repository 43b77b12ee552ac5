//! docs/OPERATIONS.md is exercised: every shell block carries an `exercised-by` marker; blocks
//! marked for this file run here as written (against the real binary, with `/etc/tether` and
//! `/var/log/tether` moved to a temporary directory), and the commands of blocks marked for a
//! script are found in that script.

#![allow(clippy::unwrap_used)] // test helpers panic on failure by design

use std::path::{Path, PathBuf};
use std::process::Stdio;

use tether_e2e::WAIT;
use tether_e2e::process::{ServerProcess, tether_binary};
use tether_testkit::eventually;
use tokio::process::Command;

const THIS_FILE: &str = "tests/tests/operations_guide.rs";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A shell block of the guide and the file its marker names.
struct Block {
    exercised_by: String,
    commands: Vec<String>,
    text: String,
}

/// The ```sh blocks of docs/OPERATIONS.md with the marker on the line before each.
fn blocks() -> Vec<Block> {
    let text = std::fs::read_to_string(repo_root().join("docs/OPERATIONS.md")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        if lines[i].trim() == "```sh" {
            let marker = lines[..i]
                .iter()
                .rev()
                .find(|l| !l.trim().is_empty())
                .and_then(|l| {
                    l.trim()
                        .strip_prefix("<!-- exercised-by: ")?
                        .strip_suffix(" -->")
                })
                .unwrap_or_else(|| panic!("the sh block at line {} has no marker", i + 1));
            let end = (i + 1..lines.len())
                .find(|&k| lines[k].trim() == "```")
                .unwrap();
            let body = &lines[i + 1..end];
            out.push(Block {
                exercised_by: marker.to_owned(),
                commands: body
                    .iter()
                    .map(|l| l.trim().to_owned())
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .collect(),
                text: body.join("\n"),
            });
            i = end;
        }
        i += 1;
    }
    out
}

/// Whether `command` runs in `script`: its words appear in order there, a path standing for any
/// path (the guide installs `target/debian/tether_*.deb`, the script a copy of it), and the
/// guide's `docker compose -f docker/docker-compose.yml` being test-deploy's `compose` function.
fn runs_in(command: &str, script: &str) -> bool {
    let command = command.replace("docker compose -f docker/docker-compose.yml", "compose");
    let want: Vec<&str> = command.split_whitespace().collect();
    let have: Vec<&str> = script.split_whitespace().collect();
    let word = |w: &str, h: &str, first: bool| {
        w == h || (w.contains('/') && h.contains('/')) || (first && h.ends_with(&format!("({w}")))
    };
    (0..have.len()).any(|start| {
        want.iter().enumerate().all(|(k, w)| {
            have.get(start + k)
                .is_some_and(|h| word(w, h.trim_end_matches(';'), k == 0))
        })
    })
}

#[test]
fn every_block_is_marked_and_its_commands_are_run() {
    let blocks = blocks();
    assert!(blocks.len() >= 5, "{} blocks", blocks.len());
    let mut here = 0;
    for block in &blocks {
        if block.exercised_by == THIS_FILE {
            here += 1;
            continue;
        }
        let script = std::fs::read_to_string(repo_root().join(&block.exercised_by))
            .unwrap_or_else(|e| panic!("marker names {}: {e}", block.exercised_by));
        for command in &block.commands {
            assert!(
                runs_in(command, &script),
                "`{command}` is not run by {}",
                block.exercised_by
            );
        }
    }
    // The two blocks run_the_guides_blocks runs.
    assert_eq!(here, 2);
}

#[test]
fn the_matcher_needs_the_words_in_order() {
    let script = "DEB=$(cargo deb -p tether --no-build --fast --output \"$work/deb/\")\n\
                  dpkg -i /deb/*.deb\ncompose up -d \"${services[@]}\"";
    assert!(runs_in("cargo deb -p tether --no-build", script));
    assert!(runs_in("dpkg -i target/debian/tether_*.deb", script));
    assert!(runs_in(
        "docker compose -f docker/docker-compose.yml up -d",
        script
    ));
    assert!(!runs_in("dpkg -r tether", script));
    assert!(!runs_in("cargo deb -p tether --no-strip", script));
}

/// Runs one block of the guide with bash, `/etc/tether` and `/var/log/tether` replaced.
async fn run_block(block: &Block, etc: &Path, log: &Path, envs: &[(&str, String)]) -> String {
    let script = block
        .text
        .replace("/etc/tether", &etc.display().to_string())
        .replace("/var/log/tether", &log.display().to_string());
    let bin_dir = tether_binary().parent().unwrap().to_owned();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut command = Command::new("bash");
    command
        .args(["-euo", "pipefail", "-c", &script])
        .env("PATH", path)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    for (key, value) in envs {
        command.env(key, value);
    }
    let output = tokio::time::timeout(WAIT, command.output())
        .await
        .expect("the block finishes in time")
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "block failed:\n{script}\nstdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

fn audit_lines(path: &Path) -> usize {
    std::fs::read_to_string(path).map_or(0, |t| t.lines().count())
}

/// Consumers of a forward whose agent is not connected: each is one audit line
/// (`dial_failed`, `no_session`).
async fn consumers(forward: std::net::SocketAddr, n: usize) {
    for _ in 0..n {
        assert!(tether_e2e::consumer_gets_error(forward).await);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_the_guides_blocks() {
    let blocks: Vec<Block> = blocks()
        .into_iter()
        .filter(|b| b.exercised_by == THIS_FILE)
        .collect();
    let [add_agent, rotate] = &blocks[..] else {
        panic!("expected two blocks marked for {THIS_FILE}");
    };
    let dir = tempfile::tempdir().unwrap();
    let etc = dir.path().join("etc");
    let log = dir.path().join("log");
    std::fs::create_dir_all(&log).unwrap();
    let init = Command::new(tether_binary())
        .args(["certs", "init", "--dir"])
        .arg(&etc)
        .output()
        .await
        .unwrap();
    assert!(init.status.success(), "{init:?}");
    let config = etc.join("server.yaml");
    std::fs::write(
        &config,
        format!(
            "version: 1\n\
             listen: \"127.0.0.1:0\"\n\
             admin_listen: \"127.0.0.1:0\"\n\
             allowed_agents: [edge-1, edge-2]\n\
             forwards:\n  - {{ name: db, listen: \"127.0.0.1:0\", client: edge-1, target: \"127.0.0.1:9\" }}\n\
             audit_log: {{ output: file, path: \"{}\" }}\n",
            log.join("audit.jsonl").display()
        ),
    )
    .unwrap();
    let server = ServerProcess::start(&config, 1).await;
    let envs = [
        ("TETHER_PID", server.pid().unwrap().to_string()),
        ("TETHER_ADMIN", format!("http://{}", server.admin_addr)),
    ];

    // Adding an agent: its certificate, the config check, the reload, the listing.
    let status = run_block(add_agent, &etc, &log, &envs).await;
    assert!(etc.join("agent-edge-2.pem").is_file());
    assert!(etc.join("agent-edge-2-key.pem").is_file());
    assert!(status.contains("edge-2"), "{status}");

    // Rotating the audit log by hand under connections: no line is lost.
    let audit = log.join("audit.jsonl");
    let rotated = log.join("audit.jsonl.1");
    let forward = server.forward_addrs[0];
    consumers(forward, 20).await;
    eventually("20 audit lines", || audit_lines(&audit) == 20).await;
    run_block(rotate, &etc, &log, &envs).await;
    // The reload reopens (creates) the file; lines in between go to the moved one.
    eventually("the audit file reopened", || audit.exists()).await;
    consumers(forward, 20).await;
    eventually("40 audit lines across both files", || {
        audit_lines(&audit) + audit_lines(&rotated) == 40
    })
    .await;
    assert!(
        audit_lines(&audit) > 0,
        "the reload did not reopen the audit file"
    );
    let text = std::fs::read_to_string(&audit).unwrap();
    assert!(text.contains("\"close\":\"dial_failed\""), "{text}");
    assert!(text.contains("\"dial_error\":\"no_session\""), "{text}");
    server.kill().await;
}
