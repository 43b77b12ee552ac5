//! Loading the daemons' effective configs: the YAML file with the `TETHER_*` environment and
//! `--set` flags layered over it (`tether_common::config_layers`), relative paths resolved and
//! validated, every problem reported with its key path.

use std::path::Path;

use serde::de::DeserializeOwned;
use tether_agent::AgentConfig;
use tether_common::config_collect::{ConfigReport, parse_collect};
use tether_common::config_error::{ConfigErrors, parse_yaml};
use tether_common::config_layers::{self, EnvKey, FlagOverride};
use tether_server::ServerConfig;

use crate::cli::ConfigKind;

/// A config that failed to parse or validate: printed as is, exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct InvalidConfig(pub(crate) String);

fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).map_err(|err| {
        InvalidConfig(format!("cannot read config {}: {err}", path.display())).into()
    })
}

fn base_dir(path: &Path) -> &Path {
    path.parent().unwrap_or(Path::new("."))
}

/// Environment variables that override server.yaml keys (an empty one is not set).
pub(crate) const SERVER_ENV: &[EnvKey] = &[
    EnvKey {
        var: "TETHER_LISTEN",
        path: "listen",
    },
    EnvKey {
        var: "TETHER_ADMIN_LISTEN",
        path: "admin_listen",
    },
    EnvKey {
        var: "TETHER_TLS_CERT",
        path: "tls.cert",
    },
    EnvKey {
        var: "TETHER_TLS_KEY",
        path: "tls.key",
    },
    EnvKey {
        var: "TETHER_TLS_CLIENT_CA",
        path: "tls.client_ca",
    },
    EnvKey {
        var: "TETHER_SERVER_ID",
        path: "server_id",
    },
];

/// Environment variables that override agent.yaml keys (an empty one is not set).
pub(crate) const AGENT_ENV: &[EnvKey] = &[
    EnvKey {
        var: "TETHER_SERVER_URL",
        path: "server_url",
    },
    EnvKey {
        var: "TETHER_SERVER_NAME",
        path: "server_name",
    },
    EnvKey {
        var: "TETHER_ADMIN_LISTEN",
        path: "admin_listen",
    },
    EnvKey {
        var: "TETHER_TLS_CERT",
        path: "tls.cert",
    },
    EnvKey {
        var: "TETHER_TLS_KEY",
        path: "tls.key",
    },
    EnvKey {
        var: "TETHER_TLS_SERVER_CA",
        path: "tls.server_ca",
    },
];

/// The layers above the file: the environment (through a lookup, so tests inject it) and the
/// `--set key.path=value` flags.
pub(crate) struct Overrides<'a> {
    pub(crate) env: &'a dyn Fn(&str) -> Option<String>,
    pub(crate) flags: &'a [FlagOverride],
}

impl Overrides<'static> {
    /// No layer above the file (`check-config`).
    pub(crate) fn none() -> Overrides<'static> {
        Overrides {
            env: &|_| None,
            flags: &[],
        }
    }
}

/// The process environment.
pub(crate) fn process_env(var: &str) -> Option<String> {
    std::env::var(var).ok()
}

/// Parses `text` and writes the layers over it. The file alone is read first, collecting every
/// structural problem with its line (`config_collect`); the merged tree is then parsed again.
/// Returns the config (as far as it could be read) and the problems found so far.
fn layered<T: DeserializeOwned>(
    text: &str,
    source: &str,
    env_keys: &[EnvKey],
    overrides: &Overrides<'_>,
) -> anyhow::Result<(Option<T>, ConfigReport)> {
    let (config, report) = parse_collect::<T>(text, source);
    if !report.problems.is_empty()
        || !config_layers::has_overrides(env_keys, overrides.env, overrides.flags)
    {
        return Ok((config, report));
    }
    let tree: serde_yaml_ng::Value =
        parse_yaml(text, source).map_err(|e| InvalidConfig(e.to_string()))?;
    let merged = config_layers::overlay(tree, env_keys, overrides.env, overrides.flags)
        .map_err(|errors| InvalidConfig(format!("{source}: invalid overrides:\n{errors}")))?;
    let config = serde_yaml_ng::from_value(merged).map_err(|e| {
        InvalidConfig(format!(
            "{source} with environment and --set overrides: {e}"
        ))
    })?;
    Ok((Some(config), report))
}

/// Every problem of the file at once (structure and values), or the config.
fn finish<T>(
    text: &str,
    config: Option<T>,
    mut report: ConfigReport,
    validate: impl FnOnce(&T) -> Result<(), ConfigErrors>,
) -> anyhow::Result<T> {
    let Some(config) = config else {
        return Err(InvalidConfig(report.to_string()).into());
    };
    if let Err(errors) = validate(&config) {
        report.add_value_errors(text, &errors);
    }
    report
        .into_result(config)
        .map_err(|report| InvalidConfig(report.to_string()).into())
}

/// Parses and validates a server config; `source` names it in messages.
pub(crate) fn server_from_str(
    text: &str,
    base: &Path,
    source: &str,
) -> anyhow::Result<ServerConfig> {
    server_layered(text, base, source, &Overrides::none())
}

/// [`server_from_str`] with the environment and flag layers.
pub(crate) fn server_layered(
    text: &str,
    base: &Path,
    source: &str,
    overrides: &Overrides<'_>,
) -> anyhow::Result<ServerConfig> {
    let (config, report) = layered::<ServerConfig>(text, source, SERVER_ENV, overrides)?;
    let config = config.map(|mut config| {
        config.resolve_paths(base);
        config
    });
    finish(text, config, report, ServerConfig::validate)
}

/// Parses and validates an agent config; `source` names it in messages.
pub(crate) fn agent_from_str(text: &str, base: &Path, source: &str) -> anyhow::Result<AgentConfig> {
    agent_layered(text, base, source, &Overrides::none())
}

/// [`agent_from_str`] with the environment and flag layers; the result is the effective config
/// (fallbacks resolved), the form reloads compare.
pub(crate) fn agent_layered(
    text: &str,
    base: &Path,
    source: &str,
    overrides: &Overrides<'_>,
) -> anyhow::Result<AgentConfig> {
    let (config, report) = layered::<AgentConfig>(text, source, AGENT_ENV, overrides)?;
    let config = config.map(|mut config: AgentConfig| {
        config.resolve_paths(base);
        config.effective()
    });
    finish(text, config, report, AgentConfig::validate)
}

/// The directory relative paths in the file at `path` are resolved against, made absolute so
/// that messages name the file that was tried.
fn absolute_base(path: &Path) -> std::path::PathBuf {
    let base = base_dir(path);
    std::path::absolute(base).unwrap_or_else(|_| base.to_owned())
}

pub(crate) fn load_server(path: &Path, overrides: &Overrides<'_>) -> anyhow::Result<ServerConfig> {
    server_layered(
        &read(path)?,
        &absolute_base(path),
        &path.display().to_string(),
        overrides,
    )
}

pub(crate) fn load_agent(path: &Path, overrides: &Overrides<'_>) -> anyhow::Result<AgentConfig> {
    agent_layered(
        &read(path)?,
        &absolute_base(path),
        &path.display().to_string(),
        overrides,
    )
}

/// Validates `path` as `kind` (guessed from its keys when `None`) and says what it found.
pub(crate) fn check(kind: Option<ConfigKind>, path: &Path) -> anyhow::Result<ConfigKind> {
    let kind = match kind {
        Some(kind) => kind,
        None => guess_kind(&read(path)?, &path.display().to_string())?.ok_or_else(|| {
            InvalidConfig(format!(
                "{}: cannot tell whether this is a server or an agent config (no `server_url` or `listen` key); pass --kind",
                path.display()
            ))
        })?,
    };
    match kind {
        ConfigKind::Server => load_server(path, &Overrides::none()).map(|_| kind),
        ConfigKind::Agent => load_agent(path, &Overrides::none()).map(|_| kind),
    }
}

/// Guesses the daemon of the file at `path` from its top-level keys (`tether doctor`).
pub(crate) fn guess_kind_of_file(path: &Path) -> anyhow::Result<Option<ConfigKind>> {
    guess_kind(&read(path)?, &path.display().to_string())
}

/// Guesses the daemon from the top-level keys. A file that is not valid YAML is reported as
/// such (with its line), not as "cannot tell".
fn guess_kind(text: &str, source: &str) -> anyhow::Result<Option<ConfigKind>> {
    let value: serde_yaml_ng::Value =
        parse_yaml(text, source).map_err(|e| InvalidConfig(e.to_string()))?;
    let Some(map) = value.as_mapping() else {
        return Ok(None);
    };
    Ok(if map.contains_key("server_url") {
        Some(ConfigKind::Agent)
    } else if map.contains_key("listen") || map.contains_key("forwards") {
        Some(ConfigKind::Server)
    } else {
        None
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "server_url: \"wss://file:1/v1/connect\"\n\
                        tls: { cert: a.pem, key: b.pem, server_ca: c.pem }\n\
                        reconnect: { max_delay: 30s }\n";

    fn agent(env: &dyn Fn(&str) -> Option<String>, flags: &[&str]) -> AgentConfig {
        let flags: Vec<FlagOverride> = flags
            .iter()
            .map(|f| FlagOverride::parse(f).unwrap())
            .collect();
        let overrides = Overrides { env, flags: &flags };
        layered::<AgentConfig>(FILE, "agent.yaml", AGENT_ENV, &overrides)
            .unwrap()
            .0
            .unwrap()
            .effective()
    }

    #[test]
    fn defaults_file_env_flags_in_that_order() {
        let none = |_: &str| None;
        let env_url = |var: &str| (var == "TETHER_SERVER_URL").then(|| "wss://env:2/x".to_owned());
        let empty = |var: &str| (var == "TETHER_SERVER_URL").then(String::new);
        let from_file = agent(&none, &[]);
        assert_eq!(from_file.server_url, "wss://file:1/v1/connect");
        assert_eq!(from_file.reconnect.max_delay.to_string(), "30s");
        // A default shows through where no layer sets the key.
        assert_eq!(from_file.connect_timeout.to_string(), "10s");
        assert_eq!(agent(&env_url, &[]).server_url, "wss://env:2/x");
        let flagged = agent(
            &env_url,
            &["server_url=wss://flag:3/y", "reconnect.max_delay=5s"],
        );
        assert_eq!(flagged.server_url, "wss://flag:3/y");
        assert_eq!(flagged.reconnect.max_delay.to_string(), "5s");
        // Empty values in the more specific layers fall back to the file.
        assert_eq!(agent(&empty, &["server_url="]), from_file);
    }

    #[test]
    fn fallbacks_are_resolved_before_comparison() {
        let none = |_: &str| None;
        let spelled = agent(&none, &["server_name=file"]);
        assert_eq!(spelled, agent(&none, &[]));
        assert_eq!(spelled.server_name, "file");
        assert!(
            tether_common::config_diff::changed_fields(&spelled, &agent(&none, &[])).is_empty()
        );
    }

    #[test]
    fn unknown_flag_keys_are_errors() {
        let flags = [FlagOverride::parse("no_such_key=1").unwrap()];
        let overrides = Overrides {
            env: &|_| None,
            flags: &flags,
        };
        let err = layered::<AgentConfig>(FILE, "agent.yaml", AGENT_ENV, &overrides).unwrap_err();
        assert!(err.to_string().contains("no_such_key"), "{err}");
    }
}
