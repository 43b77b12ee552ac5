//! The remotedialer-compatible session counters follow the registry: one add per session, one
//! remove per session however it ends (replaced by a reconnect, or deregistered), never two.

#![allow(clippy::unwrap_used)] // test helpers panic on failure by design

use std::net::SocketAddr;
use std::sync::Arc;

use prometheus::Registry;
use tether_mux::transport::framed;
use tether_mux::{MuxConfig, MuxMetrics, Role, Session};
use tether_server::{RegistryMetrics, SessionRegistry};

/// A server-side session whose agent side is kept alive in a task.
fn session_pair() -> (Session, Session) {
    let config = MuxConfig::default();
    let (a, b) = tokio::io::duplex(64 * 1024);
    let metrics = MuxMetrics::unregistered();
    let (server, _server_in, server_driver) = Session::new(
        framed(a, config.limits()),
        Role::Server,
        config.clone(),
        metrics.clone(),
    );
    let (agent, _agent_in, agent_driver) =
        Session::new(framed(b, config.limits()), Role::Agent, config, metrics);
    tokio::spawn(server_driver.run());
    tokio::spawn(agent_driver.run());
    (server, agent)
}

#[tokio::test]
async fn sessions_are_added_and_removed_exactly_once() {
    let prometheus = Registry::new();
    let metrics = RegistryMetrics::register(&prometheus)
        .unwrap()
        .with_remotedialer_compat(&prometheus)
        .unwrap();
    let compat = metrics.remotedialer.clone().unwrap();
    let registry = Arc::new(SessionRegistry::new(metrics));
    let peer: SocketAddr = "127.0.0.1:5000".parse().unwrap();
    let counts = || {
        (
            compat
                .add_session
                .with_label_values(&["edge-1", "false"])
                .get(),
            compat
                .remove_session
                .with_label_values(&["edge-1", "false"])
                .get(),
        )
    };

    let (s1, _a1) = session_pair();
    let (s2, _a2) = session_pair();
    let g1 = registry.insert("edge-1", "inst-a", peer, s1);
    assert_eq!(counts(), (1, 0));
    // The same instance reconnects: the old session is replaced and counted removed ...
    let g2 = registry.insert("edge-1", "inst-a", peer, s2);
    assert_eq!(counts(), (2, 1));
    // ... and its guard, dropped later, does not count it again.
    drop(g1);
    assert_eq!(counts(), (2, 1));
    drop(g2);
    assert_eq!(counts(), (2, 2));

    // Registering the compat counters twice in one registry fails instead of double counting.
    assert!(
        RegistryMetrics::unregistered()
            .unwrap()
            .with_remotedialer_compat(&prometheus)
            .is_err()
    );
}
