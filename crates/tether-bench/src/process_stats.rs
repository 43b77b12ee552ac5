//! What the kernel says about a process: resident memory (VmRSS) and the machine's identity.

use std::path::Path;

use anyhow::{Context, Result};

/// VmRSS of `pid` in KiB, from `/proc/<pid>/status`.
pub(crate) fn rss_kib(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no VmRSS line in {path}"))
}

/// One line describing the machine: cores, CPU model, memory, kernel.
pub(crate) fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = read_field("/proc/cpuinfo", "model name").unwrap_or_else(|| "unknown CPU".into());
    let mem_gib = read_field("/proc/meminfo", "MemTotal")
        .and_then(|v| v.trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or_else(
            || "?".to_owned(),
            |kib| format!("{:.0}", kib / 1024.0 / 1024.0),
        );
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    format!("{cores} vCPU ({model}), {mem_gib} GiB, Linux {kernel}")
}

fn read_field(path: impl AsRef<Path>, key: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()?
        .lines()
        .find_map(|line| {
            let (k, v) = line.split_once(':')?;
            (k.trim() == key).then(|| v.trim().to_owned())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_its_own_rss() {
        let rss = rss_kib(std::process::id()).unwrap();
        assert!(rss > 100, "{rss} KiB");
    }

    #[test]
    fn describes_the_machine() {
        assert!(machine().contains("vCPU"), "{}", machine());
    }
}
