//! The `tether doctor` report: one printed line per step (`ok`, `warn`, `FAIL`, `skip`), the
//! failures counted, and the certificate-expiry step every side shares.

use std::fmt::Write as _;

/// How a step went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Ok,
    /// Works now, but needs attention (a certificate close to its end).
    Warn,
    Fail,
    /// Not run: an earlier step it depends on failed.
    Skip,
}

impl Verdict {
    fn label(self) -> &'static str {
        match self {
            Verdict::Ok => "ok",
            Verdict::Warn => "warn",
            Verdict::Fail => "FAIL",
            Verdict::Skip => "skip",
        }
    }
}

/// The lines printed so far and the failures counted.
#[derive(Debug, Default)]
pub(crate) struct Report {
    failures: usize,
}

impl Report {
    /// How many steps failed so far.
    pub(crate) fn failures(&self) -> usize {
        self.failures
    }

    /// Prints one step at once (a slow network step shows the ones before it).
    pub(crate) fn step(&mut self, verdict: Verdict, step: &str, text: &str, fix: Option<&str>) {
        if verdict == Verdict::Fail {
            self.failures += 1;
        }
        let mut out = format!("{:<5} {:<8} {}", verdict.label(), step, one_line(text));
        if let Some(fix) = fix {
            let _ = write!(out, "\n{:<14}fix: {}", "", one_line(fix));
        }
        say(&out);
    }

    pub(crate) fn ok(&mut self, step: &str, text: &str) {
        self.step(Verdict::Ok, step, text, None);
    }

    pub(crate) fn warn(&mut self, step: &str, text: &str, fix: &str) {
        self.step(Verdict::Warn, step, text, Some(fix));
    }

    pub(crate) fn fail(&mut self, step: &str, text: &str, fix: &str) {
        self.step(Verdict::Fail, step, text, Some(fix));
    }

    pub(crate) fn skip(&mut self, step: &str, why: &str) {
        self.step(Verdict::Skip, step, why, None);
    }
}

/// One line to stdout; a closed pipe (`tether doctor | head`) is not a reason to panic.
pub(crate) fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout(), "{line}");
}

/// Control characters (from a peer's answer or a file) never reach the terminal.
fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// Now, Unix seconds.
pub(crate) fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// `N days`, `N hours` or `N minutes`.
pub(crate) fn human_secs(secs: i64) -> String {
    let secs = secs.abs();
    match secs {
        s if s >= 2 * 86_400 => format!("{} days", s / 86_400),
        s if s >= 2 * 3600 => format!("{} hours", s / 3600),
        s => format!("{} minutes", s / 60),
    }
}

/// The expiry of a certificate as a step: FAIL once expired or not yet valid, warn in its
/// last tenth (the daemons' warning threshold), ok otherwise.
pub(crate) fn expiry_step(
    report: &mut Report,
    step: &str,
    what: &str,
    (not_before, not_after): (i64, i64),
    fix: &str,
) {
    let now = now_unix();
    let until = tether_common::tls_check::rfc3339(not_after);
    if not_after <= now {
        report.fail(
            step,
            &format!(
                "{what} expired at {until} ({} ago)",
                human_secs(now - not_after)
            ),
            fix,
        );
    } else if not_before > now {
        report.fail(
            step,
            &format!(
                "{what} is not valid before {} (in {}): a clock is wrong",
                tether_common::tls_check::rfc3339(not_before),
                human_secs(not_before - now)
            ),
            "check the clocks of this host and of the host that issued it (NTP)",
        );
    } else if (not_after - now) * 10 < (not_after - not_before) {
        report.warn(
            step,
            &format!(
                "{what} expires at {until}, in {}",
                human_secs(not_after - now)
            ),
            fix,
        );
    } else {
        report.ok(
            step,
            &format!(
                "{what} valid until {until} ({} left)",
                human_secs(not_after - now)
            ),
        );
    }
}
