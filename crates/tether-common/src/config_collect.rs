//! Every problem of a YAML config file in one pass: structural mistakes (unknown keys with a
//! did-you-mean, wrong types in words, bad values a field's parser refuses) and the value checks
//! of `validate`, each placed at its file, line and column and named by its key path.
//!
//! Structural mistakes are found one at a time by deserializing the document's tree with
//! `serde_path_to_error`, which names the key path of the first one; that key (or list entry)
//! is then taken out of the tree and the rest is deserialized again, a bounded number of times.
//! The line and column of a key path are found in the original text by walking the YAML events
//! to that key ([`locate`]): serde_yaml_ng places an error raised while reading a node at that
//! node.

use std::fmt;

use serde::de::{DeserializeOwned, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_yaml_ng::Value;

use crate::config_error::{ConfigErrors, ConfigLoadError, parse_yaml};

/// Most structural problems collected from one file (each costs one more deserialization).
pub const MAX_PROBLEMS: usize = 64;

/// One problem of a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Key path (`tls.cert`, `forwards[0].listen`); empty for the document itself.
    pub path: String,
    /// 1-based line, when the key is in the file.
    pub line: Option<usize>,
    /// 1-based column, when the key is in the file.
    pub column: Option<usize>,
    /// What is wrong, in words.
    pub message: String,
}

/// Every problem of one file, in file order; displayed one per line as
/// ``file:line:column: `key.path`: message``.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigReport {
    /// The file name.
    pub source_name: String,
    /// The problems, sorted by position (problems without one last).
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count = self.problems.len();
        writeln!(
            f,
            "{}: {count} {}:",
            self.source_name,
            if count == 1 { "problem" } else { "problems" }
        )?;
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            f.write_str(&self.source_name)?;
            match (p.line, p.column) {
                (Some(line), Some(column)) => write!(f, ":{line}:{column}")?,
                (Some(line), None) => write!(f, ":{line}")?,
                _ => {}
            }
            if p.path.is_empty() {
                write!(f, ": {}", p.message)?;
            } else {
                write!(f, ": `{}`: {}", p.path, p.message)?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for ConfigReport {}

impl ConfigReport {
    /// Places the value checks of `errors` (key paths only) in `text` and adds them.
    pub fn add_value_errors(&mut self, text: &str, errors: &ConfigErrors) {
        for err in &errors.0 {
            let (line, column) = locate(text, &err.path);
            self.problems.push(Problem {
                path: err.path.clone(),
                line,
                column,
                message: err.message.clone(),
            });
        }
    }

    /// Sorts the problems by position; `Err(self)` when there are any.
    pub fn into_result<T>(mut self, value: T) -> Result<T, ConfigReport> {
        if self.problems.is_empty() {
            return Ok(value);
        }
        self.problems
            .sort_by_key(|p| (p.line.unwrap_or(usize::MAX), p.column.unwrap_or(0)));
        Err(self)
    }
}

/// The structural pass over `text`: the config as far as it could be read (mistaken keys
/// taken out, so their defaults apply and the value checks can still run on the rest), and
/// every structural problem. `None` when the text is not YAML at all, or a required key is
/// missing at the top.
pub fn parse_collect<T: DeserializeOwned>(
    text: &str,
    source_name: &str,
) -> (Option<T>, ConfigReport) {
    let mut report = ConfigReport {
        source_name: source_name.to_owned(),
        problems: Vec::new(),
    };
    // What the strict loader accepts is accepted here too (it reads scalars such as `7` into
    // string fields; the tree below would not): the two loaders agree on every valid file.
    if let Ok(value) = parse_yaml::<T>(text, source_name) {
        return (Some(value), report);
    }
    // Syntax errors and duplicate keys: one problem, nothing else can be read reliably.
    let mut tree: Value = match parse_yaml(text, source_name) {
        Ok(tree) => tree,
        Err(err) => {
            report.problems.push(load_problem(err));
            return (None, report);
        }
    };
    for _ in 0..MAX_PROBLEMS {
        let err = match serde_path_to_error::deserialize::<_, T>(tree.clone()) {
            Ok(value) => {
                if report.problems.is_empty() {
                    // The common case: read from the text itself, exactly as before.
                    return match parse_yaml(text, source_name) {
                        Ok(value) => (Some(value), report),
                        Err(err) => {
                            report.problems.push(load_problem(err));
                            (None, report)
                        }
                    };
                }
                return (Some(value), report);
            }
            Err(err) => err,
        };
        let mut segments = segments_of(err.path());
        let raw = err.inner().to_string();
        let (message, remove) = explain(&raw, &mut segments);
        let path = render_path(&segments);
        let (line, column) = locate_segments(text, &segments);
        report.problems.push(Problem {
            path,
            line,
            column,
            message,
        });
        let Remove::Key = remove;
        if segments.is_empty() || !remove_at(&mut tree, &segments) {
            return (None, report);
        }
    }
    (None, report)
}

/// One key path segment.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Key(String),
    Index(usize),
}

fn segments_of(path: &serde_path_to_error::Path) -> Vec<Segment> {
    path.iter()
        .filter_map(|segment| match segment {
            serde_path_to_error::Segment::Seq { index } => Some(Segment::Index(*index)),
            serde_path_to_error::Segment::Map { key } => Some(Segment::Key(key.clone())),
            serde_path_to_error::Segment::Enum { variant } => Some(Segment::Key(variant.clone())),
            serde_path_to_error::Segment::Unknown => None,
        })
        .collect()
}

/// `a.b[0].c`.
fn render_path(segments: &[Segment]) -> String {
    let mut out = String::new();
    for segment in segments {
        match segment {
            Segment::Key(key) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Segment::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// Parses `a.b[0].c` into segments.
fn parse_path(path: &str) -> Vec<Segment> {
    let mut out = Vec::new();
    for part in path.split('.').filter(|p| !p.is_empty()) {
        let (key, mut rest) = match part.find('[') {
            Some(i) => part.split_at(i),
            None => (part, ""),
        };
        if !key.is_empty() {
            out.push(Segment::Key(key.to_owned()));
        }
        while let Some(after) = rest.strip_prefix('[') {
            let Some((index, tail)) = after.split_once(']') else {
                break;
            };
            match index.parse() {
                Ok(i) => out.push(Segment::Index(i)),
                Err(_) => out.push(Segment::Key(index.to_owned())),
            }
            rest = tail;
        }
    }
    out
}

/// What to take out of the tree to get past a problem.
enum Remove {
    /// The key (or list entry) at the problem's path.
    Key,
}

/// The problem in words, and what to remove. An unknown key's name is appended to `segments`.
fn explain(raw: &str, segments: &mut Vec<Segment>) -> (String, Remove) {
    if let Some(rest) = raw.strip_prefix("unknown field `") {
        let (name, tail) = rest.split_once('`').unwrap_or((rest, ""));
        if segments.last() != Some(&Segment::Key(name.to_owned())) {
            segments.push(Segment::Key(name.to_owned()));
        }
        let expected = expected_names(tail);
        let message = match did_you_mean(name, &expected) {
            Some(best) => format!("unknown key `{name}`; did you mean `{best}`?"),
            None if expected.is_empty() => format!("unknown key `{name}`"),
            None => format!(
                "unknown key `{name}`; the keys here are {}",
                expected
                    .iter()
                    .map(|k| format!("`{k}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        return (message, Remove::Key);
    }
    if let Some(rest) = raw.strip_prefix("missing field `") {
        let name = rest.split('`').next().unwrap_or(rest);
        // The path is the mapping that lacks the key: it goes (a list entry, or a section
        // whose defaults then apply).
        return (format!("required key `{name}` is missing"), Remove::Key);
    }
    if let Some(rest) = raw.strip_prefix("invalid type: ") {
        if let Some((found, expected)) = rest.split_once(", expected ") {
            return (
                format!(
                    "expected {}, found {}",
                    in_words(expected),
                    found_words(found)
                ),
                Remove::Key,
            );
        }
    }
    if let Some(rest) = raw.strip_prefix("invalid length ") {
        return (format!("wrong number of items: {rest}"), Remove::Key);
    }
    (raw.to_owned(), Remove::Key)
}

/// The names listed after `, expected one of `a`, `b`` (or `expected `a``).
fn expected_names(tail: &str) -> Vec<String> {
    tail.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

/// serde's type names in words.
fn in_words(expected: &str) -> String {
    match expected {
        "usize" | "u64" | "u32" | "u16" | "u8" => "a whole number (0 or more)".to_owned(),
        "i64" | "i32" | "i16" | "i8" | "isize" => "a whole number".to_owned(),
        "f64" | "f32" => "a number".to_owned(),
        "a boolean" => "true or false".to_owned(),
        "a string" => "a string".to_owned(),
        "a sequence" => "a list (`[a, b]`, or one `- item` per line)".to_owned(),
        "a map" => "a mapping (`key: value` lines)".to_owned(),
        other if other.starts_with("struct ") => "a mapping (`key: value` lines)".to_owned(),
        other if other.starts_with("a sequence") => "a list".to_owned(),
        other => other.to_owned(),
    }
}

/// serde's `Unexpected` in words.
fn found_words(found: &str) -> String {
    if let Some(rest) = found.strip_prefix("string ") {
        return format!("the string {rest}");
    }
    if let Some(rest) = found.strip_prefix("integer ") {
        return format!("the number {}", rest.trim_matches('`'));
    }
    if let Some(rest) = found.strip_prefix("floating point ") {
        return format!("the number {}", rest.trim_matches('`'));
    }
    if let Some(rest) = found.strip_prefix("boolean ") {
        return rest.trim_matches('`').to_owned();
    }
    match found {
        "sequence" => "a list".to_owned(),
        "map" => "a mapping".to_owned(),
        "unit value" => "nothing (an empty value)".to_owned(),
        other => other.to_owned(),
    }
}

/// The closest of `candidates` to `name`, when it is close enough to be a typo.
pub fn did_you_mean<'a>(name: &str, candidates: &'a [String]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| (edit_distance(name, c), c))
        .filter(|(d, c)| *d <= (c.len().max(name.len()) / 3).max(1))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c.as_str())
}

/// Levenshtein distance over characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut previous = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitute = previous + usize::from(ca != *cb);
            previous = row[j + 1];
            row[j + 1] = substitute.min(previous + 1).min(row[j] + 1);
        }
    }
    row[b.len()]
}

/// Removes the node at `segments`; whether it was there.
fn remove_at(tree: &mut Value, segments: &[Segment]) -> bool {
    let Some((last, parents)) = segments.split_last() else {
        return false;
    };
    let mut node = tree;
    for segment in parents {
        let next = match (segment, node) {
            (Segment::Key(key), Value::Mapping(map)) => map.get_mut(key.as_str()),
            (Segment::Index(i), Value::Sequence(items)) => items.get_mut(*i),
            _ => None,
        };
        match next {
            Some(next) => node = next,
            None => return false,
        }
    }
    match (last, node) {
        (Segment::Key(key), Value::Mapping(map)) => map.remove(key.as_str()).is_some(),
        (Segment::Index(i), Value::Sequence(items)) if *i < items.len() => {
            items.remove(*i);
            true
        }
        _ => false,
    }
}

/// The 1-based line and column of the key (or list entry) at `path` (`a.b[0].c`) in `text`;
/// `(None, None)` when it is not written there (a default, or an override).
pub fn locate(text: &str, path: &str) -> (Option<usize>, Option<usize>) {
    locate_segments(text, &parse_path(path))
}

/// The marker error [`Probe`] raises at the node it looks for.
const HERE: &str = "tether-config-probe-here";

fn locate_segments(text: &str, segments: &[Segment]) -> (Option<usize>, Option<usize>) {
    if segments.is_empty() {
        return (None, None);
    }
    let deserializer = serde_yaml_ng::Deserializer::from_str(text);
    match (Probe { rest: segments }).deserialize(deserializer) {
        Err(err) if err.to_string().contains(HERE) => match err.location() {
            Some(l) => (Some(l.line()), Some(l.column())),
            None => (None, None),
        },
        _ => (None, None),
    }
}

/// Walks to `rest` and fails there: at the key for a mapping entry, at the node for a list
/// entry.
struct Probe<'a> {
    rest: &'a [Segment],
}

impl<'de> DeserializeSeed<'de> for Probe<'_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Probe<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML value")
    }

    fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<(), E> {
        self.leaf()
    }
    fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<(), E> {
        self.leaf()
    }
    fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<(), E> {
        self.leaf()
    }
    fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<(), E> {
        self.leaf()
    }
    fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<(), E> {
        self.leaf()
    }
    fn visit_unit<E: serde::de::Error>(self) -> Result<(), E> {
        self.leaf()
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        if self.rest.is_empty() {
            return Err(serde::de::Error::custom(HERE));
        }
        let mut index = 0;
        loop {
            let found = match self.rest.first() {
                Some(Segment::Index(i)) if *i == index => seq.next_element_seed(Probe {
                    rest: &self.rest[1..],
                })?,
                _ => seq.next_element::<IgnoredAny>()?.map(|_| ()),
            };
            if found.is_none() {
                return Ok(());
            }
            index += 1;
        }
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        if self.rest.is_empty() {
            return Err(serde::de::Error::custom(HERE));
        }
        let wanted = match self.rest.first() {
            Some(Segment::Key(key)) => Some(key.as_str()),
            _ => None,
        };
        let last = self.rest.len() == 1;
        while let Some(matched) = map.next_key_seed(KeyProbe { wanted, last })? {
            if matched {
                map.next_value_seed(Probe {
                    rest: &self.rest[1..],
                })?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(())
    }
}

impl Probe<'_> {
    fn leaf<E: serde::de::Error>(self) -> Result<(), E> {
        if self.rest.is_empty() {
            Err(E::custom(HERE))
        } else {
            Ok(())
        }
    }
}

/// Reads one mapping key: whether it is the wanted one; fails at it when it is the last
/// segment of the path.
struct KeyProbe<'a> {
    wanted: Option<&'a str>,
    last: bool,
}

impl<'de> DeserializeSeed<'de> for KeyProbe<'_> {
    type Value = bool;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        // The error must be raised inside the key's own `deserialize_any` to carry its mark.
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for KeyProbe<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping key")
    }

    fn visit_str<E: serde::de::Error>(self, key: &str) -> Result<bool, E> {
        let matched = self.wanted == Some(key);
        if matched && self.last {
            return Err(E::custom(HERE));
        }
        Ok(matched)
    }
    fn visit_i64<E: serde::de::Error>(self, key: i64) -> Result<bool, E> {
        self.visit_str(&key.to_string())
    }
    fn visit_u64<E: serde::de::Error>(self, key: u64) -> Result<bool, E> {
        self.visit_str(&key.to_string())
    }
    fn visit_bool<E: serde::de::Error>(self, key: bool) -> Result<bool, E> {
        self.visit_str(&key.to_string())
    }
    fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_unit<E: serde::de::Error>(self) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<bool, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(false)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(false)
    }
}

fn load_problem(err: ConfigLoadError) -> Problem {
    match err {
        ConfigLoadError::Parse {
            line,
            column,
            message,
            ..
        } => Problem {
            path: String::new(),
            line,
            column,
            message,
        },
        other => Problem {
            path: String::new(),
            line: None,
            column: None,
            message: other.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::duration::HumanDuration;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Config {
        #[serde(default)]
        max_agents: usize,
        #[serde(default)]
        allowed_agents: Vec<String>,
        #[serde(default)]
        tls: Tls,
        #[serde(default)]
        forwards: Vec<Forward>,
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Tls {
        #[serde(default)]
        cert: String,
        #[serde(default)]
        timeout: Option<HumanDuration>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Forward {
        name: String,
        target: String,
    }

    const TEXT: &str = "\
max_agnets: 5
max_agents: many
allowed_agents: edge-1
tls:
  cert: a.pem
  timeout: 10
forwards:
  - name: ok
    target: x:1
  - name: no-target
";

    #[test]
    fn every_structural_problem_with_line_and_key_path() {
        let (config, report) = parse_collect::<Config>(TEXT, "s.yaml");
        let config = config.expect("the rest is still read");
        assert_eq!(config.tls.cert, "a.pem");
        assert_eq!(config.forwards.len(), 1);
        let text = report.clone().into_result(()).unwrap_err().to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "s.yaml: 5 problems:", "{text}");
        assert_eq!(
            lines[1],
            "s.yaml:1:1: `max_agnets`: unknown key `max_agnets`; did you mean `max_agents`?"
        );
        assert_eq!(
            lines[2],
            "s.yaml:2:1: `max_agents`: expected a whole number (0 or more), found the string \"many\""
        );
        assert!(
            lines[3].starts_with("s.yaml:3:1: `allowed_agents`: expected a list"),
            "{text}"
        );
        assert!(
            lines[4].starts_with("s.yaml:6:3: `tls.timeout`: expected a duration such as"),
            "{text}"
        );
        assert_eq!(
            lines[5], "s.yaml:10:5: `forwards[1]`: required key `target` is missing",
            "{text}"
        );
    }

    #[test]
    fn a_valid_file_has_no_problems_and_syntax_errors_stop_early() {
        let (config, report) = parse_collect::<Config>("max_agents: 3\n", "s.yaml");
        assert_eq!(config.unwrap().max_agents, 3);
        assert!(report.problems.is_empty());
        let (config, report) = parse_collect::<Config>("max_agents: [\n", "s.yaml");
        assert!(config.is_none());
        assert_eq!(report.problems.len(), 1);
        assert!(report.problems[0].line.is_some());
    }

    #[test]
    fn scalars_read_into_strings_as_the_strict_loader_reads_them() {
        #[derive(Debug, Deserialize)]
        struct Labelled {
            labels: std::collections::BTreeMap<String, String>,
        }
        // Found by the config fuzzer: the strict loader reads `7` and `true` into strings; the
        // collecting one refused them, so check-config and the daemon disagreed with it.
        let text = "labels: { rack: 7, canary: true, zone: eu-1 }\n";
        let strict: Labelled = parse_yaml(text, "a.yaml").unwrap();
        let (collected, report) = parse_collect::<Labelled>(text, "a.yaml");
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        assert_eq!(collected.unwrap().labels, strict.labels);
        assert_eq!(strict.labels["rack"], "7");
    }

    #[test]
    fn keys_are_located() {
        assert_eq!(locate(TEXT, "tls.cert"), (Some(5), Some(3)));
        assert_eq!(locate(TEXT, "forwards[1].name"), (Some(10), Some(5)));
        assert_eq!(locate(TEXT, "forwards[0]"), (Some(8), Some(5)));
        assert_eq!(locate(TEXT, "tls.missing"), (None, None));
        assert_eq!(locate("a: {b: [1, 2]}\n", "a.b[1]"), (Some(1), Some(12)));
    }

    #[test]
    fn typos_get_suggestions() {
        let keys: Vec<String> = ["max_agents", "listen", "tls"].map(str::to_owned).to_vec();
        assert_eq!(did_you_mean("max_agnets", &keys), Some("max_agents"));
        assert_eq!(did_you_mean("lsiten", &keys), Some("listen"));
        assert_eq!(did_you_mean("zzz", &keys), None);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }
}
