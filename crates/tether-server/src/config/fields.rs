//! Checks shared by every configuration section: socket addresses, positive durations,
//! readable files.

use std::net::SocketAddr;
use std::path::Path;
use std::str::FromStr;

use tether_common::config_error::ConfigErrors;
use tether_common::duration::HumanDuration;

/// Parses `ip:port` (host names are not accepted for listen addresses).
pub(crate) fn parse_socket_addr(text: &str) -> Result<SocketAddr, String> {
    SocketAddr::from_str(text).map_err(|_| {
        format!("`{text}` is not an `ip:port` address (e.g. 127.0.0.1:8443 or [::1]:8443)")
    })
}

pub(crate) fn positive(errors: &mut ConfigErrors, path: &str, value: HumanDuration) {
    if value.0.is_zero() {
        errors.push(path, "must be above zero");
    }
}

pub(crate) fn check_readable(path: &Path) -> Result<(), String> {
    match std::fs::File::open(path) {
        Ok(file) => match file.metadata() {
            Ok(meta) if meta.is_dir() => Err(format!("{} is a directory", path.display())),
            _ => Ok(()),
        },
        Err(err) => Err(format!("cannot read {}: {err}", path.display())),
    }
}
