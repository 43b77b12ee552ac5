//! The body of fuzz target `fuzz_config` (see fuzz/README.md), shared by path with the stable
//! test `tests/tests/fuzz_config_body.rs`.

use std::path::Path;

use tether_agent::AgentConfig;
use tether_common::config_collect::{locate, parse_collect};
use tether_common::config_error::parse_yaml;
use tether_server::ServerConfig;

fn server(text: &str) {
    let strict = ServerConfig::parse(text, "fuzz.yaml", Path::new("/fuzz"));
    let (collected, report) = parse_collect::<ServerConfig>(text, "fuzz.yaml");
    for problem in &report.problems {
        let _ = locate(text, &problem.path);
    }
    if strict.is_ok() {
        // A file the daemon accepts has no structural problem in `check-config` either.
        assert!(
            collected.is_some() && report.problems.is_empty(),
            "strict parse accepted, collecting parse reported {:?}",
            report.problems
        );
    }
}

fn agent(text: &str) {
    let strict = parse_yaml::<AgentConfig>(text, "fuzz.yaml");
    let (collected, report) = parse_collect::<AgentConfig>(text, "fuzz.yaml");
    for problem in &report.problems {
        let _ = locate(text, &problem.path);
    }
    if let Ok(config) = strict {
        assert!(
            collected.is_some() && report.problems.is_empty(),
            "strict parse accepted, collecting parse reported {:?}",
            report.problems
        );
        let valid = config.validate().is_ok();
        let compiled = config.policy.compile();
        // Validation covers the policy: a valid config's policy compiles.
        assert!(
            !valid || compiled.is_ok(),
            "valid config, policy {compiled:?}"
        );
        let _ = config.effective().to_mux_config();
    }
}

/// The fuzz target's body: panics on a finding.
pub(crate) fn check(data: &[u8]) {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    if selector % 2 == 0 {
        server(text);
    } else {
        agent(text);
    }
}
