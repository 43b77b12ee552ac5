//! Folding harness records into medians, comparing them with the peers and the targets of
//! issue 10, and writing a marked section of `docs/BENCHMARKS.md`.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};

use crate::harness::Record;
use crate::process_stats;

/// Markers of the `tunnels` section.
pub(crate) const TUNNELS_MARKER: &str = "tunnels";
/// Markers of the `tunnels --audit-log` section.
pub(crate) const TUNNELS_AUDIT_MARKER: &str = "tunnels-audit";
/// Markers of the `agents` section.
pub(crate) const AGENTS_MARKER: &str = "agents";
/// The section of `tether-bench agents --replicas`.
pub(crate) const REPLICAS_MARKER: &str = "agents-replicas";

/// The harness's reference figures for peers that cannot be built here (its README, measured
/// on this machine kind): wstunnel 10.6 with mTLS, and the direct loopback of that run.
mod reference {
    pub(super) const DIRECT_TPUT1: f64 = 3854.0;
    pub(super) const DIRECT_TPUT8: f64 = 4054.0;
    pub(super) const WSTUNNEL_TPUT1: f64 = 1448.0;
    pub(super) const WSTUNNEL_TPUT8: f64 = 1526.0;
    pub(super) const WSTUNNEL_RTT_P50: f64 = 110.0;
    pub(super) const WSTUNNEL_RTT_P99: f64 = 152.0;
    pub(super) const RATHOLE_CONN_PER_S: f64 = 3614.0;
}

/// The median of the values `pick` finds in the successful records of `label`/`test`, and how
/// many there were.
fn median(
    records: &[Record],
    label: &str,
    test: &str,
    pick: fn(&Record) -> Option<f64>,
) -> Option<(f64, usize)> {
    let mut values: Vec<f64> = records
        .iter()
        .filter(|r| r.label == label && r.test == test)
        .filter(|r| r.ok || (test.starts_with("idle") && r.opened_ok.unwrap_or(0) > 0))
        .filter_map(pick)
        .collect();
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    let median = if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    };
    Some((median, values.len()))
}

fn cell(value: Option<(f64, usize)>) -> String {
    match value {
        None => "–".to_owned(),
        Some((v, _)) if v.abs() >= 100.0 => format_thousands(v.round()),
        Some((v, _)) => format!("{v:.1}"),
    }
}

pub(crate) fn format_thousands(v: f64) -> String {
    let digits = format!("{}", v.abs() as u64);
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if v < 0.0 { format!("-{out}") } else { out }
}

type Pick = fn(&Record) -> Option<f64>;

/// The `tunnels` section: a table of medians per system, then the targets.
pub(crate) fn tunnels(records: &[Record], command: &str, rounds: usize) -> String {
    let mut labels: Vec<&str> = Vec::new();
    for r in records {
        if !labels.contains(&r.label.as_str()) {
            labels.push(&r.label);
        }
    }
    let mut idle: Vec<&str> = records
        .iter()
        .filter(|r| r.test.starts_with("idle"))
        .map(|r| r.test.as_str())
        .collect();
    idle.sort_by_key(|t| t[4..].parse::<u64>().unwrap_or(0));
    idle.dedup();
    let mut rows: Vec<(String, &str, Pick)> = vec![
        ("1 stream MB/s".into(), "tput1", |r| r.mbps),
        ("8 streams MB/s".into(), "tput8", |r| r.mbps),
        ("1 stream reverse MB/s".into(), "tput1R", |r| r.mbps),
        ("tunnel CPU % (1 stream)".into(), "tput1", |r| {
            r.tunnel_cpu_pct
        }),
        ("RTT p50 µs (64 B)".into(), "rtt", |r| r.p50_us),
        ("RTT p99 µs (64 B)".into(), "rtt", |r| r.p99_us),
        ("new connections/s".into(), "connect", |r| r.conn_per_s),
        ("connect p50 µs".into(), "connect", |r| r.p50_us),
    ];
    for test in &idle {
        let n = &test[4..];
        rows.push((format!("RSS per idle conn, {n} conns (B)"), test, |r| {
            r.bytes_per_conn
        }));
        rows.push((
            format!("RSS given back 5 s after closing {n} (%)"),
            test,
            |r| r.returned_pct,
        ));
    }
    let load: Vec<f64> = records.iter().filter_map(|r| r.loadavg1).collect();
    let max_load = load.iter().copied().fold(0.0, f64::max);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "## End to end against peers (`tether-bench tunnels`)\n"
    );
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
        "- tether and rathole figures cover both of their processes (RSS and CPU of server and \
         agent/client together). tether runs with mutual TLS 1.3 and default configs; rathole \
         (if measured) with plain TCP and a token.\n"
    );
    let _ = write!(out, "| figure |");
    for label in &labels {
        let _ = write!(out, " {label} |");
    }
    let _ = writeln!(out);
    let _ = writeln!(out, "|---|{}", "---|".repeat(labels.len()));
    for (name, test, pick) in &rows {
        let _ = write!(out, "| {name} |");
        for label in &labels {
            let _ = write!(out, " {} |", cell(median(records, label, test, *pick)));
        }
        let _ = writeln!(out);
    }
    let _ = writeln!(out);
    out.push_str(&targets(records, &idle));
    out
}

/// The issue 10 targets against this run's medians.
fn targets(records: &[Record], idle: &[&str]) -> String {
    let get = |label: &str, test: &str, pick: Pick| median(records, label, test, pick).map(|m| m.0);
    let tether_tput1 = get("tether", "tput1", |r| r.mbps);
    let tether_tput8 = get("tether", "tput8", |r| r.mbps);
    let direct_tput1 = get("direct", "tput1", |r| r.mbps);
    let direct_tput8 = get("direct", "tput8", |r| r.mbps);
    // wstunnel cannot be built here: its reference figure, scaled by how this run's direct
    // loopback compares with the reference run's.
    let scaled = |reference: f64, direct_now: Option<f64>, direct_ref: f64| {
        direct_now.map_or(reference, |d| reference * d / direct_ref)
    };
    let ws_tput1 = scaled(
        reference::WSTUNNEL_TPUT1,
        direct_tput1,
        reference::DIRECT_TPUT1,
    );
    let ws_tput8 = scaled(
        reference::WSTUNNEL_TPUT8,
        direct_tput8,
        reference::DIRECT_TPUT8,
    );
    let rathole_conn = get("rathole", "connect", |r| r.conn_per_s);
    let (rathole_conn, rathole_src) = match rathole_conn {
        Some(v) => (v, "rathole, this run"),
        None => (reference::RATHOLE_CONN_PER_S, "rathole, reference figure"),
    };
    let mut rows: Vec<(String, String, String, Option<bool>)> = Vec::new();
    let ratio_row =
        |name: &str, goal: f64, value: Option<f64>, base: f64, base_src: &str, higher: bool| {
            let ratio = value.map(|v| v / base);
            let met = ratio.map(|r| if higher { r >= goal } else { r <= goal });
            (
                name.to_owned(),
                format!(
                    "{} {goal}x {base_src} ({})",
                    if higher { "≥" } else { "≤" },
                    format_thousands(base.round())
                ),
                value.map_or("–".to_owned(), |v| {
                    format!(
                        "{} ({:.2}x)",
                        format_thousands(v.round()),
                        ratio.unwrap_or(0.0)
                    )
                }),
                met,
            )
        };
    rows.push(ratio_row(
        "single-stream MB/s",
        1.5,
        tether_tput1,
        ws_tput1,
        "wstunnel, scaled reference",
        true,
    ));
    rows.push(ratio_row(
        "8-stream MB/s",
        1.5,
        tether_tput8,
        ws_tput8,
        "wstunnel, scaled reference",
        true,
    ));
    rows.push(ratio_row(
        "RTT p50 µs",
        0.7,
        get("tether", "rtt", |r| r.p50_us),
        reference::WSTUNNEL_RTT_P50,
        "wstunnel, reference",
        false,
    ));
    rows.push(ratio_row(
        "RTT p99 µs",
        0.7,
        get("tether", "rtt", |r| r.p99_us),
        reference::WSTUNNEL_RTT_P99,
        "wstunnel, reference",
        false,
    ));
    rows.push(ratio_row(
        "new connections/s",
        1.4,
        get("tether", "connect", |r| r.conn_per_s),
        rathole_conn,
        rathole_src,
        true,
    ));
    for test in idle {
        let n = &test[4..];
        let per_conn = get("tether", test, |r| r.bytes_per_conn);
        rows.push((
            format!("RSS per idle conn ({n})"),
            "≤ 8,192 B".to_owned(),
            per_conn.map_or("–".to_owned(), |v| {
                format!("{} B", format_thousands(v.round()))
            }),
            per_conn.map(|v| v <= 8192.0),
        ));
        let returned = get("tether", test, |r| r.returned_pct);
        rows.push((
            format!("memory given back after closing {n}"),
            "≥ 95 %".to_owned(),
            returned.map_or("–".to_owned(), |v| format!("{v:.1} %")),
            returned.map(|v| v >= 95.0),
        ));
    }
    let mut out = String::from("| target | goal | tether | met |\n|---|---|---|---|\n");
    for (name, goal, value, met) in rows {
        let met = match met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "–",
        };
        let _ = writeln!(out, "| {name} | {goal} | {value} | {met} |");
    }
    out.push_str(
        "\nwstunnel is not published as a crate and cannot be built here, so its figures are \
         the harness's reference figures; throughput is scaled by this run's direct loopback \
         against the reference run's (3,854 and 4,054 MB/s).\n",
    );
    out
}

/// The one line a passing smoke run prints instead of the report: how many measurements of
/// which systems ran, and that a smoke run judges the tool, not the figures.
pub(crate) fn smoke_summary(mode: &str, records: &[Record]) -> String {
    let mut systems: Vec<&str> = Vec::new();
    for record in records {
        if !systems.contains(&record.label.as_str()) {
            systems.push(&record.label);
        }
    }
    format!(
        "{mode} smoke: ok: {} measurements of {} ran (a smoke run checks the tool, not the \
         figures; `tether-bench {mode}` measures and compares with the targets)",
        records.len(),
        systems.join(", ")
    )
}

/// Fails if any record of the run is not ok (smoke mode: the tool must not rot silently).
pub(crate) fn require_all_ok(records: &[Record]) -> Result<()> {
    if records.is_empty() {
        bail!("the harness wrote no records");
    }
    let failed: Vec<String> = records
        .iter()
        .filter(|r| !r.ok)
        .map(|r| {
            format!(
                "{} {}: {}",
                r.label,
                r.test,
                r.error.as_deref().unwrap_or("not ok")
            )
        })
        .collect();
    if !failed.is_empty() {
        bail!("failed measurements:\n{}", failed.join("\n"));
    }
    Ok(())
}

/// Replaces the text between `<!-- tether-bench:<marker>:begin -->` and `...:end -->` in
/// `path` with `section` (appends a marked section when the markers are missing).
pub(crate) fn write_section(path: Option<PathBuf>, marker: &str, section: &str) -> Result<()> {
    let Some(path) = path else {
        return Ok(());
    };
    let begin = format!("<!-- tether-bench:{marker}:begin -->");
    let end = format!("<!-- tether-bench:{marker}:end -->");
    let old = std::fs::read_to_string(&path).unwrap_or_default();
    let block = format!("{begin}\n{section}\n{end}");
    let new = match (old.find(&begin), old.find(&end)) {
        (Some(b), Some(e)) if b < e => format!("{}{block}{}", &old[..b], &old[e + end.len()..]),
        _ => format!("{}\n{block}\n", old.trim_end()),
    };
    std::fs::write(&path, new).with_context(|| format!("writing {}", path.display()))?;
    eprintln!("wrote the {marker} section of {}", path.display());
    Ok(())
}

fn today() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn git_describe() -> String {
    std::process::Command::new("git")
        .args(["describe", "--always", "--dirty"])
        .current_dir(crate::daemons::workspace_root())
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|s| !s.is_empty())
        .map_or_else(|| "unknown commit".to_owned(), |c| format!("commit {c}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(label: &str, test: &str, ok: bool, mbps: f64) -> Record {
        serde_json::from_value(serde_json::json!({
            "label": label, "test": test, "ok": ok, "MBps": mbps
        }))
        .unwrap()
    }

    #[test]
    fn medians_skip_failed_records() {
        let records = vec![
            rec("tether", "tput1", true, 100.0),
            rec("tether", "tput1", true, 300.0),
            rec("tether", "tput1", true, 200.0),
            rec("tether", "tput1", false, 9999.0),
        ];
        assert_eq!(
            median(&records, "tether", "tput1", |r| r.mbps),
            Some((200.0, 3))
        );
        assert_eq!(median(&records, "direct", "tput1", |r| r.mbps), None);
    }

    #[test]
    fn thousands() {
        assert_eq!(format_thousands(1234567.0), "1,234,567");
        assert_eq!(format_thousands(999.0), "999");
    }

    #[test]
    fn sections_are_replaced_between_markers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("B.md");
        std::fs::write(&path, "# B\n\nintro\n").unwrap();
        write_section(Some(path.clone()), "x", "first").unwrap();
        write_section(Some(path.clone()), "x", "second").unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("# B\n\nintro\n"));
        assert!(text.contains("second") && !text.contains("first"), "{text}");
        assert_eq!(text.matches("tether-bench:x:begin").count(), 1);
    }

    #[test]
    fn smoke_fails_on_a_failed_record() {
        assert!(require_all_ok(&[rec("tether", "tput1", true, 1.0)]).is_ok());
        assert!(require_all_ok(&[rec("tether", "rtt", false, 0.0)]).is_err());
        assert!(require_all_ok(&[]).is_err());
    }

    #[test]
    fn smoke_summary_names_the_systems_once_and_no_targets() {
        let records = [
            rec("direct", "tput1", true, 1.0),
            rec("tether", "tput1", true, 1.0),
            rec("direct", "rtt", true, 1.0),
        ];
        let line = smoke_summary("tunnels", &records);
        assert!(
            line.starts_with("tunnels smoke: ok: 3 measurements of direct, tether ran"),
            "{line}"
        );
        assert!(!line.contains("| no |"), "{line}");
    }
}
