//! Loading the daemons' YAML configs: parse, resolve relative paths, validate, and report every
//! problem with its key path.

use std::path::Path;

use tether_agent::AgentConfig;
use tether_common::config_error::parse_yaml;
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

/// Parses and validates a server config; `source` names it in messages.
pub(crate) fn server_from_str(
    text: &str,
    base: &Path,
    source: &str,
) -> anyhow::Result<ServerConfig> {
    let mut config: ServerConfig =
        parse_yaml(text, source).map_err(|e| InvalidConfig(e.to_string()))?;
    config.resolve_paths(base);
    config
        .validate()
        .map_err(|errors| InvalidConfig(format!("{source}: invalid server config:\n{errors}")))?;
    Ok(config)
}

/// Parses and validates an agent config; `source` names it in messages.
pub(crate) fn agent_from_str(text: &str, base: &Path, source: &str) -> anyhow::Result<AgentConfig> {
    let mut config: AgentConfig =
        parse_yaml(text, source).map_err(|e| InvalidConfig(e.to_string()))?;
    config.resolve_paths(base);
    config
        .validate()
        .map_err(|errors| InvalidConfig(format!("{source}: invalid agent config:\n{errors}")))?;
    Ok(config)
}

pub(crate) fn load_server(path: &Path) -> anyhow::Result<ServerConfig> {
    server_from_str(&read(path)?, base_dir(path), &path.display().to_string())
}

pub(crate) fn load_agent(path: &Path) -> anyhow::Result<AgentConfig> {
    agent_from_str(&read(path)?, base_dir(path), &path.display().to_string())
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
        ConfigKind::Server => load_server(path).map(|_| kind),
        ConfigKind::Agent => load_agent(path).map(|_| kind),
    }
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
