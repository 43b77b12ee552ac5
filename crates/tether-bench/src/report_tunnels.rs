//! The `tunnels` section: medians per figure and system, tether's CPU per byte as a multiple
//! of the floor's and the peers', and issue 27's targets against the peers of the same run.

use std::fmt::Write as _;

use crate::process_stats;
use crate::record::Record;
use crate::report::{Pick, cell, format_thousands, git_describe, median, today};

/// The systems of `records`, in the order they were first measured.
fn labels(records: &[Record]) -> Vec<&str> {
    let mut labels: Vec<&str> = Vec::new();
    for r in records {
        if !labels.contains(&r.label.as_str()) {
            labels.push(&r.label);
        }
    }
    labels
}

/// The distinct tests of `records` starting with `prefix`, in the order first measured.
fn tests_with<'a>(records: &'a [Record], prefix: &str) -> Vec<&'a str> {
    let mut tests: Vec<&str> = Vec::new();
    for r in records.iter().filter(|r| r.test.starts_with(prefix)) {
        if !tests.contains(&r.test.as_str()) {
            tests.push(&r.test);
        }
    }
    tests
}

/// `tput8R` -> `8 streams, reverse`.
fn describe_tput(test: &str) -> String {
    let spec = &test[4..];
    let (streams, reverse) = match spec.strip_suffix('R') {
        Some(streams) => (streams, ", reverse"),
        None => (spec, ""),
    };
    let noun = if streams == "1" { "stream" } else { "streams" };
    format!("{streams} {noun}{reverse}")
}

/// The rows of the figure table: name, test, figure.
fn rows(records: &[Record]) -> Vec<(String, String, Pick)> {
    let tput = tests_with(records, "tput");
    let mut rows: Vec<(String, String, Pick)> = Vec::new();
    for test in &tput {
        rows.push((
            format!("{} MB/s", describe_tput(test)),
            test.to_string(),
            |r| r.mbps,
        ));
    }
    for test in tput.iter().filter(|t| !t.ends_with('R')) {
        rows.push((
            format!("tunnel CPU %, {} (of 200 %)", describe_tput(test)),
            test.to_string(),
            |r| r.tunnel_cpu_pct,
        ));
    }
    for test in &tput {
        rows.push((
            format!("MB per tunnel CPU-second, {}", describe_tput(test)),
            test.to_string(),
            |r| r.mb_per_cpu_s,
        ));
    }
    rows.push(("RTT p50 µs (64 B)".into(), "rtt".into(), |r| r.p50_us));
    rows.push(("RTT p99 µs (64 B)".into(), "rtt".into(), |r| r.p99_us));
    rows.push(("new connections/s".into(), "connect".into(), |r| {
        r.conn_per_s
    }));
    rows.push(("connect p50 µs".into(), "connect".into(), |r| r.p50_us));
    let mut idle = tests_with(records, "idle");
    idle.sort_by_key(|t| t[4..].parse::<u64>().unwrap_or(0));
    for test in idle {
        let n = &test[4..];
        rows.push((
            format!("RSS per idle conn, {n} conns (B)"),
            test.to_string(),
            |r| r.bytes_per_conn,
        ));
        rows.push((
            format!("RSS given back after closing {n} (%)"),
            test.to_string(),
            |r| r.returned_pct,
        ));
    }
    rows
}

/// The markdown table of medians: one row per figure, one column per system.
pub(crate) fn table(records: &[Record]) -> String {
    let labels = labels(records);
    let mut out = String::from("| figure |");
    for label in &labels {
        let _ = write!(out, " {label} |");
    }
    let _ = writeln!(out, "\n|---|{}", "---|".repeat(labels.len()));
    for (name, test, pick) in rows(records) {
        let _ = write!(out, "| {name} |");
        for label in &labels {
            let _ = write!(out, " {} |", cell(median(records, label, &test, pick)));
        }
        out.push('\n');
    }
    out
}

fn header(out: &mut String, title: &str, records: &[Record], command: &str, rounds: usize) {
    let max_load = records
        .iter()
        .filter_map(|r| r.loadavg1)
        .fold(0.0, f64::max);
    let _ = writeln!(out, "## {title}\n");
    let _ = writeln!(out, "- Date: {}", today());
    let _ = writeln!(out, "- Machine: {}", process_stats::machine());
    let _ = writeln!(out, "- tether: {}", git_describe());
    let _ = writeln!(
        out,
        "- Command: `{command}` ({rounds} interleaved rounds; medians)"
    );
    let _ = writeln!(out, "- Load average during the run: up to {max_load:.2}");
    let _ = writeln!(
        out,
        "- CPU and RSS cover both processes of each tunnel. tether: mutual TLS 1.3, default \
         configs; floor: two splice(2) relays, plain TCP; rathole: plain TCP and a token; \
         wstunnel: wss with mutual TLS. MB = 10^6 bytes.\n"
    );
}

/// The whole `tunnels` section.
pub(crate) fn section(records: &[Record], command: &str, rounds: usize) -> String {
    let mut out = String::new();
    header(
        &mut out,
        "End to end against the floor and peers (`tether-bench tunnels`)",
        records,
        command,
        rounds,
    );
    out.push_str(&table(records));
    out.push('\n');
    out.push_str(&cpu_multiples(records));
    out.push('\n');
    out.push_str(&targets(records));
    out
}

/// The `tunnels --audit-log` section: the table only.
pub(crate) fn audit_section(
    records: &[Record],
    command: &str,
    rounds: usize,
    audit_lines: usize,
) -> String {
    let mut out = String::new();
    header(
        &mut out,
        "The audit log's cost (`tether-bench tunnels --audit-log`)",
        records,
        command,
        rounds,
    );
    out.push_str(&table(records));
    let _ = writeln!(
        out,
        "\nThe audit log held {audit_lines} lines at the end (one per tunnelled connection)."
    );
    out
}

fn get(records: &[Record], label: &str, test: &str, pick: Pick) -> Option<f64> {
    median(records, label, test, pick).map(|m| m.0)
}

/// CPU per byte of each tunnel as a multiple of the floor's (and of wstunnel's, if measured).
fn cpu_multiples(records: &[Record]) -> String {
    let tput = tests_with(records, "tput");
    let bases: Vec<&str> = ["floor", "wstunnel"]
        .into_iter()
        .filter(|b| records.iter().any(|r| r.label == *b))
        .collect();
    if bases.is_empty() {
        return String::new();
    }
    let mut out = String::from("| CPU per byte, as a multiple of |");
    for test in &tput {
        let _ = write!(out, " {} |", describe_tput(test));
    }
    let _ = writeln!(out, "\n|---|{}", "---|".repeat(tput.len()));
    for label in labels(records) {
        if label == "direct" {
            continue;
        }
        for base in bases.iter().filter(|b| **b != label) {
            let _ = write!(out, "| {label} / {base} |");
            for test in &tput {
                let mine = get(records, label, test, |r| r.mb_per_cpu_s);
                let theirs = get(records, base, test, |r| r.mb_per_cpu_s);
                let _ = match (mine, theirs) {
                    (Some(m), Some(t)) if m > 0.0 => write!(out, " {:.2}x |", t / m),
                    _ => write!(out, " – |"),
                };
            }
            out.push('\n');
        }
    }
    out
}

/// One of issue 27's targets: tether's figure against a peer's, higher or lower by a ratio.
struct Goal {
    name: &'static str,
    test: String,
    pick: Pick,
    peer: &'static str,
    ratio: f64,
    higher: bool,
}

/// Issue 27's targets; `multi` is the multi-stream test of the run (`tput8`).
fn goals(multi: &str) -> Vec<Goal> {
    let mbps: Pick = |r| r.mbps;
    let table: [(&'static str, &str, Pick, &'static str, f64, bool); 8] = [
        ("1 stream MB/s", "tput1", mbps, "wstunnel", 1.1, true),
        (
            "1 stream reverse MB/s",
            "tput1R",
            mbps,
            "wstunnel",
            1.1,
            true,
        ),
        ("multi-stream MB/s", multi, mbps, "wstunnel", 1.3, true),
        ("multi-stream MB/s", multi, mbps, "rathole", 1.0, true),
        (
            "MB per tunnel CPU-second, 1 stream",
            "tput1",
            |r| r.mb_per_cpu_s,
            "wstunnel",
            1.1,
            true,
        ),
        ("RTT p99 µs", "rtt", |r| r.p99_us, "wstunnel", 1.0, false),
        (
            "new connections/s",
            "connect",
            |r| r.conn_per_s,
            "wstunnel",
            2.0,
            true,
        ),
        (
            "new connections/s",
            "connect",
            |r| r.conn_per_s,
            "rathole",
            1.2,
            true,
        ),
    ];
    table
        .into_iter()
        .map(|(name, test, pick, peer, ratio, higher)| Goal {
            name,
            test: test.to_owned(),
            pick,
            peer,
            ratio,
            higher,
        })
        .collect()
}

/// Issue 27's targets for tether against the peers measured in this run.
fn targets(records: &[Record]) -> String {
    let multi = tests_with(records, "tput")
        .into_iter()
        .find(|t| *t != "tput1" && !t.ends_with('R'))
        .unwrap_or("tput8")
        .to_owned();
    let mut out = String::from(
        "| target | goal | tether | peer | ratio | met |\n|---|---|---|---|---|---|\n",
    );
    let fmt = |v: Option<f64>| v.map_or("–".to_owned(), |v| format_thousands(v.round()));
    for g in goals(&multi) {
        let mine = get(records, "tether", &g.test, g.pick);
        let theirs = get(records, g.peer, &g.test, g.pick);
        let sign = if g.higher { "≥" } else { "≤" };
        let (ratio, met) = match (mine, theirs) {
            (Some(m), Some(t)) if t > 0.0 => {
                let ratio = m / t;
                let met = if g.higher {
                    ratio >= g.ratio
                } else {
                    ratio <= g.ratio
                };
                (format!("{ratio:.2}x"), if met { "yes" } else { "**no**" })
            }
            _ => ("–".to_owned(), "– (peer not measured)"),
        };
        let _ = writeln!(
            out,
            "| {} | {sign} {}x {} | {} | {} | {ratio} | {met} |",
            g.name,
            g.ratio,
            g.peer,
            fmt(mine),
            fmt(theirs),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(label: &str, test: &str, mbps: f64, per_cpu: f64) -> Record {
        Record {
            ok: true,
            mbps: Some(mbps),
            mb_per_cpu_s: Some(per_cpu),
            ..Record::new(label, test)
        }
    }

    #[test]
    fn table_has_a_row_per_figure_and_a_column_per_system() {
        let records = [
            rec("direct", "tput1", 3000.0, 0.0),
            rec("floor", "tput1", 2000.0, 1500.0),
            rec("tether", "tput1", 900.0, 600.0),
            rec("tether", "tput8R", 800.0, 500.0),
        ];
        let table = table(&records);
        assert!(
            table.starts_with("| figure | direct | floor | tether |"),
            "{table}"
        );
        assert!(
            table.contains("| 1 stream MB/s | 3,000 | 2,000 | 900 |"),
            "{table}"
        );
        assert!(
            table.contains("| 8 streams, reverse MB/s | – | – | 800 |"),
            "{table}"
        );
        let multiples = cpu_multiples(&records);
        assert!(
            multiples.contains("| tether / floor | 2.50x | – |"),
            "{multiples}"
        );
    }

    #[test]
    fn targets_compare_with_peers_of_the_same_run_only() {
        let records = [
            rec("tether", "tput1", 1200.0, 900.0),
            rec("wstunnel", "tput1", 1000.0, 800.0),
        ];
        let targets = targets(&records);
        assert!(
            targets.contains("| 1 stream MB/s | ≥ 1.1x wstunnel | 1,200 | 1,000 | 1.20x | yes |"),
            "{targets}"
        );
        assert!(targets.contains("– (peer not measured)"), "{targets}");
    }
}
