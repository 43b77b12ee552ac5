//! `tether doctor`: checks a server or agent setup step by step and explains what fails. Each
//! step prints one line, `ok`, `warn` or `FAIL`, with the reason; a failure adds a `fix:` line.
//! The exit code is 0 only when no step failed. The steps live in `doctor_agent`,
//! `doctor_net`, `doctor_target` and `doctor_server`; `doctor_report` owns the report;
//! this file picks the side.

use std::path::Path;

use crate::cli::ConfigKind;
use crate::config_load::{self, Overrides};
use crate::doctor_report::{Report, say};

/// What `tether doctor` was asked.
pub(crate) struct DoctorArgs<'a> {
    pub(crate) config: &'a Path,
    pub(crate) kind: Option<ConfigKind>,
    pub(crate) set: &'a [String],
    pub(crate) target: Option<&'a str>,
}

/// Runs every step for the config's side; an error when any step failed.
pub(crate) async fn run(args: &DoctorArgs<'_>) -> anyhow::Result<()> {
    let mut report = Report::default();
    let flags = crate::parse_flags(args.set)?;
    let overrides = Overrides {
        env: &config_load::process_env,
        flags: &flags,
    };
    say(&format!("tether doctor: {}", args.config.display()));
    let kind = match args.kind {
        Some(kind) => Ok(Some(kind)),
        None => config_load::guess_kind_of_file(args.config),
    };
    match kind {
        Err(err) => report.fail(
            "config",
            &format!("{err:#}"),
            &format!(
                "correct the file (`tether check-config {}` lists every problem)",
                args.config.display()
            ),
        ),
        Ok(Some(ConfigKind::Agent)) => {
            crate::doctor_agent::run(&mut report, args.config, &overrides, args.target).await;
        }
        Ok(Some(ConfigKind::Server)) => {
            if args.target.is_some() {
                anyhow::bail!(
                    "--target checks an agent's dial policy: give the agent's config (the \
                     server has no target policy; the agent decides)"
                );
            }
            crate::doctor_server::run(&mut report, args.config, &overrides).await;
        }
        Ok(None) => report.fail(
            "config",
            &format!(
                "cannot tell whether {} is a server or an agent config (no `server_url` or \
                 `listen` key)",
                args.config.display()
            ),
            "pass --kind server or --kind agent, or check the path",
        ),
    }
    match report.failures() {
        0 => {
            say("no problem found");
            Ok(())
        }
        1 => anyhow::bail!("1 problem found"),
        n => anyhow::bail!("{n} problems found"),
    }
}
