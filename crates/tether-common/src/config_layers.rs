//! Effective-config layering: built-in defaults < YAML file < `TETHER_*` environment < flags.
//!
//! The file is parsed as a YAML tree; each environment variable of a daemon's table and each
//! `--set key.path=value` flag is written over it at its key path, and serde then fills what is
//! still missing with the defaults. A value that is empty in a more specific layer (an empty
//! environment variable, `--set key=`) is *not set*: the less specific layer shows through. The
//! environment is read through a lookup function, so tests inject it instead of mutating the
//! process environment.

use serde_yaml_ng::{Mapping, Value};

use crate::config_error::ConfigErrors;

/// One environment variable that overrides one key of a daemon's config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EnvKey {
    /// The variable, e.g. `TETHER_SERVER_URL`.
    pub var: &'static str,
    /// The key path it sets, e.g. `server_url` or `tls.cert`.
    pub path: &'static str,
}

/// A `--set key.path=value` flag, already split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlagOverride {
    /// The key path, e.g. `reconnect.max_delay`.
    pub path: String,
    /// The value, parsed as a YAML scalar or flow value (`10s`, `8`, `[a, b]`).
    pub value: String,
}

impl FlagOverride {
    /// Parses `key.path=value`.
    pub fn parse(text: &str) -> Result<FlagOverride, String> {
        let (path, value) = text
            .split_once('=')
            .ok_or_else(|| format!("`{text}` is not key.path=value"))?;
        let path = path.trim();
        if path.is_empty() || path.split('.').any(str::is_empty) {
            return Err(format!(
                "`{path}` is not a key path such as reconnect.max_delay"
            ));
        }
        Ok(FlagOverride {
            path: path.to_owned(),
            value: value.to_owned(),
        })
    }
}

/// Writes the environment and flag layers over `file` (the parsed YAML document; `Null` for an
/// empty file). Environment values are strings; flag values are YAML. Empty values are skipped.
pub fn overlay(
    mut file: Value,
    env_keys: &[EnvKey],
    env: &dyn Fn(&str) -> Option<String>,
    flags: &[FlagOverride],
) -> Result<Value, ConfigErrors> {
    let mut errors = ConfigErrors::new();
    for key in env_keys {
        let Some(text) = env(key.var).filter(|v| !v.trim().is_empty()) else {
            continue;
        };
        if let Err(message) = set_path(&mut file, key.path, Value::String(text)) {
            errors.push(key.path, format!("from ${}: {message}", key.var));
        }
    }
    for flag in flags {
        if flag.value.trim().is_empty() {
            continue;
        }
        let value = match serde_yaml_ng::from_str::<Value>(&flag.value) {
            Ok(value) => value,
            Err(err) => {
                errors.push(&flag.path, format!("from --set: not a YAML value: {err}"));
                continue;
            }
        };
        if let Err(message) = set_path(&mut file, &flag.path, value) {
            errors.push(&flag.path, format!("from --set: {message}"));
        }
    }
    errors.into_result(file)
}

/// Whether any layer above the file sets something (so the file alone is the effective source).
pub fn has_overrides(
    env_keys: &[EnvKey],
    env: &dyn Fn(&str) -> Option<String>,
    flags: &[FlagOverride],
) -> bool {
    env_keys
        .iter()
        .any(|k| env(k.var).is_some_and(|v| !v.trim().is_empty()))
        || flags.iter().any(|f| !f.value.trim().is_empty())
}

fn set_path(root: &mut Value, path: &str, value: Value) -> Result<(), String> {
    let mut node = root;
    let mut parts = path.split('.').peekable();
    while let Some(part) = parts.next() {
        if node.is_null() {
            *node = Value::Mapping(Mapping::new());
        }
        let Value::Mapping(map) = node else {
            return Err(format!("`{part}` is inside a value that is not a map"));
        };
        let key = Value::String(part.to_owned());
        if parts.peek().is_none() {
            map.insert(key, value);
            return Ok(());
        }
        node = map.entry(key).or_insert(Value::Null);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEYS: &[EnvKey] = &[
        EnvKey {
            var: "TETHER_SERVER_URL",
            path: "server_url",
        },
        EnvKey {
            var: "TETHER_TLS_CERT",
            path: "tls.cert",
        },
    ];

    fn env(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |var| {
            pairs
                .iter()
                .find(|(k, _)| *k == var)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    fn yaml(text: &str) -> Value {
        serde_yaml_ng::from_str(text).unwrap()
    }

    #[test]
    fn env_beats_file_and_flags_beat_env() {
        let file = yaml("server_url: wss://file/\ntls: {cert: a.pem, key: k.pem}\n");
        let flags = [FlagOverride::parse("server_url=wss://flag/").unwrap()];
        let env = env(&[
            ("TETHER_SERVER_URL", "wss://env/"),
            ("TETHER_TLS_CERT", "b.pem"),
        ]);
        let merged = overlay(file.clone(), KEYS, &env, &flags).unwrap();
        assert_eq!(
            merged,
            yaml("server_url: wss://flag/\ntls: {cert: b.pem, key: k.pem}\n")
        );
        let merged = overlay(file, KEYS, &env, &[]).unwrap();
        assert_eq!(merged["server_url"], yaml("wss://env/"));
    }

    #[test]
    fn empty_values_fall_back_to_the_less_specific_layer() {
        let file = yaml("server_url: wss://file/\n");
        let flags = [FlagOverride::parse("server_url=").unwrap()];
        let env = env(&[("TETHER_SERVER_URL", " ")]);
        assert!(!has_overrides(KEYS, &env, &flags));
        assert_eq!(overlay(file.clone(), KEYS, &env, &flags).unwrap(), file);
    }

    #[test]
    fn flags_create_nested_keys_and_report_bad_paths() {
        let flags = [FlagOverride::parse("reconnect.max_delay=5s").unwrap()];
        let merged = overlay(Value::Null, KEYS, &|_| None, &flags).unwrap();
        assert_eq!(merged, yaml("reconnect: {max_delay: 5s}\n"));
        let flags = [FlagOverride::parse("server_url.x=1").unwrap()];
        let err = overlay(yaml("server_url: a\n"), KEYS, &|_| None, &flags).unwrap_err();
        assert!(err.to_string().contains("server_url.x"), "{err}");
        assert!(FlagOverride::parse("novalue").is_err());
        assert!(FlagOverride::parse("a..b=1").is_err());
    }
}
