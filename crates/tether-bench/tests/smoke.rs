//! One tiny comparison end to end: `tether-bench tunnels --smoke` (direct, the splice floor and
//! tether, about a second per throughput test) must finish and print a table with every row.

use std::process::Command;

fn on_path(name: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(name).is_file()))
}

#[test]
fn a_tiny_comparison_prints_every_figure_for_direct_floor_and_tether() {
    if !on_path("iperf3") {
        // scripts/install-test-deps and .ci/run install it; say so loudly rather than fail a
        // developer's `cargo test` on a machine without it.
        eprintln!("SKIPPED: iperf3 is not on PATH (apt-get install iperf3)");
        return;
    }
    let output = Command::new(env!("CARGO_BIN_EXE_tether-bench"))
        .args(["tunnels", "--smoke", "--no-peers"])
        .output()
        .expect("run tether-bench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "tether-bench tunnels --smoke failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        stdout.contains("| figure | direct | floor | tether |"),
        "no column per system:\n{stdout}"
    );
    for row in [
        "| 1 stream MB/s |",
        "| 8 streams MB/s |",
        "| 1 stream, reverse MB/s |",
        "| 8 streams, reverse MB/s |",
        "| tunnel CPU %, 1 stream (of 200 %) |",
        "| MB per tunnel CPU-second, 1 stream |",
        "| RTT p50 µs (64 B) |",
        "| RTT p99 µs (64 B) |",
        "| new connections/s |",
        "| RSS per idle conn, 100 conns (B) |",
        "| RSS given back after closing 100 (%) |",
    ] {
        let line = stdout
            .lines()
            .find(|line| line.starts_with(row))
            .unwrap_or_else(|| panic!("no row {row}:\n{stdout}"));
        // A figure for tether in every row (the last column).
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let tether = cells[cells.len() - 2];
        assert!(
            tether != "–" && !tether.is_empty(),
            "no tether figure in {line}"
        );
    }
    let floor_tput = stdout
        .lines()
        .find(|line| line.starts_with("| 1 stream MB/s |"))
        .and_then(|line| line.split('|').map(str::trim).nth(3))
        .unwrap_or_default()
        .replace(',', "");
    let floor_tput: f64 = floor_tput.parse().unwrap_or(0.0);
    assert!(floor_tput > 0.0, "the floor moved nothing:\n{stdout}");
}
