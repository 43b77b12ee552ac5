//! Folding records into medians (markdown cells and JSON), the smoke-run checks, and writing a
//! marked section of `docs/BENCHMARKS.md`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};

use crate::record::Record;

/// Markers of the `tunnels` section.
pub(crate) const TUNNELS_MARKER: &str = "tunnels";
/// Markers of the `tunnels --audit-log` section.
pub(crate) const TUNNELS_AUDIT_MARKER: &str = "tunnels-audit";
/// Markers of the `agents` section.
pub(crate) const AGENTS_MARKER: &str = "agents";
/// The section of `tether-bench agents --replicas`.
pub(crate) const REPLICAS_MARKER: &str = "agents-replicas";
/// Markers of the `wan` section.
pub(crate) const WAN_MARKER: &str = "wan";

/// The median of the values `pick` finds in the successful records of `label`/`test`, and how
/// many there were.
pub(crate) fn median(
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
    Some((median_of(&mut values), values.len()))
}

pub(crate) fn cell(value: Option<(f64, usize)>) -> String {
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

/// Picks one figure of a record.
pub(crate) type Pick = fn(&Record) -> Option<f64>;

/// Medians of every figure: `{label: {test: {field: median}}}`, over the successful records.
pub(crate) fn medians_json(records: &[Record]) -> serde_json::Value {
    let mut grouped: BTreeMap<(String, String), BTreeMap<String, Vec<f64>>> = BTreeMap::new();
    for record in records.iter().filter(|r| r.ok) {
        let Ok(serde_json::Value::Object(fields)) = serde_json::to_value(record) else {
            continue;
        };
        let figures = grouped
            .entry((record.label.clone(), record.test.clone()))
            .or_default();
        for (field, value) in fields {
            if let Some(v) = value.as_f64().filter(|_| field != "loadavg1") {
                figures.entry(field).or_default().push(v);
            }
        }
    }
    let mut out = serde_json::Map::new();
    for ((label, test), figures) in grouped {
        let tests = out
            .entry(label)
            .or_insert_with(|| serde_json::Value::Object(serde_json::Map::new()));
        let medians: serde_json::Map<String, serde_json::Value> = figures
            .into_iter()
            .map(|(field, mut values)| (field, serde_json::json!(median_of(&mut values))))
            .collect();
        if let serde_json::Value::Object(tests) = tests {
            tests.insert(test, serde_json::Value::Object(medians));
        }
    }
    serde_json::Value::Object(out)
}

fn median_of(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
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

pub(crate) fn today() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

pub(crate) fn git_describe() -> String {
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
    fn json_medians_per_system_test_and_figure() {
        let records = vec![
            rec("tether", "tput1", true, 100.0),
            rec("tether", "tput1", true, 300.0),
            rec("tether", "tput1", true, 200.0),
            rec("floor", "tput1", true, 50.0),
        ];
        let json = medians_json(&records);
        assert_eq!(json["tether"]["tput1"]["MBps"], 200.0);
        assert_eq!(json["floor"]["tput1"]["MBps"], 50.0);
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
