//! Network namespaces for the fault-injection tests: a server namespace and an agent namespace
//! joined to each other and to the test's own (root) namespace by veth pairs, `nft` rules that
//! drop packets on the agent's links, and daemons started inside a namespace. Everything is
//! removed when the [`Topology`] is dropped, also when a test fails.

use std::io::{self, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use tokio::process::Child;

/// Runs a command to completion; an error names the command and its stderr.
fn run(program: &str, args: &[&str], stdin: Option<&str>) -> io::Result<()> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// One named network namespace; deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    fn create(name: String) -> io::Result<Self> {
        // A namespace of a previous run that died before its cleanup.
        let _ = run("ip", &["netns", "del", &name], None);
        run("ip", &["netns", "add", &name], None)?;
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name (for `ip netns exec`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip <args>` inside the namespace.
    pub fn ip(&self, args: &[&str]) -> io::Result<()> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run("ip", &all, None)
    }

    /// `nft -f -` inside the namespace with `script` on stdin.
    pub fn nft(&self, script: &str) -> io::Result<()> {
        run(
            "ip",
            &["netns", "exec", &self.name, "nft", "-f", "-"],
            Some(script),
        )
    }

    /// A command that runs `program` inside the namespace, killed when its handle is dropped.
    pub fn command(&self, program: &Path) -> tokio::process::Command {
        let mut command = tokio::process::Command::new("ip");
        command
            .args(["netns", "exec", &self.name])
            .arg(program)
            .kill_on_drop(true);
        command
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "del", &self.name], None);
    }
}

/// The addresses of one /24 link: `.1` on one end, `.2` on the other.
#[derive(Debug, Clone, Copy)]
pub struct Link {
    /// The first end's address.
    pub a: Ipv4Addr,
    /// The second end's address.
    pub b: Ipv4Addr,
}

/// Three namespaces in a triangle: the test (root), the server and the agent.
///
/// - `root_server`: root `.1` to server `.2` (consumers reach forwards and `/metrics`);
/// - `server_agent`: server `.1` to agent `.2` (the tunnel; faults go here);
/// - `root_agent`: root `.1` to agent `.2` (targets in the test, the agent's `/metrics`, and
///   the delay relay when the tunnel goes through it).
///
/// `agent_to_server` and `agent_to_root` are the agent-side interface names, for `nft` rules.
#[derive(Debug)]
pub struct Topology {
    /// The server's namespace.
    pub server: Netns,
    /// The agent's namespace.
    pub agent: Netns,
    /// Root (`a`) to server (`b`).
    pub root_server: Link,
    /// Server (`a`) to agent (`b`).
    pub server_agent: Link,
    /// Root (`a`) to agent (`b`).
    pub root_agent: Link,
    /// The agent's interface towards the server.
    pub agent_to_server: String,
    /// The agent's interface towards the root namespace.
    pub agent_to_root: String,
    root_ends: Vec<String>,
}

/// Why fault tests cannot run here (not root, or no `ip netns`), or `None`.
pub fn unavailable() -> Option<String> {
    // The effective uid through `id -u` (no libc dependency for one call).
    let uid = Command::new("id").arg("-u").output().ok()?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Some("network namespaces need root".into());
    }
    let probe = format!("tether-probe-{}", std::process::id());
    match run("ip", &["netns", "add", &probe], None) {
        Ok(()) => {
            let _ = run("ip", &["netns", "del", &probe], None);
            None
        }
        Err(err) => Some(format!("`ip netns` is not possible here: {err}")),
    }
}

impl Topology {
    /// Creates the namespaces, links and addresses; a unique set per call (process id and a
    /// counter), so that tests run in parallel.
    pub fn create() -> io::Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let tag = format!("{}{}", pid % 10_000, n);
        let server = Netns::create(format!("tether-f{tag}-s"))?;
        let agent = Netns::create(format!("tether-f{tag}-a"))?;
        // 10.X.Y.0/24 with X from the pid and Y from the counter: no clash between parallel
        // tests of one run, nor (most likely) with another run.
        let net = |link: u32| {
            let x = 100 + (pid % 100) as u8;
            let y = ((n * 3 + link) % 250) as u8;
            Link {
                a: Ipv4Addr::new(10, x, y, 1),
                b: Ipv4Addr::new(10, x, y, 2),
            }
        };
        let mut topology = Self {
            server,
            agent,
            root_server: net(0),
            server_agent: net(1),
            root_agent: net(2),
            agent_to_server: format!("f{tag}as"),
            agent_to_root: format!("f{tag}ar"),
            root_ends: Vec::new(),
        };
        topology.wire(&tag)?;
        Ok(topology)
    }

    fn wire(&mut self, tag: &str) -> io::Result<()> {
        // root <-> server
        let (root_s, server_r) = (format!("f{tag}rs"), format!("f{tag}sr"));
        veth(&root_s, &server_r, &self.server)?;
        self.root_ends.push(root_s.clone());
        up_root(&root_s, self.root_server.a)?;
        up_in(&self.server, &server_r, self.root_server.b)?;
        // server <-> agent
        let server_a = format!("f{tag}sa");
        let agent_s = self.agent_to_server.clone();
        run(
            "ip",
            &[
                "-n",
                self.server.name(),
                "link",
                "add",
                &server_a,
                "type",
                "veth",
                "peer",
                "name",
                &agent_s,
                "netns",
                self.agent.name(),
            ],
            None,
        )?;
        up_in(&self.server, &server_a, self.server_agent.a)?;
        up_in(&self.agent, &agent_s, self.server_agent.b)?;
        // root <-> agent
        let root_a = format!("f{tag}ra");
        let agent_r = self.agent_to_root.clone();
        veth(&root_a, &agent_r, &self.agent)?;
        self.root_ends.push(root_a.clone());
        up_root(&root_a, self.root_agent.a)?;
        up_in(&self.agent, &agent_r, self.root_agent.b)?;
        Ok(())
    }

    /// Drops every packet on the agent's link to the server, both ways, without a RST: the
    /// link is a black hole until [`Topology::heal`].
    pub fn blackhole(&self) -> io::Result<()> {
        let dev = &self.agent_to_server;
        self.agent.nft(&format!(
            "table inet fault {{\n\
               chain in {{ type filter hook input priority -10; iifname \"{dev}\" drop; }}\n\
               chain out {{ type filter hook output priority -10; oifname \"{dev}\" drop; }}\n\
             }}\n"
        ))
    }

    /// Drops about `percent` % of the TCP packets to and from `port` on the agent's link to the
    /// root namespace (`numgen random`), both ways.
    pub fn loss_on_root_link(&self, port: u16, percent: u32) -> io::Result<()> {
        let dev = &self.agent_to_root;
        self.agent.nft(&format!(
            "table inet fault {{\n\
               chain in {{ type filter hook input priority -10;\n\
                 iifname \"{dev}\" tcp sport {port} numgen random mod 100 < {percent} counter drop; }}\n\
               chain out {{ type filter hook output priority -10;\n\
                 oifname \"{dev}\" tcp dport {port} numgen random mod 100 < {percent} counter drop; }}\n\
             }}\n"
        ))
    }

    /// Silently drops the agent's outgoing TCP SYNs to `port` (a filtered port: no RST, no
    /// ICMP), on every link.
    pub fn filter_port(&self, port: u16) -> io::Result<()> {
        self.agent.nft(&format!(
            "table inet filtered {{\n\
               chain out {{ type filter hook output priority -10; tcp dport {port} drop; }}\n\
             }}\n"
        ))
    }

    /// Packets the `counter`s of the fault table dropped so far.
    pub fn dropped_packets(&self) -> io::Result<u64> {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                self.agent.name(),
                "nft",
                "list",
                "table",
                "inet",
                "fault",
            ])
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        Ok(text
            .split("packets ")
            .skip(1)
            .filter_map(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
            .sum())
    }

    /// Removes the rules of [`Topology::blackhole`] and [`Topology::loss_on_root_link`].
    pub fn heal(&self) -> io::Result<()> {
        self.agent.nft("delete table inet fault\n")
    }

    /// An address of the server namespace reachable from the test.
    pub fn server_from_root(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.root_server.b, port))
    }

    /// An address of the agent namespace reachable from the test.
    pub fn agent_from_root(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.root_agent.b, port))
    }

    /// The test's (root) address the agent reaches directly: bind targets and relays here.
    pub fn root_for_agent(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.root_agent.a, port))
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        // Deleting a namespace deletes its veth ends and so their peers; the root ends are
        // deleted explicitly in case a daemon keeps its namespace alive a moment longer.
        for dev in &self.root_ends {
            let _ = run("ip", &["link", "del", dev], None);
        }
    }
}

fn veth(root_end: &str, peer: &str, peer_ns: &Netns) -> io::Result<()> {
    run(
        "ip",
        &[
            "link",
            "add",
            root_end,
            "type",
            "veth",
            "peer",
            "name",
            peer,
            "netns",
            peer_ns.name(),
        ],
        None,
    )
}

fn up_root(dev: &str, addr: Ipv4Addr) -> io::Result<()> {
    run(
        "ip",
        &["addr", "add", &format!("{addr}/24"), "dev", dev],
        None,
    )?;
    run("ip", &["link", "set", dev, "up"], None)
}

fn up_in(ns: &Netns, dev: &str, addr: Ipv4Addr) -> io::Result<()> {
    ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", dev])?;
    ns.ip(&["link", "set", dev, "up"])
}

/// A daemon (`tether server` or `tether agent`) running inside a namespace; killed on drop.
/// Its stderr goes to a file beside its config, printed by [`Daemon::log`] when a test fails.
pub struct Daemon {
    child: Child,
    log: std::path::PathBuf,
}

impl Daemon {
    /// Starts `tether --log-format json --log info <role> --config <config>` in `ns`.
    pub fn start(ns: &Netns, role: &str, config: &Path) -> io::Result<Self> {
        let log = config.with_extension("log");
        let file = std::fs::File::create(&log)?;
        let child = ns
            .command(crate::process::tether_binary())
            .args(["--log-format", "json", "--log", "info", role, "--config"])
            .arg(config)
            .env_remove("TETHER_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()?;
        Ok(Self { child, log })
    }

    /// SIGKILL, and wait for the process to be gone.
    pub async fn kill(mut self) {
        let _ = self.child.kill().await;
    }

    /// The daemon's log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}
