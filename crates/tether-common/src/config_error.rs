//! Config file errors: YAML parse errors that name the file, line and column, and the
//! collected validation errors (`path`: message) of a parsed configuration.

use std::fmt;
use std::path::Path;

use serde::de::DeserializeOwned;

/// One validation problem at a key path, e.g. `` `frontends[2].listen`: port 0 is not allowed ``.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Dotted key path (`server.url`, `policy.allow[0].ports`).
    pub path: String,
    /// What is wrong, for a human.
    pub message: String,
}

impl FieldError {
    /// A problem at `path`.
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}`: {}", self.path, self.message)
    }
}

impl std::error::Error for FieldError {}

/// Every validation problem of a configuration, so that all are reported at once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<FieldError>);

impl ConfigErrors {
    /// No errors yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a problem at `path`.
    pub fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError::new(path, message));
    }

    /// Whether no problem was recorded.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// How many problems were recorded.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// `Ok(value)` if no problem was recorded, else `Err(self)`: the end of a `validate`.
    pub fn into_result<T>(self, value: T) -> Result<T, ConfigErrors> {
        if self.is_empty() {
            Ok(value)
        } else {
            Err(self)
        }
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, err) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{err}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl From<Vec<FieldError>> for ConfigErrors {
    fn from(errors: Vec<FieldError>) -> Self {
        Self(errors)
    }
}

/// Why a configuration file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigLoadError {
    /// The file could not be read.
    #[error("cannot read {source_name}: {source}")]
    Read {
        /// The file name.
        source_name: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The text is not valid YAML or does not match the expected structure
    /// (unknown field, wrong type, duplicate key, ...).
    #[error("{source_name}{}: {message}", Location(*line, *column))]
    Parse {
        /// The file name (or another description of where the text came from).
        source_name: String,
        /// 1-based line of the problem, when known.
        line: Option<usize>,
        /// 1-based column of the problem, when known.
        column: Option<usize>,
        /// The parser's message (names the key path and, for unknown fields, the field).
        message: String,
    },
    /// The configuration parsed but failed validation.
    #[error("{source_name}: invalid configuration:\n{errors}")]
    Invalid {
        /// The file name.
        source_name: String,
        /// Every problem found.
        errors: ConfigErrors,
    },
}

/// Renders `:line:column` (compiler style) when known.
struct Location(Option<usize>, Option<usize>);

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.0, self.1) {
            (Some(line), Some(column)) => write!(f, ":{line}:{column}"),
            (Some(line), None) => write!(f, ":{line}"),
            _ => Ok(()),
        }
    }
}

/// Parses YAML `text` into `T`; errors name `source_name` and the line and column.
///
/// Use `#[serde(deny_unknown_fields)]` on `T` so that a typo is an error that names the field.
/// Duplicate keys are errors at any depth, also inside map-typed fields.
pub fn parse_yaml<T: DeserializeOwned>(
    text: &str,
    source_name: &str,
) -> Result<T, ConfigLoadError> {
    // Deserializing into `T` refuses duplicate struct fields (serde's derive), but a map-typed
    // field (`HashMap`, `BTreeMap`) silently keeps the last duplicate: check the whole document
    // for duplicate keys first.
    serde::de::DeserializeSeed::deserialize(
        NoDuplicateKeys,
        serde_yaml_ng::Deserializer::from_str(text),
    )
    .and_then(|()| serde_yaml_ng::from_str(text))
    .map_err(|err| {
        let location = err.location();
        let line = location.as_ref().map(|l| l.line());
        let column = location.as_ref().map(|l| l.column());
        let mut message = err.to_string();
        // serde_yaml_ng appends " at line L column C"; the position is already in front.
        if let (Some(line), Some(column)) = (line, column) {
            let suffix = format!(" at line {line} column {column}");
            if let Some(stripped) = message.strip_suffix(&suffix) {
                message = stripped.to_owned();
            }
        }
        ConfigLoadError::Parse {
            source_name: source_name.to_owned(),
            line,
            column,
            message,
        }
    })
}

/// A pass over a YAML document that fails on the first mapping with a repeated key.
/// serde_yaml_ng prefixes the error with the mapping's key path and positions it at the start
/// of that mapping.
struct NoDuplicateKeys;

impl<'de> serde::de::DeserializeSeed<'de> for NoDuplicateKeys {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for NoDuplicateKeys {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_i128<E>(self, _: i128) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u128<E>(self, _: u128) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_none<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
    fn visit_newtype_struct<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(NoDuplicateKeys)?.is_some() {}
        Ok(())
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut seen = std::collections::HashSet::new();
        while let Some(key) = map.next_key::<serde_yaml_ng::Value>()? {
            let name = match &key {
                serde_yaml_ng::Value::String(s) => s.clone(),
                serde_yaml_ng::Value::Number(n) => n.to_string(),
                serde_yaml_ng::Value::Bool(b) => b.to_string(),
                serde_yaml_ng::Value::Null => "null".to_owned(),
                _ => "<complex key>".to_owned(),
            };
            if !seen.insert(key) {
                return Err(serde::de::Error::custom(format_args!(
                    "duplicate key `{name}`"
                )));
            }
            map.next_value_seed(NoDuplicateKeys)?;
        }
        Ok(())
    }

    fn visit_enum<A: serde::de::EnumAccess<'de>>(self, data: A) -> Result<(), A::Error> {
        // A tagged value (`!tag value`): check the value.
        use serde::de::VariantAccess;
        let (_, variant) = data.variant::<serde::de::IgnoredAny>()?;
        variant.newtype_variant_seed(self)
    }
}

/// Reads and parses a YAML file with [`parse_yaml`].
pub fn load_yaml_file<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigLoadError> {
    let source_name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigLoadError::Read {
        source_name: source_name.clone(),
        source,
    })?;
    parse_yaml(&text, &source_name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use std::collections::BTreeMap;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Server {
        listen: String,
        #[serde(default)]
        agents: BTreeMap<String, Agent>,
        #[serde(default)]
        tls: Option<Tls>,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Agent {
        allow: Vec<String>,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Tls {
        cert: String,
    }

    fn parse_err(text: &str) -> ConfigLoadError {
        parse_yaml::<Server>(text, "server.yaml").unwrap_err()
    }

    #[test]
    fn parses_valid_yaml() {
        let s: Server = parse_yaml(
            "listen: 127.0.0.1:8443\nagents:\n  edge-1:\n    allow: [a]\n",
            "server.yaml",
        )
        .unwrap();
        assert_eq!(s.listen, "127.0.0.1:8443");
        assert_eq!(s.agents["edge-1"].allow, vec!["a".to_string()]);
    }

    #[test]
    fn unknown_field_names_file_line_column_and_field() {
        let err = parse_err("listen: x\ntls:\n  cert: a\n  kee: b\n");
        let ConfigLoadError::Parse {
            line,
            column,
            ref message,
            ..
        } = err
        else {
            panic!("{err:?}")
        };
        assert_eq!(line, Some(4));
        assert_eq!(column, Some(3));
        assert!(message.contains("unknown field `kee`"), "{message}");
        assert!(message.contains("tls"), "key path in {message}");
        let text = err.to_string();
        assert!(text.starts_with("server.yaml:4:3: "), "{text}");
        assert!(!text.contains("at line"), "position printed once: {text}");
    }

    #[test]
    fn duplicate_keys_are_errors() {
        let err = parse_err("listen: a\nlisten: b\n");
        let text = err.to_string();
        // serde's derive detects this one and reports it at the start of the mapping.
        assert_eq!(text, "server.yaml:1:1: duplicate key `listen`");

        // Duplicate keys inside a map-typed field are refused too.
        let err = parse_err("listen: a\nagents:\n  edge-1: {allow: []}\n  edge-1: {allow: [x]}\n");
        let text = err.to_string();
        // Positioned at the start of the `agents` mapping, naming the full key path.
        assert_eq!(text, "server.yaml:3:3: agents: duplicate key `edge-1`");

        let err = parse_err("listen: a\nlist:\n  - {k: 1, k: 2}\n");
        assert!(
            err.to_string().ends_with("list[0]: duplicate key `k`"),
            "{err}"
        );
    }

    #[test]
    fn syntax_and_type_errors_have_positions() {
        let err = parse_err("listen: [unclosed\n");
        assert!(
            matches!(err, ConfigLoadError::Parse { line: Some(_), .. }),
            "{err}"
        );
        assert!(err.to_string().starts_with("server.yaml:"), "{err}");

        let err = parse_err("listen: x\nagents:\n  edge-1:\n    allow: 5\n");
        let text = err.to_string();
        assert!(text.starts_with("server.yaml:4:"), "{text}");
        assert!(text.contains("agents.edge-1.allow"), "{text}");

        let err = parse_err("tls: {cert: a}\n");
        assert!(err.to_string().contains("missing field `listen`"), "{err}");
    }

    #[test]
    fn field_errors_display() {
        let e = FieldError::new("server.url", "must start with wss://");
        assert_eq!(e.to_string(), "`server.url`: must start with wss://");

        let mut errors = ConfigErrors::new();
        assert!(errors.clone().into_result(1).is_ok());
        errors.push("a", "one");
        errors.push("b.c", "two");
        assert_eq!(errors.len(), 2);
        assert_eq!(errors.to_string(), "`a`: one\n`b.c`: two");
        let invalid = ConfigLoadError::Invalid {
            source_name: "agent.yaml".into(),
            errors: errors.clone(),
        };
        assert_eq!(
            invalid.to_string(),
            "agent.yaml: invalid configuration:\n`a`: one\n`b.c`: two"
        );
        assert_eq!(errors.into_result(()).unwrap_err().len(), 2);
    }

    #[test]
    fn load_yaml_file_names_a_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent.yaml");
        let err = load_yaml_file::<Server>(&path).unwrap_err();
        assert!(matches!(err, ConfigLoadError::Read { .. }));
        assert!(err.to_string().contains("absent.yaml"), "{err}");

        let path = dir.path().join("server.yaml");
        std::fs::write(&path, "listen: x\nbogus: 1\n").unwrap();
        let err = load_yaml_file::<Server>(&path).unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with(&format!("{}:2:1: ", path.display())),
            "{text}"
        );
    }
}
