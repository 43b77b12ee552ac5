//! What the kernel says about a process: resident memory (VmRSS), CPU time (utime+stime from
//! `/proc/<pid>/stat`) and the machine's identity.

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

/// VmRSS summed over `pids`, in KiB.
pub(crate) fn rss_total_kib(pids: &[u32]) -> Result<u64> {
    pids.iter().map(|&pid| rss_kib(pid)).sum()
}

/// User plus system CPU time of `pids` so far, in seconds (children reaped by them included).
pub(crate) fn cpu_seconds(pids: &[u32]) -> Result<f64> {
    let ticks_per_second = rustix::param::clock_ticks_per_second() as f64;
    let mut ticks = 0;
    for pid in pids {
        let path = format!("/proc/{pid}/stat");
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        ticks += stat_cpu_ticks(&text).with_context(|| format!("parsing {path}: {text:?}"))?;
    }
    Ok(ticks as f64 / ticks_per_second)
}

/// utime + stime + cutime + cstime (clock ticks) from the text of `/proc/<pid>/stat`. The
/// command name (field 2) is in parentheses and may hold spaces and parentheses itself, so
/// fields are counted from the last `)`.
pub(crate) fn stat_cpu_ticks(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    // After the name: state (field 3) is index 0, so utime (field 14) is index 11 and
    // cstime (field 17) index 14.
    let fields: Vec<&str> = rest.split_whitespace().collect();
    fields
        .get(11..15)?
        .iter()
        .map(|field| field.parse::<u64>().ok())
        .sum()
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
    fn parses_cpu_ticks_past_a_name_with_spaces_and_parentheses() {
        let stat = "4242 (tokio (rt) x) S 1 4242 4242 0 -1 4194560 712 0 0 0 \
                    130 27 5 3 20 0 4 0 1234 123456789 2048 18446744073709551615";
        assert_eq!(stat_cpu_ticks(stat), Some(130 + 27 + 5 + 3));
        assert_eq!(stat_cpu_ticks("4242 (x) S 1 2"), None);
        assert_eq!(stat_cpu_ticks("no parenthesis"), None);
    }

    #[test]
    fn own_cpu_time_grows_while_spinning() {
        let me = [std::process::id()];
        let before = cpu_seconds(&me).unwrap();
        let spin = tokio::time::Instant::now();
        let mut x = 0u64;
        while cpu_seconds(&me).unwrap() < before + 0.05 {
            x = x.wrapping_add(std::hint::black_box(1));
            assert!(spin.elapsed().as_secs() < 30, "no CPU time counted");
        }
        assert!(x > 0);
    }

    #[test]
    fn describes_the_machine() {
        assert!(machine().contains("vCPU"), "{}", machine());
    }
}
