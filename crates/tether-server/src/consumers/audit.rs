//! The audit log: one JSON line per tunnelled consumer connection when it closes (who, through
//! which forward or frontend, to which client and target, bytes each way, how long, why it
//! ended), written by a thread of its own behind a bounded queue so that the data path never
//! waits for a disk.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError, sync_channel};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use serde::Serialize;
use tether_proto::TargetAddr;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::config::{AuditLogConfig, AuditOutput};
use crate::consumers::dial::{DialError, DialedStream};
use crate::consumers::splice::SpliceEnd;

/// Largest batch of lines written with one system call.
const BATCH_BYTES: usize = 64 * 1024;

/// Why an audit log could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot open the audit log {path}: {source}")]
pub struct AuditOpenError {
    path: PathBuf,
    #[source]
    source: io::Error,
}

/// The audit log's metrics (registered whether or not the log is on, so dashboards always find
/// them).
#[derive(Debug, Clone)]
struct AuditMetrics {
    /// `tether_audit_lines_total{result="written|dropped|write_failed"}`.
    written: IntCounter,
    dropped: IntCounter,
    write_failed: IntCounter,
    /// `tether_audit_queue_lines`: lines waiting for the writer.
    queued: IntGauge,
}

impl AuditMetrics {
    fn register(registry: &Registry) -> prometheus::Result<AuditMetrics> {
        let lines = IntCounterVec::new(
            Opts::new(
                "tether_audit_lines_total",
                "Audit log lines by result: written; dropped because the queue to the writer \
                 was full; write_failed (the file could not be written, e.g. a full disk).",
            ),
            &["result"],
        )?;
        registry.register(Box::new(lines.clone()))?;
        let queued = IntGauge::new(
            "tether_audit_queue_lines",
            "Audit log lines queued for the writer.",
        )?;
        registry.register(Box::new(queued.clone()))?;
        Ok(AuditMetrics {
            written: lines.with_label_values(&["written"]),
            dropped: lines.with_label_values(&["dropped"]),
            write_failed: lines.with_label_values(&["write_failed"]),
            queued,
        })
    }
}

/// What the writer thread is told.
enum Msg {
    Line(Vec<u8>),
    /// Write what is queued, then answer.
    Flush(tokio::sync::oneshot::Sender<()>),
    /// Look at the reopen flag.
    Wake,
}

/// Where lines go.
enum Output {
    Stderr,
    File { path: PathBuf, file: File },
}

impl Output {
    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Output::Stderr => io::stderr().lock().write_all(bytes),
            Output::File { file, .. } => file.write_all(bytes),
        }
    }
}

fn open_append(path: &Path) -> Result<File, AuditOpenError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|source| AuditOpenError {
            path: path.to_owned(),
            source,
        })
}

/// The writer's side of the log; owns the thread and ends it when the last [`AuditLog`] clone
/// is dropped (its queue then disconnects).
struct Shared {
    tx: SyncSender<Msg>,
    reopen: Arc<AtomicBool>,
    metrics: AuditMetrics,
    /// Not joined on drop (a slow disk must not stall whoever drops the last handle): the
    /// thread ends once this, the last sender, is gone. [`AuditLog::flush`] is the orderly end.
    _thread: JoinHandle<()>,
}

/// Handle of the audit log: cheap to clone; [`AuditLog::off`] makes every call a no-op.
#[derive(Clone, Default)]
pub struct AuditLog {
    shared: Option<Arc<Shared>>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("on", &self.shared.is_some())
            .finish()
    }
}

impl AuditLog {
    /// A log that records nothing.
    pub fn off() -> AuditLog {
        AuditLog::default()
    }

    /// Starts the log `config` describes (opening its file now, so a bad path fails at start)
    /// and registers its metrics in `registry`.
    pub fn start(config: &AuditLogConfig, registry: &Registry) -> Result<AuditLog, AuditError> {
        let metrics = AuditMetrics::register(registry)?;
        let output = match config.output {
            AuditOutput::Off => return Ok(AuditLog::off()),
            AuditOutput::Stderr => Output::Stderr,
            AuditOutput::File => Output::File {
                path: config.path.clone(),
                file: open_append(&config.path)?,
            },
        };
        let (tx, rx) = sync_channel(config.queue);
        let reopen = Arc::new(AtomicBool::new(false));
        let writer = Writer {
            output,
            reopen: reopen.clone(),
            metrics: metrics.clone(),
            failing: false,
        };
        let thread = std::thread::Builder::new()
            .name("tether-audit".into())
            .spawn(move || writer.run(rx))
            .map_err(|source| AuditOpenError {
                path: config.path.clone(),
                source,
            })?;
        Ok(AuditLog {
            shared: Some(Arc::new(Shared {
                tx,
                reopen,
                metrics,
                _thread: thread,
            })),
        })
    }

    /// Whether lines are recorded.
    pub fn is_on(&self) -> bool {
        self.shared.is_some()
    }

    /// Makes the writer reopen its file (by path) before its next line: after logrotate moved
    /// it, new lines go to a new file and none is lost. A no-op for stderr or when off.
    pub fn reopen(&self) {
        if let Some(shared) = &self.shared {
            shared.reopen.store(true, Ordering::Release);
            // A full queue means the writer is busy and sees the flag soon anyway.
            let _ = shared.tx.try_send(Msg::Wake);
        }
    }

    /// Waits up to `within` for the lines queued so far to be written.
    pub async fn flush(&self, within: Duration) {
        let Some(shared) = &self.shared else { return };
        let (ack, done) = tokio::sync::oneshot::channel();
        let tx = shared.tx.clone();
        let deadline = Instant::now() + within;
        let mut msg = Msg::Flush(ack);
        // The queue may be full: retry briefly rather than block a runtime thread.
        loop {
            match tx.try_send(msg) {
                Ok(()) => break,
                Err(TrySendError::Disconnected(_)) => return,
                Err(TrySendError::Full(back)) => {
                    if Instant::now() >= deadline {
                        return;
                    }
                    msg = back;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
        let _ = tokio::time::timeout_at(deadline, done).await;
    }

    /// Starts the record of one consumer connection; it is written when the returned entry is
    /// finished or dropped.
    pub(crate) fn connection(
        &self,
        via: Via<'_>,
        consumer_addr: SocketAddr,
        consumer: Option<&str>,
        client: &str,
        target: &TargetAddr,
    ) -> AuditEntry {
        let Some(shared) = &self.shared else {
            return AuditEntry { open: None };
        };
        let (via, forward) = match via {
            Via::Forward(name) => ("forward", Some(name.to_owned())),
            Via::Frontend(label) => (label, None),
        };
        AuditEntry {
            open: Some(Box::new(Open {
                shared: shared.clone(),
                started: Instant::now(),
                started_wall: SystemTime::now(),
                line: Line {
                    event: "tunnel_closed",
                    ts: String::new(),
                    start: String::new(),
                    via,
                    forward,
                    consumer_addr: consumer_addr.to_string(),
                    consumer: consumer.map(str::to_owned),
                    client: client.to_owned(),
                    session: None,
                    agent_instance: None,
                    stream: None,
                    target_requested: target.to_string(),
                    target_dialed: None,
                    bytes_from_consumer: 0,
                    bytes_to_consumer: 0,
                    duration_seconds: 0.0,
                    close: "",
                    dial_error: None,
                    error: None,
                },
            })),
        }
    }
}

/// Errors of [`AuditLog::start`].
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The file could not be opened.
    #[error(transparent)]
    Open(#[from] AuditOpenError),
    /// The metrics could not be registered.
    #[error("cannot register the audit metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// Through what a consumer came in.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Via<'a> {
    /// A static forward, by name.
    Forward(&'a str),
    /// A proxy frontend, by its label (`http_connect`, `socks5`).
    Frontend(&'static str),
}

/// One line of the log. Never a payload byte, never a token.
#[derive(Debug, Serialize)]
struct Line {
    event: &'static str,
    /// When the connection closed (RFC 3339 UTC, milliseconds).
    ts: String,
    /// When the consumer's request was authorized and the dial began.
    start: String,
    /// `forward`, `http_connect` or `socks5`.
    via: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    forward: Option<String>,
    consumer_addr: String,
    /// The consumer's name from `frontends.consumers`, `anonymous`, or null (forwards).
    consumer: Option<String>,
    /// The agent id.
    client: String,
    /// The server's id of the agent session that carried the stream.
    session: Option<u64>,
    agent_instance: Option<String>,
    stream: Option<u64>,
    /// The target as the consumer (or the forward's config) named it.
    target_requested: String,
    /// The target the agent was asked to dial (null when no session took the dial).
    target_dialed: Option<String>,
    bytes_from_consumer: u64,
    bytes_to_consumer: u64,
    duration_seconds: f64,
    /// Why it ended: `closed` (both directions finished), `consumer_error`, `tunnel_error`,
    /// `shutdown`, `dial_failed`, `consumer_left`, `aborted`.
    close: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    dial_error: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

struct Open {
    shared: Arc<Shared>,
    started: Instant,
    started_wall: SystemTime,
    line: Line,
}

/// The record of one connection in progress; written once, when finished or dropped (a
/// connection task cancelled at the server's hard stop writes `aborted`).
#[derive(Default)]
pub(crate) struct AuditEntry {
    open: Option<Box<Open>>,
}

impl AuditEntry {
    /// The stream is open: which session and stream carry it.
    pub(crate) fn dialed(&mut self, conn: &DialedStream, target: &TargetAddr) {
        if let Some(open) = &mut self.open {
            open.line.session = Some(conn.session_id);
            open.line.agent_instance = Some(conn.instance.clone()).filter(|i| !i.is_empty());
            open.line.stream = Some(conn.stream.id());
            open.line.target_dialed = Some(target.to_string());
        }
    }

    /// Bytes of the consumer sent into the stream outside the splice (the CONNECT proxy's
    /// bytes after the request head).
    pub(crate) fn sent(&mut self, bytes: u64) {
        if let Some(open) = &mut self.open {
            open.line.bytes_from_consumer += bytes;
        }
    }

    /// The dial failed; writes the line.
    pub(crate) fn dial_failed(mut self, err: &DialError) {
        if let Some(open) = &mut self.open {
            if let DialError::Open { target, .. } = err {
                open.line.target_dialed = Some(target.to_string());
            }
            open.line.dial_error = Some(err.label());
            open.line.error = Some(err.to_string());
        }
        self.finish("dial_failed");
    }

    /// The connection ended between the dial and the splice (`consumer_left`: the consumer
    /// went away before its answer; `tunnel_error`: the stream failed); writes the line.
    pub(crate) fn ended(mut self, reason: &'static str, err: &dyn std::fmt::Display) {
        if let Some(open) = &mut self.open {
            open.line.error = Some(err.to_string());
        }
        self.finish(reason);
    }

    /// The splice ended; writes the line.
    pub(crate) fn spliced(mut self, end: &SpliceEnd) {
        if let Some(open) = &mut self.open {
            open.line.bytes_from_consumer += end.totals.to_tunnel;
            open.line.bytes_to_consumer += end.totals.to_local;
            open.line.error = end.error.clone();
        }
        self.finish(end.reason);
    }

    fn finish(&mut self, reason: &'static str) {
        let Some(mut open) = self.open.take() else {
            return;
        };
        open.line.close = reason;
        open.line.duration_seconds = open.started.elapsed().as_secs_f64();
        open.line.start = rfc3339_millis(open.started_wall);
        open.line.ts = rfc3339_millis(SystemTime::now());
        let shared = &open.shared;
        let mut bytes = match serde_json::to_vec(&open.line) {
            Ok(bytes) => bytes,
            Err(_) => {
                // Plain strings and numbers always serialize; count it rather than panic.
                shared.metrics.dropped.inc();
                return;
            }
        };
        bytes.push(b'\n');
        // Never waits: a full queue drops the line and counts it.
        match shared.tx.try_send(Msg::Line(bytes)) {
            Ok(()) => shared.metrics.queued.inc(),
            Err(_) => shared.metrics.dropped.inc(),
        }
    }
}

impl Drop for AuditEntry {
    fn drop(&mut self) {
        self.finish("aborted");
    }
}

/// `time` as RFC 3339 UTC with milliseconds.
fn rfc3339_millis(time: SystemTime) -> String {
    let whole = crate::rfc3339::rfc3339(time);
    let millis = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_millis());
    match whole.strip_suffix('Z') {
        Some(seconds) => format!("{seconds}.{millis:03}Z"),
        None => whole,
    }
}

/// The writer thread: batches queued lines into one write, reopens on request, and counts
/// what it could not write (a full disk costs lines, never the tunnel).
struct Writer {
    output: Output,
    reopen: Arc<AtomicBool>,
    metrics: AuditMetrics,
    /// Whether the last write failed (logged once per episode).
    failing: bool,
}

impl Writer {
    fn run(mut self, rx: Receiver<Msg>) {
        let mut batch = Vec::with_capacity(BATCH_BYTES);
        let mut lines = 0u64;
        let mut acks = Vec::new();
        // Blocks for the first message of a batch, then takes what is already queued.
        while let Ok(first) = rx.recv() {
            let mut next = Some(first);
            while let Some(msg) = next.take() {
                match msg {
                    Msg::Line(line) => {
                        batch.extend_from_slice(&line);
                        lines += 1;
                    }
                    Msg::Flush(ack) => acks.push(ack),
                    Msg::Wake => {}
                }
                if batch.len() >= BATCH_BYTES {
                    break;
                }
                match rx.try_recv() {
                    Ok(msg) => next = Some(msg),
                    Err(TryRecvError::Empty | TryRecvError::Disconnected) => {}
                }
            }
            if self.reopen.swap(false, Ordering::AcqRel) {
                self.reopen_file();
            }
            self.write(&batch, lines);
            batch.clear();
            lines = 0;
            for ack in acks.drain(..) {
                let _ = ack.send(());
            }
        }
    }

    fn write(&mut self, batch: &[u8], lines: u64) {
        if lines == 0 {
            return;
        }
        self.metrics.queued.sub(lines as i64);
        match self.output.write_all(batch) {
            Ok(()) => {
                self.metrics.written.inc_by(lines);
                if self.failing {
                    self.failing = false;
                    info!("audit log writes succeed again");
                }
            }
            Err(err) => {
                self.metrics.write_failed.inc_by(lines);
                if !self.failing {
                    self.failing = true;
                    warn!(error = %err, lines, "cannot write the audit log; lines are dropped \
                          and counted in tether_audit_lines_total{{result=\"write_failed\"}} \
                          until a write succeeds");
                }
            }
        }
    }

    fn reopen_file(&mut self) {
        let Output::File { path, file } = &mut self.output else {
            return;
        };
        match open_append(path) {
            Ok(new) => {
                *file = new;
                info!(path = %path.display(), "audit log reopened");
            }
            // Keep writing to the old file: nothing is lost, and the next SIGHUP retries.
            Err(err) => {
                warn!(error = %err, "cannot reopen the audit log; still writing to the old file")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn rfc3339_with_millis() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_millis(1_767_323_045_007);
        assert_eq!(rfc3339_millis(at), "2026-01-02T03:04:05.007Z");
    }

    fn file_config(path: &Path, queue: usize) -> AuditLogConfig {
        AuditLogConfig {
            output: AuditOutput::File,
            path: path.to_owned(),
            queue,
        }
    }

    fn entry(log: &AuditLog, n: u16) -> AuditEntry {
        log.connection(
            Via::Forward("db"),
            SocketAddr::from(([127, 0, 0, 1], n)),
            None,
            "edge-1",
            &"db.internal:5432".parse().unwrap(),
        )
    }

    #[tokio::test]
    async fn off_records_nothing_and_a_dropped_entry_is_written_as_aborted() {
        let off = AuditLog::off();
        drop(entry(&off, 1));
        off.flush(Duration::from_secs(1)).await;

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let registry = Registry::new();
        let log = AuditLog::start(&file_config(&path, 16), &registry).unwrap();
        drop(entry(&log, 2));
        log.flush(Duration::from_secs(5)).await;
        let text = std::fs::read_to_string(&path).unwrap();
        let line: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(line["close"], "aborted");
        assert_eq!(line["via"], "forward");
        assert_eq!(line["forward"], "db");
        assert_eq!(line["consumer"], serde_json::Value::Null);
        assert_eq!(line["target_requested"], "db.internal:5432");
        assert_eq!(line["consumer_addr"], "127.0.0.1:2");
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts_instead_of_waiting() {
        let dir = tempfile::tempdir().unwrap();
        // A queue of one line: lines sent faster than the writer takes them are dropped, never
        // waited for, and every line is either written or counted as dropped.
        let path = dir.path().join("audit.jsonl");
        let registry = Registry::new();
        let log = AuditLog::start(&file_config(&path, 1), &registry).unwrap();
        for n in 0..2000 {
            drop(entry(&log, n));
        }
        log.flush(Duration::from_secs(5)).await;
        let shared = log.shared.as_ref().unwrap();
        let written = shared.metrics.written.get();
        let dropped = shared.metrics.dropped.get();
        assert_eq!(written + dropped, 2000);
        let lines = std::fs::read_to_string(&path).unwrap().lines().count() as u64;
        assert_eq!(lines, written);
        assert_eq!(shared.metrics.queued.get(), 0);
    }

    #[tokio::test]
    async fn a_full_disk_counts_write_failures_without_failing_the_caller() {
        // /dev/full fails every write with ENOSPC, as a full disk does.
        let registry = Registry::new();
        let log = AuditLog::start(&file_config(Path::new("/dev/full"), 64), &registry).unwrap();
        for n in 0..10 {
            drop(entry(&log, n));
        }
        log.flush(Duration::from_secs(5)).await;
        let shared = log.shared.as_ref().unwrap();
        assert_eq!(shared.metrics.write_failed.get(), 10);
        assert_eq!(shared.metrics.written.get(), 0);
    }
}
