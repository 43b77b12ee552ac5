//! systemd's notify protocol: READY, RELOADING, STOPPING and WATCHDOG datagrams to `$NOTIFY_SOCKET`.
//!
//! The protocol is one Unix datagram of `KEY=value` lines per state change, sent to the socket
//! named by `NOTIFY_SOCKET` (a path, or `@name` for an abstract address). It is implemented here
//! rather than through a crate because it is this small. A send waits at most [`SEND_TIMEOUT`]
//! for room in the socket's queue (Linux queues only `net.unix.max_dgram_qlen`, default 10,
//! datagrams): long enough that a busy reader does not lose READY or STOPPING, short enough
//! that a stalled supervisor cannot stall the daemon.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::Arc;
use std::time::Duration;

/// The longest a notification waits for room in the socket's queue.
pub const SEND_TIMEOUT: Duration = Duration::from_millis(500);

/// The environment variable that names the notify socket.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";
/// The environment variable with the watchdog timeout in microseconds.
pub const WATCHDOG_USEC: &str = "WATCHDOG_USEC";
/// The environment variable with the pid the watchdog applies to (absent: the main process).
pub const WATCHDOG_PID: &str = "WATCHDOG_PID";

/// A notification that could not be prepared or sent.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// `NOTIFY_SOCKET` holds something that is neither an absolute path nor `@name`.
    #[error("{NOTIFY_SOCKET}={value:?}: {reason}")]
    BadSocket {
        /// The variable's value.
        value: String,
        /// Why it was refused.
        reason: &'static str,
    },
    /// The socket address could not be built from the variable.
    #[error("{NOTIFY_SOCKET}={value:?}: {source}")]
    Address {
        /// The variable's value.
        value: String,
        /// The error from the socket address constructor.
        #[source]
        source: io::Error,
    },
    /// `WATCHDOG_USEC` or `WATCHDOG_PID` is not a positive integer.
    #[error("{key}={value:?}: not a positive integer")]
    BadWatchdog {
        /// Which variable.
        key: &'static str,
        /// Its value.
        value: String,
    },
    /// Creating the sending socket or sending the datagram failed.
    #[error("sending {state} to the notify socket: {source}")]
    Send {
        /// The first line of the message (e.g. `READY=1`).
        state: String,
        /// The socket error.
        #[source]
        source: io::Error,
    },
}

/// A handle for sending state changes to systemd. Cheap to clone; a disabled notifier (no
/// `NOTIFY_SOCKET`, i.e. not run by systemd with `Type=notify`) accepts every call and sends
/// nothing.
#[derive(Clone, Debug)]
pub struct Notifier {
    target: Option<Arc<Target>>,
}

#[derive(Debug)]
struct Target {
    socket: UnixDatagram,
    addr: SocketAddr,
    /// For error messages: the address as given.
    name: String,
}

impl Notifier {
    /// A notifier that sends nothing.
    pub fn disabled() -> Notifier {
        Notifier { target: None }
    }

    /// The notifier described by `NOTIFY_SOCKET`: disabled when the variable is unset or empty.
    pub fn from_env() -> Result<Notifier, NotifyError> {
        match std::env::var(NOTIFY_SOCKET) {
            Ok(value) if !value.is_empty() => Notifier::connect(&value),
            _ => Ok(Notifier::disabled()),
        }
    }

    /// A notifier sending to `address`: an absolute path, or `@name` for the abstract socket
    /// `name` (Linux).
    pub fn connect(address: &str) -> Result<Notifier, NotifyError> {
        let addr = parse_address(address)?;
        let socket = UnixDatagram::unbound().map_err(|source| NotifyError::Send {
            state: "(socket creation)".to_owned(),
            source,
        })?;
        socket
            .set_write_timeout(Some(SEND_TIMEOUT))
            .map_err(|source| NotifyError::Send {
                state: "(socket creation)".to_owned(),
                source,
            })?;
        Ok(Notifier {
            target: Some(Arc::new(Target {
                socket,
                addr,
                name: address.to_owned(),
            })),
        })
    }

    /// Whether this notifier sends anything.
    pub fn is_enabled(&self) -> bool {
        self.target.is_some()
    }

    /// The socket address as configured, if enabled.
    pub fn address(&self) -> Option<&str> {
        self.target.as_ref().map(|t| t.name.as_str())
    }

    /// `READY=1`: start-up (or a reload) is complete.
    pub fn ready(&self) -> Result<(), NotifyError> {
        self.send("READY=1")
    }

    /// `RELOADING=1` with `MONOTONIC_USEC` (required by `Type=notify-reload`, harmless for
    /// `Type=notify`); follow it with [`Notifier::ready`] once the reload is done.
    pub fn reloading(&self) -> Result<(), NotifyError> {
        if self.target.is_none() {
            return Ok(());
        }
        self.send(&format!("RELOADING=1\nMONOTONIC_USEC={}", monotonic_usec()))
    }

    /// `STOPPING=1`: shutdown has begun.
    pub fn stopping(&self) -> Result<(), NotifyError> {
        self.send("STOPPING=1")
    }

    /// `WATCHDOG=1`: the daemon is alive.
    pub fn watchdog(&self) -> Result<(), NotifyError> {
        self.send("WATCHDOG=1")
    }

    /// `STATUS=…`: a one-line status shown by `systemctl status`.
    pub fn status(&self, status: &str) -> Result<(), NotifyError> {
        if self.target.is_none() {
            return Ok(());
        }
        // A newline would start a new assignment; keep the status on one line.
        let line: String = status
            .chars()
            .map(|c| if c == '\n' { ' ' } else { c })
            .collect();
        self.send(&format!("STATUS={line}"))
    }

    /// Sends one datagram of `KEY=value` lines.
    pub fn send(&self, message: &str) -> Result<(), NotifyError> {
        let Some(target) = &self.target else {
            return Ok(());
        };
        match target.socket.send_to_addr(message.as_bytes(), &target.addr) {
            Ok(_) => Ok(()),
            Err(source) => Err(NotifyError::Send {
                state: message.lines().next().unwrap_or_default().to_owned(),
                source,
            }),
        }
    }
}

fn parse_address(value: &str) -> Result<SocketAddr, NotifyError> {
    if let Some(name) = value.strip_prefix('@') {
        if name.is_empty() {
            return Err(NotifyError::BadSocket {
                value: value.to_owned(),
                reason: "empty abstract socket name",
            });
        }
        return abstract_address(value, name);
    }
    if !value.starts_with('/') {
        return Err(NotifyError::BadSocket {
            value: value.to_owned(),
            reason: "expected an absolute path or @name",
        });
    }
    SocketAddr::from_pathname(value).map_err(|source| NotifyError::Address {
        value: value.to_owned(),
        source,
    })
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn abstract_address(value: &str, name: &str) -> Result<SocketAddr, NotifyError> {
    use std::os::linux::net::SocketAddrExt;
    SocketAddr::from_abstract_name(name.as_bytes()).map_err(|source| NotifyError::Address {
        value: value.to_owned(),
        source,
    })
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn abstract_address(value: &str, _name: &str) -> Result<SocketAddr, NotifyError> {
    Err(NotifyError::BadSocket {
        value: value.to_owned(),
        reason: "abstract sockets exist only on Linux",
    })
}

/// `CLOCK_MONOTONIC` in microseconds, the clock systemd compares `MONOTONIC_USEC` against.
fn monotonic_usec() -> u128 {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    let secs = u128::try_from(now.tv_sec).unwrap_or(0);
    let nanos = u128::try_from(now.tv_nsec).unwrap_or(0);
    secs * 1_000_000 + nanos / 1_000
}

/// How often to send `WATCHDOG=1` according to the environment: half of `WATCHDOG_USEC`, or
/// `None` when the watchdog is off or meant for another process (`WATCHDOG_PID`).
pub fn watchdog_interval_from_env() -> Result<Option<Duration>, NotifyError> {
    watchdog_interval(
        std::env::var(WATCHDOG_USEC).ok().as_deref(),
        std::env::var(WATCHDOG_PID).ok().as_deref(),
        std::process::id(),
    )
}

/// [`watchdog_interval_from_env`] over explicit values: `usec` and `pid` as the variables hold
/// them, `own_pid` the current process.
pub fn watchdog_interval(
    usec: Option<&str>,
    pid: Option<&str>,
    own_pid: u32,
) -> Result<Option<Duration>, NotifyError> {
    let Some(usec) = usec.filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    let timeout = positive(WATCHDOG_USEC, usec)?;
    if let Some(pid) = pid.filter(|v| !v.is_empty()) {
        if positive(WATCHDOG_PID, pid)? != u64::from(own_pid) {
            return Ok(None);
        }
    }
    Ok(Some(Duration::from_micros(timeout) / 2))
}

fn positive(key: &'static str, value: &str) -> Result<u64, NotifyError> {
    match value.trim().parse::<u64>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(NotifyError::BadWatchdog {
            key,
            value: value.to_owned(),
        }),
    }
}

/// Sends `WATCHDOG=1` every `interval` until dropped (the first one at once). It runs as an
/// ordinary task on the daemon's runtime, so when the runtime wedges (workers blocked, the
/// scheduler starved) the pings stop and systemd restarts the service. A failed send is logged
/// once per failure streak. A ping blocks its worker thread for at most [`SEND_TIMEOUT`], and
/// only while the supervisor is not reading its socket.
pub async fn run_watchdog(notifier: Notifier, interval: Duration) {
    let mut ticks = tokio::time::interval(interval);
    // After a stall, do not burst the missed pings: one ping means "alive now".
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        ticks.tick().await;
        match notifier.watchdog() {
            Ok(()) => {
                if failing {
                    tracing::info!("watchdog notifications are being delivered again");
                }
                failing = false;
            }
            Err(err) => {
                if !failing {
                    tracing::warn!(error = %err, "watchdog notification failed");
                }
                failing = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchdog_interval_is_half_the_timeout() {
        assert_eq!(
            watchdog_interval(Some("30000000"), None, 7).unwrap(),
            Some(Duration::from_secs(15))
        );
        assert_eq!(
            watchdog_interval(Some("30000000"), Some("7"), 7).unwrap(),
            Some(Duration::from_secs(15))
        );
    }

    #[test]
    fn watchdog_off_or_for_another_process() {
        assert_eq!(watchdog_interval(None, None, 7).unwrap(), None);
        assert_eq!(watchdog_interval(Some(""), None, 7).unwrap(), None);
        assert_eq!(watchdog_interval(Some("1000"), Some("8"), 7).unwrap(), None);
    }

    #[test]
    fn bad_watchdog_values_name_the_variable() {
        let err = watchdog_interval(Some("soon"), None, 7).unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"WATCHDOG_USEC="soon": not a positive integer"#
        );
        let err = watchdog_interval(Some("0"), None, 7).unwrap_err();
        assert!(err.to_string().starts_with("WATCHDOG_USEC="), "{err}");
        let err = watchdog_interval(Some("100"), Some("me"), 7).unwrap_err();
        assert!(err.to_string().starts_with("WATCHDOG_PID="), "{err}");
    }

    #[test]
    fn socket_addresses() {
        assert!(parse_address("/run/systemd/notify").is_ok());
        assert!(parse_address("@tether-test").is_ok());
        for bad in ["relative/path", "@", ""] {
            let err = parse_address(bad).unwrap_err();
            assert!(err.to_string().starts_with("NOTIFY_SOCKET="), "{err}");
        }
    }

    #[test]
    fn disabled_notifier_accepts_everything() {
        let n = Notifier::disabled();
        assert!(!n.is_enabled());
        n.ready().unwrap();
        n.reloading().unwrap();
        n.watchdog().unwrap();
        n.stopping().unwrap();
        n.status("x").unwrap();
    }

    #[test]
    fn monotonic_clock_advances() {
        let a = monotonic_usec();
        let b = monotonic_usec();
        assert!(a > 0 && b >= a);
    }
}
