//! The session registry over in-memory sessions: a reconnect of the same agent instance replaces
//! (and closes) the older session, other instances stay, and guards deregister.

use std::net::SocketAddr;
use std::sync::Arc;

use tether_mux::transport::framed;
use tether_mux::{MuxConfig, MuxMetrics, Role, Session};
use tether_proto::GoAwayCode;
use tether_server::{ServerMetrics, SessionRegistry};

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

fn event(metrics: &ServerMetrics, name: &str) -> u64 {
    metrics.session_events.with_label_values(&[name]).get()
}

#[tokio::test]
async fn same_instance_replaces_other_instances_stay() {
    let metrics = ServerMetrics::unregistered().unwrap();
    let registry = Arc::new(SessionRegistry::new(metrics.clone()));
    let peer: SocketAddr = "127.0.0.1:5000".parse().unwrap();

    let (s1, a1) = session_pair();
    let (s2, _a2) = session_pair();
    let (s3, _a3) = session_pair();
    let g1 = registry.insert("edge-1", "inst-a", peer, s1.clone());
    let g2 = registry.insert("edge-1", "inst-b", peer, s2.clone());
    assert_eq!(
        registry.pick_entry("edge-1").unwrap().session_id,
        g2.session_id()
    );

    // inst-a reconnects: its old session is closed and reported stale.
    let g3 = registry.insert("edge-1", "inst-a", peer, s3.clone());
    assert!(s1.is_closed());
    assert!(!s2.is_closed());
    let ids: Vec<u64> = registry
        .sessions("edge-1")
        .iter()
        .map(|e| e.session_id)
        .collect();
    assert_eq!(ids, vec![g2.session_id(), g3.session_id()]);
    assert_eq!(
        registry.pick_entry("edge-1").unwrap().session_id,
        g3.session_id()
    );
    assert_eq!(event(&metrics, "added"), 3);
    assert_eq!(event(&metrics, "stale_removed"), 1);
    assert_eq!(event(&metrics, "removed"), 0);
    assert_eq!(metrics.sessions.with_label_values(&["edge-1"]).get(), 2);
    assert_eq!(metrics.agents_connected.get(), 1);
    // The agent side of the replaced session heard why.
    a1.closed().await;
    assert_eq!(
        a1.peer_goaway().map(|(code, _)| code),
        Some(GoAwayCode::Replaced)
    );

    // The replaced session's guard finds nothing left to remove: no double count.
    drop(g1);
    assert_eq!(event(&metrics, "removed"), 0);
    assert_eq!(registry.session_count(), 2);

    drop(g3);
    assert_eq!(
        registry.pick_entry("edge-1").unwrap().session_id,
        g2.session_id()
    );
    drop(g2);
    assert_eq!(event(&metrics, "removed"), 2);
    assert_eq!(registry.session_count(), 0);
    assert_eq!(metrics.sessions.with_label_values(&["edge-1"]).get(), 0);
    assert_eq!(metrics.agents_connected.get(), 0);
    let err = registry.pick("edge-1").unwrap_err();
    assert_eq!(err.to_string(), "no agent connected for client \"edge-1\"");
    // Listed with zero sessions.
    let snapshot = registry.snapshot();
    assert_eq!(snapshot.len(), 1);
    assert!(snapshot[0].sessions.is_empty());
}

#[tokio::test]
async fn empty_instances_never_replace_and_closed_sessions_are_not_picked() {
    let metrics = ServerMetrics::unregistered().unwrap();
    let registry = Arc::new(SessionRegistry::new(metrics.clone()));
    let peer: SocketAddr = "127.0.0.1:5000".parse().unwrap();
    let (s1, _a1) = session_pair();
    let (s2, _a2) = session_pair();
    let g1 = registry.insert("edge-1", "", peer, s1.clone());
    let g2 = registry.insert("edge-1", "", peer, s2.clone());
    assert_eq!(registry.session_count(), 2);
    assert_eq!(event(&metrics, "stale_removed"), 0);

    // The newest is closed (its task has not deregistered yet): the older one is picked.
    s2.close();
    assert_eq!(
        registry.pick_entry("edge-1").unwrap().session_id,
        g1.session_id()
    );
    drop(g2);
    drop(g1);
    assert!(registry.pick("edge-1").is_err());
    assert!(registry.pick("never-seen").is_err());
}
