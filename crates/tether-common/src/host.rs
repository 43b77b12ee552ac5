//! This machine's host name (the default replica id of a server): a pod's name under
//! Kubernetes, the container id under docker compose.

/// Longest replica id (`server_id`) accepted or derived from the host name.
pub const MAX_SERVER_ID_LEN: usize = 64;

/// The host name from `uname`, cut to an id `validate_server_id` accepts; `"tether"` when the
/// host has no usable name.
pub fn host_name() -> String {
    let uname = rustix::system::uname();
    let name: String = uname
        .nodename()
        .to_string_lossy()
        .chars()
        .filter(|c| is_id_char(*c))
        .take(MAX_SERVER_ID_LEN)
        .collect();
    if name.is_empty() {
        "tether".to_owned()
    } else {
        name
    }
}

fn is_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
}

/// Checks a replica id: 1 to 64 characters of `A-Z a-z 0-9 - _ .` (it travels in an HTTP
/// header, a metric label and log lines).
pub fn validate_server_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("must not be empty".to_owned());
    }
    if id.len() > MAX_SERVER_ID_LEN {
        return Err(format!(
            "{} characters; at most {MAX_SERVER_ID_LEN}",
            id.len()
        ));
    }
    if let Some(bad) = id.chars().find(|c| !is_id_char(*c)) {
        return Err(format!(
            "{id:?} contains {bad:?}; use letters, digits, '-', '_' and '.'"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_name_is_a_valid_id() {
        assert_eq!(validate_server_id(&host_name()), Ok(()));
    }

    #[test]
    fn ids_are_checked() {
        assert!(validate_server_id("replica-1.eu_west").is_ok());
        assert!(validate_server_id("").is_err());
        assert!(validate_server_id("a b").unwrap_err().contains("' '"));
        assert!(validate_server_id(&"x".repeat(65)).is_err());
    }
}
