//! The notify protocol against a test-owned NOTIFY_SOCKET (path and abstract), and the watchdog task.

#![cfg(target_os = "linux")]
// Test helpers panic on failure by design; the wedge test measures a real stall of a real
// runtime, so it uses the wall clock.
#![allow(clippy::disallowed_types, clippy::unwrap_used)]

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

use tether_common::sd_notify::{Notifier, SEND_TIMEOUT, run_watchdog};

/// Receives one datagram as text, failing the test after `within`.
fn recv(socket: &UnixDatagram, within: Duration) -> String {
    socket.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 4096];
    let n = socket
        .recv(&mut buf)
        .unwrap_or_else(|e| panic!("no notification within {within:?}: {e}"));
    String::from_utf8(buf[..n].to_vec()).unwrap()
}

const WITHIN: Duration = Duration::from_secs(10);

fn monotonic_now_usec() -> u128 {
    // The kernel's CLOCK_MONOTONIC as seen from outside the library: /proc/uptime is
    // CLOCK_BOOTTIME, which is >= MONOTONIC, so it bounds the value from above.
    let uptime = std::fs::read_to_string("/proc/uptime").unwrap();
    let secs: f64 = uptime.split_whitespace().next().unwrap().parse().unwrap();
    (secs * 1e6) as u128 + 1_000_000
}

fn assert_states(socket: &UnixDatagram, notifier: &Notifier) {
    notifier.ready().unwrap();
    assert_eq!(recv(socket, WITHIN), "READY=1");

    let before = monotonic_now_usec();
    notifier.reloading().unwrap();
    let reloading = recv(socket, WITHIN);
    let mut lines = reloading.lines();
    assert_eq!(lines.next(), Some("RELOADING=1"));
    let usec: u128 = lines
        .next()
        .and_then(|l| l.strip_prefix("MONOTONIC_USEC="))
        .unwrap_or_else(|| panic!("no MONOTONIC_USEC in {reloading:?}"))
        .parse()
        .unwrap();
    // Within the plausible range of the monotonic clock (at most boot time, and recent).
    assert!(usec > 0 && usec <= monotonic_now_usec(), "{usec}");
    assert!(
        usec + 60_000_000 >= before,
        "MONOTONIC_USEC {usec} far behind {before}"
    );
    assert_eq!(lines.next(), None);

    notifier.ready().unwrap();
    assert_eq!(recv(socket, WITHIN), "READY=1");
    notifier.watchdog().unwrap();
    assert_eq!(recv(socket, WITHIN), "WATCHDOG=1");
    notifier.status("draining\n3 streams").unwrap();
    assert_eq!(recv(socket, WITHIN), "STATUS=draining 3 streams");
    notifier.stopping().unwrap();
    assert_eq!(recv(socket, WITHIN), "STOPPING=1");
}

#[test]
fn notifies_a_path_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    let notifier = Notifier::connect(path.to_str().unwrap()).unwrap();
    assert!(notifier.is_enabled());
    assert_states(&socket, &notifier);
}

#[test]
fn notifies_an_abstract_socket() {
    let name = format!(
        "tether-test-notify-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    );
    let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let socket = UnixDatagram::bind_addr(&addr).unwrap();
    let notifier = Notifier::connect(&format!("@{name}")).unwrap();
    assert_states(&socket, &notifier);
}

#[test]
fn a_missing_socket_is_an_error_not_a_hang() {
    let dir = tempfile::tempdir().unwrap();
    let notifier = Notifier::connect(dir.path().join("gone.sock").to_str().unwrap()).unwrap();
    let err = notifier.ready().unwrap_err();
    assert!(err.to_string().contains("READY=1"), "{err}");
}

/// A supervisor that never reads: once the socket's queue is full, a send gives up after
/// SEND_TIMEOUT with an error instead of blocking the daemon.
#[test]
fn a_full_queue_fails_after_the_send_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let _socket = UnixDatagram::bind(&path).unwrap();
    let notifier = Notifier::connect(path.to_str().unwrap()).unwrap();
    let started = std::time::Instant::now();
    let mut sent = 0;
    let err = loop {
        match notifier.watchdog() {
            Ok(()) => sent += 1,
            Err(err) => break err,
        }
        assert!(sent < 100_000, "the queue never filled");
    };
    let waited = started.elapsed();
    assert!(sent >= 1, "not even one datagram was queued");
    assert!(err.to_string().contains("WATCHDOG=1"), "{err}");
    assert!(
        waited >= SEND_TIMEOUT / 2 && waited < SEND_TIMEOUT * 10,
        "gave up after {waited:?}"
    );
}

/// Waits for the next ping without blocking the runtime (the watchdog runs on it).
async fn next_ping(arrivals: &std::sync::mpsc::Receiver<std::time::Instant>) {
    let deadline = tokio::time::Instant::now() + WITHIN;
    while arrivals.try_recv().is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no watchdog ping within {WITHIN:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The watchdog pings at its interval while the runtime runs, and stops while the runtime is
/// wedged (its only worker thread blocked), so systemd would see the missed deadline.
#[test]
fn watchdog_pings_and_stops_when_the_runtime_wedges() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    let notifier = Notifier::connect(path.to_str().unwrap()).unwrap();
    let ender = notifier.clone();

    // A receiver thread records when each ping arrives.
    let (arrivals_tx, arrivals_rx) = std::sync::mpsc::sync_channel::<std::time::Instant>(1024);
    let receiver = std::thread::spawn(move || {
        socket
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut buf = [0u8; 64];
        while let Ok(n) = socket.recv(&mut buf) {
            if &buf[..n] == b"END" {
                return;
            }
            assert_eq!(&buf[..n], b"WATCHDOG=1");
            if arrivals_tx.send(std::time::Instant::now()).is_err() {
                return;
            }
        }
    });

    let interval = Duration::from_millis(20);
    let wedge = Duration::from_millis(600);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let watchdog = tokio::spawn(run_watchdog(notifier, interval));
        // Healthy: pings keep coming.
        for _ in 0..3 {
            next_ping(&arrivals_rx).await;
        }
        // Wedge the runtime: block its only thread without yielding.
        while arrivals_rx.try_recv().is_ok() {}
        let wedged_at = std::time::Instant::now();
        std::thread::sleep(wedge);
        let during: Vec<_> = arrivals_rx
            .try_iter()
            .filter(|t| *t > wedged_at + interval * 2)
            .collect();
        assert!(
            during.is_empty(),
            "pings arrived while the runtime was wedged: {during:?}"
        );
        // Unwedged: pings resume.
        next_ping(&arrivals_rx).await;
        watchdog.abort();
    });
    drop(runtime);
    ender.send("END").unwrap();
    receiver.join().unwrap();
}
