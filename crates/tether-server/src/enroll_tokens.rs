//! The join-token store of enrollment: `tether certs token` appends a token's SHA-256, agent id
//! and expiry to `enrollment.tokens_file` (the token itself is printed once and never stored);
//! the server reads the file at each enrollment and records every redeemed token's hash in the
//! file beside it (`<tokens_file>.used`), so a token stays single-use across reloads and
//! restarts.
//!
//! `tokens_file`, one token per line (`#` starts a comment):
//! `<sha256 hex of the token> <agent id> <expiry, Unix seconds>`.
//! `<tokens_file>.used`, one redeemed token per line: `<sha256 hex> <Unix seconds> <agent id>`.
//! `<tokens_file>.issued`, one issued or renewed certificate per line:
//! `<serial hex> <agent id> <notAfter, Unix seconds>` (what `tether certs revoke --agent` reads).

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use tether_common::identity::validate_agent_id;
use tether_common::tls_check::rfc3339;

/// Every join token starts with this, so that a leaked one is recognisable.
pub const TOKEN_PREFIX: &str = "tether-join-";
/// Largest token store file read (either of the two files).
pub const MAX_STORE_BYTES: u64 = 4 * 1024 * 1024;
/// Longest token text accepted from an agent.
pub const MAX_TOKEN_LEN: usize = 256;

/// Errors of reading or writing the token store files.
#[derive(Debug, thiserror::Error)]
pub enum TokenStoreError {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// A file is larger than [`MAX_STORE_BYTES`].
    #[error("{}: larger than {MAX_STORE_BYTES} bytes; remove expired tokens", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// The agent id is not valid.
    #[error("{0}")]
    AgentId(String),
    /// No secure random bytes.
    #[error("the system random generator failed")]
    Random,
}

/// Why a token is refused; the text goes back to the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenRefusal {
    /// No such token in the store (never issued, mistyped, or removed).
    Unknown,
    /// The token was redeemed already.
    Used {
        /// When, Unix seconds.
        at: i64,
        /// By which agent id.
        agent_id: String,
    },
    /// The token's validity has passed.
    Expired {
        /// The agent id it was for.
        agent_id: String,
        /// Its expiry, Unix seconds.
        at: i64,
    },
}

impl TokenRefusal {
    /// The agent id the token was for, when it was found.
    pub fn agent_id(&self) -> Option<&str> {
        match self {
            Self::Unknown => None,
            Self::Used { agent_id, .. } | Self::Expired { agent_id, .. } => Some(agent_id),
        }
    }

    /// A closed-set label for `tether_enrollments_total{result}`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Unknown => "unknown_token",
            Self::Used { .. } => "used_token",
            Self::Expired { .. } => "expired_token",
        }
    }
}

impl std::fmt::Display for TokenRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unknown => f.write_str("unknown join token (never issued, mistyped or removed)"),
            Self::Used { at, agent_id } => write!(
                f,
                "this join token was already used at {} (agent \"{agent_id}\"); a join token \
                 works once: issue a new one with `tether certs token`",
                rfc3339(*at)
            ),
            Self::Expired { agent_id, at } => write!(
                f,
                "this join token for agent \"{agent_id}\" expired at {}; issue a new one with \
                 `tether certs token`",
                rfc3339(*at)
            ),
        }
    }
}

/// A token's entry in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenEntry {
    /// SHA-256 of the token, hex.
    pub hash: String,
    /// The agent id a certificate for this token names.
    pub agent_id: String,
    /// Expiry, Unix seconds.
    pub expires: i64,
}

/// The file of redeemed tokens beside `tokens_file`.
pub fn used_file_for(tokens_file: &Path) -> PathBuf {
    let mut name = tokens_file.as_os_str().to_owned();
    name.push(".used");
    PathBuf::from(name)
}

/// The log of certificates issued to enrolled agents beside `tokens_file`.
pub fn issued_file_for(tokens_file: &Path) -> PathBuf {
    let mut name = tokens_file.as_os_str().to_owned();
    name.push(".issued");
    PathBuf::from(name)
}

/// The serial numbers (hex) of every certificate the log beside `tokens_file` lists for
/// `agent_id`.
pub fn issued_serials(tokens_file: &Path, agent_id: &str) -> Result<Vec<String>, TokenStoreError> {
    let text = read_store(&issued_file_for(tokens_file))?;
    Ok(records(&text)
        .filter_map(|fields| match fields.as_slice() {
            [serial, id, ..] if *id == agent_id => Some((*serial).to_owned()),
            _ => None,
        })
        .collect())
}

fn append_line(path: &Path, line: &str) -> Result<(), TokenStoreError> {
    let io_err = |source| TokenStoreError::Io {
        path: path.to_owned(),
        source,
    };
    let mut options = OpenOptions::new();
    options.create(true).append(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path).map_err(io_err)?;
    writeln!(file, "{line}").map_err(io_err)?;
    file.sync_all().map_err(io_err)
}

/// SHA-256 of a token, hex (what the store keeps).
pub fn token_hash(token: &str) -> String {
    tether_common::csr::cert_sha256(token.trim().as_bytes())
}

/// A new token: the prefix and 32 random bytes in hex.
pub fn new_token() -> Result<String, TokenStoreError> {
    use aws_lc_rs::rand::SecureRandom;
    let mut bytes = [0u8; 32];
    aws_lc_rs::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| TokenStoreError::Random)?;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!("{TOKEN_PREFIX}{hex}"))
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Reads a store file; a missing file is empty.
fn read_store(path: &Path) -> Result<String, TokenStoreError> {
    let io_err = |source| TokenStoreError::Io {
        path: path.to_owned(),
        source,
    };
    match fs::metadata(path) {
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(String::new()),
        Err(err) => return Err(io_err(err)),
        Ok(meta) if meta.len() > MAX_STORE_BYTES => {
            return Err(TokenStoreError::TooLarge {
                path: path.to_owned(),
            });
        }
        Ok(_) => {}
    }
    fs::read_to_string(path).map_err(io_err)
}

/// The meaningful fields of each line (comments and blank lines left out).
fn records(text: &str) -> impl Iterator<Item = Vec<&str>> {
    text.lines().filter_map(|line| {
        let line = line.split('#').next().unwrap_or("").trim();
        (!line.is_empty()).then(|| line.split_whitespace().collect())
    })
}

/// The entries of a tokens file; malformed lines are skipped (and counted in the second
/// value).
pub fn parse_tokens(text: &str) -> (Vec<TokenEntry>, usize) {
    let mut entries = Vec::new();
    let mut bad = 0;
    for fields in records(text) {
        match fields.as_slice() {
            [hash, id, expires] if hash.len() == 64 && validate_agent_id(id).is_ok() => {
                match expires.parse::<i64>() {
                    Ok(expires) => entries.push(TokenEntry {
                        hash: hash.to_ascii_lowercase(),
                        agent_id: (*id).to_owned(),
                        expires,
                    }),
                    Err(_) => bad += 1,
                }
            }
            _ => bad += 1,
        }
    }
    (entries, bad)
}

/// Adds a token for `agent_id` expiring at `expires` (Unix seconds) to `tokens_file` (created
/// if missing); entries that expired more than a day ago are dropped. The file is rewritten
/// aside and renamed, so the server never reads half of it. Returns the token (shown once).
pub fn add_token(
    tokens_file: &Path,
    agent_id: &str,
    expires: i64,
) -> Result<String, TokenStoreError> {
    validate_agent_id(agent_id).map_err(|e| TokenStoreError::AgentId(e.to_string()))?;
    let token = new_token()?;
    let existing = read_store(tokens_file)?;
    let cutoff = now_unix() - 86_400;
    let mut out = String::from(
        "# tether enrollment tokens: <sha256 of the token> <agent id> <expiry, Unix seconds>\n\
         # Written by `tether certs token`; redeemed tokens are listed in the .used file.\n",
    );
    let (entries, _) = parse_tokens(&existing);
    for entry in entries.iter().filter(|e| e.expires > cutoff) {
        out.push_str(&format!(
            "{} {} {} # expires {}\n",
            entry.hash,
            entry.agent_id,
            entry.expires,
            rfc3339(entry.expires)
        ));
    }
    out.push_str(&format!(
        "{} {agent_id} {expires} # expires {}\n",
        token_hash(&token),
        rfc3339(expires)
    ));
    let mut aside = tokens_file.as_os_str().to_owned();
    aside.push(".tmp");
    let aside = PathBuf::from(aside);
    tether_common::pki::write_file_private(&aside, &out).map_err(|e| TokenStoreError::Io {
        path: aside.clone(),
        source: io::Error::other(e.to_string()),
    })?;
    keep_owner_and_mode(tokens_file, &aside);
    fs::rename(&aside, tokens_file).map_err(|source| TokenStoreError::Io {
        path: tokens_file.to_owned(),
        source,
    })?;
    Ok(token)
}

/// Gives the new store file the owner, group and mode of the one it replaces, so that a token
/// added by root stays readable by the server's own user. Best effort: without the right to
/// change the owner the new file keeps its own (0600, the invoking user).
#[cfg(unix)]
fn keep_owner_and_mode(old: &Path, new: &Path) {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = fs::metadata(old) else {
        return;
    };
    let _ = std::os::unix::fs::chown(new, Some(meta.uid()), Some(meta.gid()));
    let _ = fs::set_permissions(new, meta.permissions());
}

#[cfg(not(unix))]
fn keep_owner_and_mode(_old: &Path, _new: &Path) {}

/// What [`TokenStore::redeem`] refuses with: the token, or the caller's own check.
#[derive(Debug)]
pub enum RedeemError<E> {
    /// The token is unknown, used or expired.
    Token(TokenRefusal),
    /// The caller's check refused (the CSR).
    Check(E),
    /// The store could not be read or the redemption not recorded.
    Store(TokenStoreError),
}

/// The server's view of the store: single-use redemption under one lock.
#[derive(Debug)]
pub struct TokenStore {
    tokens: PathBuf,
    used: PathBuf,
    issued: PathBuf,
    lock: Mutex<()>,
}

impl TokenStore {
    /// The store of `tokens_file` (and its `.used` file).
    pub fn new(tokens_file: &Path) -> TokenStore {
        TokenStore {
            tokens: tokens_file.to_owned(),
            used: used_file_for(tokens_file),
            issued: issued_file_for(tokens_file),
            lock: Mutex::new(()),
        }
    }

    /// Redeems `token`: finds it, refuses it when used or expired, runs `issue` with its agent
    /// id, and records it as used (synced to disk) before returning what `issue` made. A token
    /// is consumed only when `issue` succeeds. Blocking (file I/O): call it off the runtime.
    pub fn redeem<T, E>(
        &self,
        token: &str,
        issue: impl FnOnce(&str) -> Result<T, E>,
    ) -> Result<T, RedeemError<E>> {
        // One redemption at a time: two requests with one token cannot both pass.
        let _guard = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        let hash = token_hash(token);
        let text = read_store(&self.tokens).map_err(RedeemError::Store)?;
        let (entries, _) = parse_tokens(&text);
        let Some(entry) = entries.into_iter().find(|e| e.hash == hash) else {
            return Err(RedeemError::Token(TokenRefusal::Unknown));
        };
        let used = read_store(&self.used).map_err(RedeemError::Store)?;
        for fields in records(&used) {
            if let [used_hash, at, agent_id, ..] = fields.as_slice()
                && *used_hash == hash
            {
                return Err(RedeemError::Token(TokenRefusal::Used {
                    at: at.parse().unwrap_or(0),
                    agent_id: (*agent_id).to_owned(),
                }));
            }
        }
        if entry.expires <= now_unix() {
            return Err(RedeemError::Token(TokenRefusal::Expired {
                agent_id: entry.agent_id,
                at: entry.expires,
            }));
        }
        let issued = issue(&entry.agent_id).map_err(RedeemError::Check)?;
        self.record_used(&hash, &entry.agent_id)
            .map_err(RedeemError::Store)?;
        Ok(issued)
    }

    fn record_used(&self, hash: &str, agent_id: &str) -> Result<(), TokenStoreError> {
        append_line(&self.used, &format!("{hash} {} {agent_id}", now_unix()))
    }

    /// Appends an issued certificate to the issuance log (synced), so that
    /// `tether certs revoke --agent` can find every certificate of an agent.
    pub fn record_issued(
        &self,
        serial_hex: &str,
        agent_id: &str,
        not_after: i64,
    ) -> Result<(), TokenStoreError> {
        append_line(
            &self.issued,
            &format!("{serial_hex} {agent_id} {not_after}"),
        )
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn ok(id: &str) -> Result<String, ()> {
        Ok(id.to_owned())
    }

    #[test]
    fn a_token_works_once_even_for_a_new_store_on_the_same_files() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tokens");
        fs::write(&file, "").unwrap();
        fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o640)).unwrap();
        let token = add_token(&file, "edge-7", now_unix() + 3600).unwrap();
        assert!(token.starts_with(TOKEN_PREFIX));
        let mode =
            std::os::unix::fs::PermissionsExt::mode(&fs::metadata(&file).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o640, "the replaced file keeps its mode");
        let text = fs::read_to_string(&file).unwrap();
        assert!(!text.contains(&token), "the store keeps only the hash");
        assert!(text.contains(&token_hash(&token)));

        let store = TokenStore::new(&file);
        assert_eq!(store.redeem(&token, ok).unwrap(), "edge-7");
        let again = store.redeem(&token, ok).unwrap_err();
        assert!(
            matches!(&again, RedeemError::Token(TokenRefusal::Used { agent_id, .. }) if agent_id == "edge-7"),
            "{again:?}"
        );
        // A restarted server (a new store on the same files) still refuses it.
        let restarted = TokenStore::new(&file);
        let err = restarted.redeem(&token, ok).unwrap_err();
        let RedeemError::Token(refusal) = err else {
            panic!("{err:?}")
        };
        assert_eq!(refusal.reason(), "used_token");
        assert!(refusal.to_string().contains("already used"), "{refusal}");

        store.record_issued("0aff", "edge-7", 1).unwrap();
        store.record_issued("0b00", "edge-8", 1).unwrap();
        store.record_issued("0c01", "edge-7", 2).unwrap();
        assert_eq!(issued_serials(&file, "edge-7").unwrap(), ["0aff", "0c01"]);
    }

    #[test]
    fn expired_unknown_and_refused_checks_leave_the_token_alone() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tokens");
        let old = add_token(&file, "edge-1", now_unix() - 10).unwrap();
        let fresh = add_token(&file, "edge-2", now_unix() + 3600).unwrap();
        let store = TokenStore::new(&file);
        let err = store.redeem(&old, ok).unwrap_err();
        assert!(
            matches!(err, RedeemError::Token(TokenRefusal::Expired { .. })),
            "{err:?}"
        );
        let err = store.redeem("tether-join-nope", ok).unwrap_err();
        assert!(matches!(err, RedeemError::Token(TokenRefusal::Unknown)));
        // A refused check does not consume the token.
        let err = store
            .redeem(&fresh, |_| Err::<String, _>("bad csr"))
            .unwrap_err();
        assert!(matches!(err, RedeemError::Check("bad csr")));
        assert_eq!(store.redeem(&fresh, ok).unwrap(), "edge-2");
    }

    #[test]
    fn concurrent_redemptions_of_one_token_let_exactly_one_through() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tokens");
        let token = add_token(&file, "edge-5", now_unix() + 3600).unwrap();
        let store = std::sync::Arc::new(TokenStore::new(&file));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (store, token) = (store.clone(), token.clone());
                std::thread::spawn(move || store.redeem(&token, ok).is_ok())
            })
            .collect();
        let wins = threads
            .into_iter()
            .map(|t| t.join().unwrap())
            .filter(|won| *won)
            .count();
        assert_eq!(wins, 1);
    }

    #[test]
    fn malformed_lines_are_skipped_and_bad_ids_refused() {
        let (entries, bad) = parse_tokens(
            "# c\n\nzz edge 1\nabc\n{} edge-1 notanumber\n"
                .replace("{}", &"a".repeat(64))
                .as_str(),
        );
        assert!(entries.is_empty());
        assert_eq!(bad, 3);
        let dir = tempfile::tempdir().unwrap();
        let err = add_token(&dir.path().join("t"), "bad id", 0).unwrap_err();
        assert!(err.to_string().contains("bad id"), "{err}");
    }
}
