//! `tether hash-token`: the SHA-256 of a token read from stdin, as `token_sha256` expects it.

// Test helpers panic on failure by design.
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::process::{Command, Output, Stdio};

fn hash_token(stdin: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tether"))
        .arg("hash-token")
        .env("TETHER_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn prints_the_sha256_of_the_line_on_stdin() {
    // printf %s ops-token | sha256sum
    let expected = "d9310c002af91822beb0b3487d8b04f85bf6bf1f8a5496bff7d35fc7c5a29def\n";
    for input in [&b"ops-token\n"[..], b"ops-token", b"ops-token\r\n"] {
        let out = hash_token(input);
        assert!(out.status.success(), "{out:?}");
        assert_eq!(String::from_utf8(out.stdout).unwrap(), expected);
    }
    let out = hash_token(b"\n");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no token"),
        "{out:?}"
    );
}
