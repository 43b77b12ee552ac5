//! Policy-checked outbound TCP dialing: resolve once, check every address, connect only to checked ones.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::policy::{self, Denial, Host, Policy};

/// A boxed, sendable future borrowing from `'a`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Name resolution used by [`dial`]. Called at most once per dial, and only for host names.
pub trait Resolver: Send + Sync {
    /// Resolves `host` (a validated host name, never an IP literal) to addresses, in preference order.
    fn resolve(&self, host: &str, port: u16) -> BoxFuture<'_, io::Result<Vec<IpAddr>>>;
}

/// The operating system's resolver (`getaddrinfo` through [`tokio::net::lookup_host`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemResolver;

impl Resolver for SystemResolver {
    fn resolve(&self, host: &str, port: u16) -> BoxFuture<'_, io::Result<Vec<IpAddr>>> {
        let host = host.to_owned();
        Box::pin(async move {
            let addrs = tokio::net::lookup_host((host.as_str(), port)).await?;
            Ok(addrs.map(|a| a.ip()).collect())
        })
    }
}

/// A fixed resolver for tests and static setups: name -> addresses, or name -> a sequence of
/// answers returned on successive calls (the last answer repeats), e.g. to simulate DNS rebinding.
/// Names are matched case-insensitively with a trailing dot ignored; unknown names fail with
/// [`io::ErrorKind::NotFound`].
#[derive(Debug, Default)]
pub struct StaticResolver {
    entries: Mutex<HashMap<String, Entry>>,
}

#[derive(Debug)]
struct Entry {
    answers: Vec<Vec<IpAddr>>,
    calls: usize,
}

impl StaticResolver {
    /// An empty resolver (every lookup fails).
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a name that always resolves to `ips`.
    pub fn with(self, name: &str, ips: impl IntoIterator<Item = IpAddr>) -> Self {
        self.with_sequence(name, [ips.into_iter().collect::<Vec<_>>()])
    }

    /// Adds a name whose n-th lookup returns the n-th answer; the last answer repeats.
    pub fn with_sequence(self, name: &str, answers: impl IntoIterator<Item = Vec<IpAddr>>) -> Self {
        let entry = Entry {
            answers: answers.into_iter().collect(),
            calls: 0,
        };
        self.lock().insert(normalize(name), entry);
        self
    }

    /// How many times `name` has been looked up.
    pub fn calls(&self, name: &str) -> usize {
        self.lock().get(&normalize(name)).map_or(0, |e| e.calls)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn answer(&self, name: &str) -> io::Result<Vec<IpAddr>> {
        let mut entries = self.lock();
        let entry = entries
            .get_mut(&normalize(name))
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "name not found"))?;
        let index = entry.calls.min(entry.answers.len().saturating_sub(1));
        entry.calls += 1;
        Ok(entry.answers.get(index).cloned().unwrap_or_default())
    }
}

fn normalize(name: &str) -> String {
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

impl Resolver for StaticResolver {
    fn resolve(&self, host: &str, _port: u16) -> BoxFuture<'_, io::Result<Vec<IpAddr>>> {
        let result = self.answer(host);
        Box::pin(async move { result })
    }
}

/// Why a dial failed. [`DialError::code_name`] gives a stable code for OPEN_ERR and metrics.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// Every resolved address was refused by the policy (the first refusal is kept).
    #[error(transparent)]
    Denied(#[from] Denial),
    /// The name could not be resolved, resolved to nothing, or is not a valid host name.
    #[error("resolving the target failed: {0}")]
    ResolveFailed(#[source] io::Error),
    /// The target actively refused the connection.
    #[error("connection to {addr} refused")]
    Refused {
        /// The address that refused.
        addr: SocketAddr,
    },
    /// Resolution and connection attempts did not finish within the dial timeout.
    #[error("dial timed out after {timeout:?}")]
    TimedOut {
        /// The overall dial timeout.
        timeout: Duration,
    },
    /// No route to the target host or network.
    #[error("{addr} is unreachable: {source}")]
    Unreachable {
        /// The address that could not be reached.
        addr: SocketAddr,
        /// The OS error.
        source: io::Error,
    },
    /// Any other I/O error while connecting.
    #[error("connecting to {addr} failed: {source}")]
    Io {
        /// The address being connected to.
        addr: SocketAddr,
        /// The OS error.
        source: io::Error,
    },
}

impl DialError {
    /// One of `"denied"`, `"resolve_failed"`, `"refused"`, `"timed_out"`, `"unreachable"`, `"io"`.
    pub fn code_name(&self) -> &'static str {
        match self {
            DialError::Denied(_) => "denied",
            DialError::ResolveFailed(_) => "resolve_failed",
            DialError::Refused { .. } => "refused",
            DialError::TimedOut { .. } => "timed_out",
            DialError::Unreachable { .. } => "unreachable",
            DialError::Io { .. } => "io",
        }
    }
}

/// Classifies a failed connect to `addr`.
fn connect_error(addr: SocketAddr, err: io::Error, timeout: Duration) -> DialError {
    match err.kind() {
        io::ErrorKind::ConnectionRefused => DialError::Refused { addr },
        io::ErrorKind::TimedOut => DialError::TimedOut { timeout },
        io::ErrorKind::HostUnreachable
        | io::ErrorKind::NetworkUnreachable
        | io::ErrorKind::NetworkDown => DialError::Unreachable { addr, source: err },
        _ => DialError::Io { addr, source: err },
    }
}

/// Dials `host:port` under `policy`.
///
/// Host names are resolved exactly once (IP literals, including legacy spellings such as `127.1`,
/// skip DNS; strings that are neither an IP literal nor a valid host name fail without a lookup).
/// Every resolved address is checked with [`Policy::check`] and connections are attempted only to
/// the addresses that passed, in resolver order, so a second DNS answer can never be dialed
/// (DNS rebinding). Resolution and all attempts share the overall `timeout`; each attempt gets an
/// equal share of what is left, the last one all of it. The stream has `TCP_NODELAY` set.
pub async fn dial(
    policy: &Policy,
    resolver: &dyn Resolver,
    host: &Host,
    port: u16,
    timeout: Duration,
) -> Result<(TcpStream, SocketAddr), DialError> {
    let deadline = Instant::now() + timeout;
    let timed_out = || DialError::TimedOut { timeout };
    let host = host.canonical();
    let resolved = match &host {
        Host::Ip(ip) => vec![*ip],
        Host::Name(name) => {
            if !policy::is_valid_hostname(name) {
                return Err(DialError::ResolveFailed(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "not an IP address or a valid host name",
                )));
            }
            tokio::time::timeout_at(deadline, resolver.resolve(name, port))
                .await
                .map_err(|_| timed_out())?
                .map_err(DialError::ResolveFailed)?
        }
    };

    let mut allowed: Vec<IpAddr> = Vec::with_capacity(resolved.len());
    let mut first_denial = None;
    for ip in resolved {
        let ip = policy::canonical_ip(ip);
        match policy.check(&host, port, ip) {
            Ok(()) if !allowed.contains(&ip) => allowed.push(ip),
            Ok(()) => {}
            Err(denial) => {
                tracing::debug!(%denial, reason = denial.reason(), "resolved address denied");
                first_denial.get_or_insert(denial);
            }
        }
    }
    if allowed.is_empty() {
        return Err(match first_denial {
            Some(denial) => DialError::Denied(denial),
            None => DialError::ResolveFailed(io::Error::new(
                io::ErrorKind::NotFound,
                "the name resolved to no addresses",
            )),
        });
    }

    let mut last_error = None;
    let count = allowed.len();
    for (i, ip) in allowed.into_iter().enumerate() {
        let addr = SocketAddr::new(ip, port);
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        let remaining_attempts = u32::try_from(count - i).unwrap_or(u32::MAX);
        let attempt_deadline = now + (deadline - now) / remaining_attempts;
        match tokio::time::timeout_at(attempt_deadline, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => {
                stream
                    .set_nodelay(true)
                    .map_err(|source| DialError::Io { addr, source })?;
                return Ok((stream, addr));
            }
            Ok(Err(err)) => {
                tracing::debug!(%addr, error = %err, "connect attempt failed");
                last_error = Some(connect_error(addr, err, timeout));
            }
            Err(_) => {
                tracing::debug!(%addr, "connect attempt timed out");
                last_error = Some(timed_out());
            }
        }
    }
    Err(last_error.unwrap_or_else(timed_out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{PolicyConfig, RuleConfig};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    const T: Duration = Duration::from_secs(5);

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn cidr_policy(cidrs: &[&str], ports: &[u16]) -> Policy {
        PolicyConfig {
            allow: vec![RuleConfig {
                hosts: vec![],
                cidrs: cidrs.iter().map(|s| s.to_string()).collect(),
                ports: ports.iter().map(|p| p.to_string()).collect(),
            }],
        }
        .compile()
        .unwrap()
    }

    async fn listener() -> (TcpListener, u16) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        (l, port)
    }

    use tether_testkit::assert_no_prior_connection;

    #[tokio::test]
    async fn allowed_dial_connects_with_nodelay() {
        let (l, port) = listener().await;
        let policy = cidr_policy(&["127.0.0.1/32"], &[port]);
        let (mut stream, addr) = dial(&policy, &SystemResolver, &Host::parse("127.1"), port, T)
            .await
            .unwrap();
        assert_eq!(addr, SocketAddr::new(ip("127.0.0.1"), port));
        assert!(stream.nodelay().unwrap());
        let (mut server, _) = l.accept().await.unwrap();
        stream.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        server.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
    }

    #[tokio::test]
    async fn ssrf_forms_never_reach_the_listener() {
        let (l, port) = listener().await;
        let permissive = cidr_policy(&["0.0.0.0/0", "::/0"], &[]);
        let resolver = StaticResolver::new();
        for form in [
            "127.0.0.1",
            "127.1",
            "2130706433",
            "0177.0.0.1",
            "0x7f.1",
            "0x7f000001",
            "[::ffff:127.0.0.1]",
            "::ffff:127.0.0.1",
            "[::1]",
        ] {
            for host in [Host::parse(form), Host::Name(form.to_owned())] {
                let err = dial(&permissive, &resolver, &host, port, T)
                    .await
                    .unwrap_err();
                assert_eq!(err.code_name(), "denied", "{form}: {err}");
                let DialError::Denied(denial) = err else {
                    unreachable!()
                };
                assert_eq!(denial.reason(), "sensitive_address");
            }
        }
        // A host name rule and a name resolving to loopback: denied too.
        let by_name = PolicyConfig {
            allow: vec![RuleConfig {
                hosts: vec!["*.example".into()],
                ..Default::default()
            }],
        }
        .compile()
        .unwrap();
        let resolver = StaticResolver::new().with("evil.example", [ip("127.0.0.1")]);
        let err = dial(
            &by_name,
            &resolver,
            &Host::Name("evil.example".into()),
            port,
            T,
        )
        .await
        .unwrap_err();
        assert_eq!(err.code_name(), "denied");
        // No legacy spelling was ever sent to the resolver.
        assert_eq!(resolver.calls("127.1"), 0);
        assert_no_prior_connection(&l).await;
    }

    #[tokio::test]
    async fn disallowed_port_on_allowed_host_is_denied() {
        let (l, port) = listener().await;
        let other = port.wrapping_add(1).max(1);
        let policy = cidr_policy(&["127.0.0.1/32"], &[other]);
        let err = dial(&policy, &SystemResolver, &Host::parse("127.0.0.1"), port, T)
            .await
            .unwrap_err();
        let DialError::Denied(denial) = err else {
            panic!("{err}")
        };
        assert_eq!(denial.reason(), "port");
        assert_no_prior_connection(&l).await;
    }

    #[tokio::test]
    async fn dns_rebinding_dials_only_the_checked_address() {
        let (l, port) = listener().await;
        // Only 127.0.0.1 is allowed; the rebound answer 127.0.0.2 is not.
        let policy = cidr_policy(&["127.0.0.1/32"], &[port]);
        let resolver = StaticResolver::new().with_sequence(
            "rebind.test",
            [vec![ip("127.0.0.1")], vec![ip("127.0.0.2")]],
        );
        let host = Host::Name("rebind.test".into());

        let (stream, addr) = dial(&policy, &resolver, &host, port, T).await.unwrap();
        assert_eq!(resolver.calls("rebind.test"), 1, "resolved exactly once");
        assert_eq!(addr, SocketAddr::new(ip("127.0.0.1"), port));
        assert_eq!(stream.peer_addr().unwrap(), addr);
        let (_accepted, peer) = l.accept().await.unwrap();
        assert_eq!(peer, stream.local_addr().unwrap());

        let err = dial(&policy, &resolver, &host, port, T).await.unwrap_err();
        assert_eq!(resolver.calls("rebind.test"), 2);
        let DialError::Denied(denial) = err else {
            panic!("{err}")
        };
        assert_eq!(denial.addr(), ip("127.0.0.2"));
        assert_no_prior_connection(&l).await;
    }

    #[tokio::test]
    async fn mixed_answer_dials_only_allowed_addresses() {
        let (l, port) = listener().await;
        let policy = cidr_policy(&["127.0.0.1/32"], &[]);
        let resolver = StaticResolver::new().with(
            "mixed.test",
            [
                ip("169.254.169.254"),
                ip("::ffff:127.0.0.1"),
                ip("127.0.0.2"),
            ],
        );
        let (stream, addr) = dial(
            &policy,
            &resolver,
            &Host::Name("MIXED.test.".into()),
            port,
            T,
        )
        .await
        .unwrap();
        assert_eq!(addr, SocketAddr::new(ip("127.0.0.1"), port));
        let (_accepted, peer) = l.accept().await.unwrap();
        assert_eq!(peer, stream.local_addr().unwrap());
    }

    #[tokio::test]
    async fn refused_port_is_refused() {
        let (l, port) = listener().await;
        drop(l);
        let policy = cidr_policy(&["127.0.0.0/8"], &[]);
        let err = dial(&policy, &SystemResolver, &Host::parse("127.0.0.1"), port, T)
            .await
            .unwrap_err();
        assert_eq!(err.code_name(), "refused", "{err}");
        assert_eq!(
            err.to_string(),
            format!("connection to 127.0.0.1:{port} refused")
        );
    }

    #[tokio::test]
    async fn resolution_failures() {
        let policy = cidr_policy(&["0.0.0.0/0"], &[]);
        let resolver = StaticResolver::new().with("empty.test", []);
        for host in [
            "unknown.test",
            "empty.test",
            "1.2.3.256",
            "a b.test",
            "[::1",
            "",
        ] {
            let err = dial(&policy, &resolver, &Host::Name(host.into()), 80, T)
                .await
                .unwrap_err();
            assert_eq!(err.code_name(), "resolve_failed", "{host:?}: {err}");
        }
        assert_eq!(resolver.calls("1.2.3.256"), 0);
    }

    struct NeverResolver;

    impl Resolver for NeverResolver {
        fn resolve(&self, _host: &str, _port: u16) -> BoxFuture<'_, io::Result<Vec<IpAddr>>> {
            Box::pin(std::future::pending())
        }
    }

    #[tokio::test(start_paused = true)]
    async fn slow_resolution_times_out() {
        let policy = cidr_policy(&["0.0.0.0/0"], &[]);
        let start = Instant::now();
        let err = dial(
            &policy,
            &NeverResolver,
            &Host::Name("slow.test".into()),
            80,
            T,
        )
        .await
        .unwrap_err();
        assert_eq!(err.code_name(), "timed_out");
        assert_eq!(start.elapsed(), T);
    }

    #[test]
    fn connect_errors_are_classified() {
        let addr: SocketAddr = "192.0.2.1:80".parse().unwrap();
        let code = |kind: io::ErrorKind| connect_error(addr, kind.into(), T).code_name();
        assert_eq!(code(io::ErrorKind::ConnectionRefused), "refused");
        assert_eq!(code(io::ErrorKind::TimedOut), "timed_out");
        assert_eq!(code(io::ErrorKind::HostUnreachable), "unreachable");
        assert_eq!(code(io::ErrorKind::NetworkUnreachable), "unreachable");
        assert_eq!(code(io::ErrorKind::PermissionDenied), "io");
        #[cfg(target_os = "linux")]
        {
            let os = |errno: i32| {
                connect_error(addr, io::Error::from_raw_os_error(errno), T).code_name()
            };
            assert_eq!(os(111), "refused"); // ECONNREFUSED (Linux)
            assert_eq!(os(101), "unreachable"); // ENETUNREACH
            assert_eq!(os(113), "unreachable"); // EHOSTUNREACH
        }
    }

    #[tokio::test]
    async fn static_resolver_sequence_repeats_last_answer() {
        let r = StaticResolver::new()
            .with_sequence("a.test", [vec![ip("10.0.0.1")], vec![ip("10.0.0.2")]]);
        assert_eq!(r.resolve("a.test", 1).await.unwrap(), [ip("10.0.0.1")]);
        assert_eq!(r.resolve("A.TEST.", 1).await.unwrap(), [ip("10.0.0.2")]);
        assert_eq!(r.resolve("a.test", 1).await.unwrap(), [ip("10.0.0.2")]);
        assert_eq!(r.calls("a.test"), 3);
        assert_eq!(
            r.resolve("b.test", 1).await.unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
    }
}
