//! The `tether` binary: parses flags, loads config, binds listeners and calls the daemon libraries.

mod certs_cmd;
mod certs_lifecycle;
mod certs_token;
mod cli;
mod config_load;
mod config_reload;
mod daemon_registry;
mod demo;
mod doctor;
mod doctor_agent;
mod doctor_net;
mod doctor_report;
mod doctor_server;
mod doctor_steps;
mod doctor_target;
mod doctor_verdict;
mod init_cmd;
mod logging;
mod signals;
mod status_cmd;
mod status_placement;
mod status_replicas;
mod systemd;

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::cli::{CertsCommand, Cli, Command};
use crate::config_load::InvalidConfig;

/// jemalloc: long-running daemons with many short-lived 64 KiB frame buffers fragment glibc's
/// heap and page-fault on its mmap threshold; jemalloc reuses them and returns memory.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Exit code for invalid configuration (EX_CONFIG would be 78; 2 is what `check-config` promises).
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo prints its own report; keep daemon logs to warnings unless asked otherwise. The
    // commands without log flags print their results and log only warnings.
    let initialized = match &cli.command {
        Command::Server { log, .. } | Command::Agent { log, .. } => {
            let (filter, format) = log.or_top(&cli);
            logging::init(filter, "info", format)
        }
        Command::Demo { log, .. } => {
            let (filter, format) = log.or_top(&cli);
            logging::init(filter, "warn", format)
        }
        _ => logging::init(
            cli.log.clone(),
            "warn",
            cli.log_format.unwrap_or(cli::LogFormat::Text),
        ),
    };
    let logs = match initialized {
        Ok(logs) => logs,
        Err(err) => {
            report(format_args!("error: cannot set up logging: {err}"));
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // An idle worker hands its cached freed memory back (throttled; docs/BENCHMARKS.md).
        .on_thread_park(|| {
            tether_common::heap_trim::on_worker_park();
        })
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            report(format_args!("error: cannot start the async runtime: {err}"));
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli.command, logs)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            if let Some(InvalidConfig(message)) = err.downcast_ref::<InvalidConfig>() {
                report(format_args!("error: {message}"));
                return ExitCode::from(EXIT_CONFIG);
            }
            report(format_args!("error: {err:#}"));
            ExitCode::FAILURE
        }
    }
}

/// Writes a final error line to stderr; unlike `eprintln!` it does not panic when stderr is
/// gone or full, so the exit code stays the one chosen.
fn report(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

async fn dispatch(command: Command, logs: logging::LogControl) -> anyhow::Result<()> {
    match command {
        Command::Server {
            config: path, set, ..
        } => run_server(path, &set, logs).await,
        Command::Agent {
            config: path, set, ..
        } => run_agent(path, &set, logs).await,
        Command::Init {
            dir,
            server_name,
            agent,
            target,
            forward_listen,
        } => init_cmd::run(&init_cmd::InitArgs {
            dir: &dir,
            server_name: &server_name,
            agent: &agent,
            target: &target,
            forward_listen: &forward_listen,
        }),
        Command::Certs { command } => certs(command),
        Command::CheckConfig { kind, path } => {
            let kind = config_load::check(kind, &path)?;
            println!("{}: valid {kind:?} config", path.display());
            Ok(())
        }
        Command::Doctor {
            config,
            kind,
            set,
            target,
        } => {
            doctor::run(&doctor::DoctorArgs {
                config: &config,
                kind,
                set: &set,
                target: target.as_deref(),
            })
            .await
        }
        Command::Status {
            client,
            admin,
            json,
            timeout,
        } => status(&admin, client.as_deref(), json, timeout).await,
        Command::Demo {
            once, bytes, keep, ..
        } => {
            let shutdown = CancellationToken::new();
            let _signals = AbortOnDrop(tokio::spawn(signals::cancel_on_signal(shutdown.clone())));
            demo::run(once, bytes, keep.as_deref(), &logs, shutdown).await
        }
        Command::HashToken => hash_token(),
    }
}

/// `tether server`: loads the config, binds every listener, runs until a signal.
async fn run_server(
    path: std::path::PathBuf,
    set: &[String],
    logs: logging::LogControl,
) -> anyhow::Result<()> {
    let flags = parse_flags(set)?;
    let config = config_load::load_server(
        &path,
        &config_load::Overrides {
            env: &config_load::process_env,
            flags: &flags,
        },
    )?;
    logs.apply_config(&config.log);
    let registry = daemon_registry::daemon_registry(&logs)?;
    let listeners = tether_server::Listeners {
        tunnel: bind(&config.listen, "listen").await?,
        admin: bind(&config.admin_listen, "admin_listen").await?,
        forwards: {
            let mut forwards = Vec::new();
            for (i, forward) in config.forwards.iter().enumerate() {
                forwards.push(bind(&forward.listen, &format!("forwards[{i}].listen")).await?);
            }
            forwards
        },
        frontends: tether_server::FrontendListeners::bind(&config).await?,
    };
    let server = tether_server::Server::new(config, &registry)?;
    let systemd = systemd::start();
    let server = server.with_notifier(systemd.notifier.clone());
    let shutdown = CancellationToken::new();
    let _signals = AbortOnDrop(tokio::spawn(signals::cancel_on_signal(shutdown.clone())));
    let _reloads = AbortOnDrop(tokio::spawn(config_reload::server_reloads(
        path,
        flags,
        server.reloader(),
        logs,
        systemd.notifier.clone(),
    )));
    server.run(listeners, shutdown).await?;
    Ok(())
}

/// `tether agent`: loads the config, enrolls if it must, runs until a signal.
async fn run_agent(
    path: std::path::PathBuf,
    set: &[String],
    logs: logging::LogControl,
) -> anyhow::Result<()> {
    let flags = parse_flags(set)?;
    let config = config_load::load_agent(
        &path,
        &config_load::Overrides {
            env: &config_load::process_env,
            flags: &flags,
        },
    )?;
    logs.apply_config(&config.log);
    let registry = daemon_registry::daemon_registry(&logs)?;
    let admin = match config.admin_listen.as_str() {
        "" => None,
        addr => Some(bind(addr, "admin_listen").await?),
    };
    // An agent with `enroll:` and no certificate yet gets one first (the key is made
    // here); a refused token or a wrong CA pin ends the process with the reason.
    if let Some(enrolled) = tether_agent::enroll::enroll_if_needed(&config).await? {
        tracing::info!(agent.id = %enrolled.agent_id, "enrollment done; connecting");
    }
    let agent = tether_agent::Agent::new(config, &registry)?;
    let systemd = systemd::start();
    let agent = agent.with_notifier(systemd.notifier.clone());
    let shutdown = CancellationToken::new();
    let _signals = AbortOnDrop(tokio::spawn(signals::cancel_on_signal(shutdown.clone())));
    let _reloads = AbortOnDrop(tokio::spawn(config_reload::agent_reloads(
        path,
        flags,
        agent.reloader(),
        logs,
        systemd.notifier.clone(),
    )));
    agent
        .run(tether_agent::AgentListeners { admin }, shutdown)
        .await?;
    Ok(())
}

/// `tether certs ...`.
fn certs(command: CertsCommand) -> anyhow::Result<()> {
    match command {
        CertsCommand::Init {
            dir,
            dns,
            ip,
            no_localhost,
            valid_for,
        } => certs_cmd::init(
            &dir,
            &dns,
            &ip,
            !no_localhost,
            &certs_lifecycle::options(valid_for)?,
        ),
        CertsCommand::Issue {
            dir,
            agent,
            server_peer,
            valid_for,
        } => {
            let opts = certs_lifecycle::options(valid_for)?;
            match (agent, server_peer) {
                (_, Some(id)) => certs_token::issue_server_peer(&dir, &id, &opts),
                (Some(agent), None) => certs_cmd::issue(&dir, &agent, &opts),
                (None, None) => anyhow::bail!("give --agent ID or --server-peer ID"),
            }
        }
        CertsCommand::Renew {
            dir,
            cert,
            key,
            valid_for,
            keep_key,
        } => certs_lifecycle::renew(&dir, &cert, &key, &valid_for, keep_key),
        CertsCommand::Token {
            agent,
            valid_for,
            config,
            tokens_file,
        } => certs_token::token(
            &agent,
            &valid_for,
            config.as_deref(),
            tokens_file.as_deref(),
        ),
        CertsCommand::Inspect { file, config } => {
            certs_lifecycle::inspect(&file, config.as_deref())
        }
        CertsCommand::Revoke {
            dir,
            agent,
            config,
            cert,
            crl,
        } => match (dir, agent, config) {
            (_, Some(agent), Some(config)) => {
                certs_token::revoke_agent(&agent, &config, crl.as_deref())
            }
            (Some(dir), _, _) => certs_lifecycle::revoke(&dir, cert.as_deref(), crl.as_deref()),
            _ => anyhow::bail!("give --dir DIR, or --agent ID with --config SERVER.YAML"),
        },
    }
}

/// `tether status`: one server's clients (or one client), or the replicas' merged view.
async fn status(
    admin: &[String],
    client: Option<&str>,
    json: bool,
    timeout: std::time::Duration,
) -> anyhow::Result<()> {
    let urls = status_replicas::expand(admin).await?;
    match (urls.len(), client) {
        (1, client) => status_cmd::run(&admin[0], client, json, timeout).await,
        (_, Some(_)) => anyhow::bail!(
            "tether status CLIENT asks one server: give one --admin (it found {})",
            urls.len()
        ),
        (_, None) => status_replicas::run(&urls, json, timeout).await,
    }
}

/// `tether hash-token`: the SHA-256 of a consumer token read from stdin.
fn hash_token() -> anyhow::Result<()> {
    // From stdin, not an argument: arguments show in `ps` and shell history.
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .context("reading the token from stdin")?;
    let token = line.trim_end_matches(['\r', '\n']);
    anyhow::ensure!(!token.is_empty(), "no token on stdin");
    println!("{}", tether_server::TokenHash::of(token).0);
    Ok(())
}

/// Binds with the large accept backlog of `tether_common::listen` (validated configs hold
/// `ip:port` listener addresses).
async fn bind(addr: &str, key: &str) -> anyhow::Result<TcpListener> {
    let parsed: std::net::SocketAddr = addr
        .parse()
        .with_context(|| format!("{key} = {addr}: not an ip:port address"))?;
    tether_common::listen::bind(parsed).with_context(|| format!("binding {key} = {addr}"))
}

/// Parses the `--set key.path=value` flags.
fn parse_flags(set: &[String]) -> anyhow::Result<Vec<tether_common::config_layers::FlagOverride>> {
    set.iter()
        .map(|text| {
            tether_common::config_layers::FlagOverride::parse(text)
                .map_err(|message| InvalidConfig(format!("--set {message}")).into())
        })
        .collect()
}

/// Aborts a background task when the owner goes away.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
