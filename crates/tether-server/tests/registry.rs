//! The session registry over in-memory sessions: a reconnect of the same agent instance replaces
//! (and closes) the older session, other instances stay, guards deregister, and subscribers see
//! every change in order (or, when they lag, a snapshot that matches the registry).

use std::net::SocketAddr;
use std::sync::Arc;

use tether_mux::transport::framed;
use tether_mux::{MuxConfig, MuxMetrics, Role, Session};
use tether_proto::GoAwayCode;
use tether_server::registry::Revocation;
use tether_server::{RegistryMetrics, RegistryNotice, SessionEvent, SessionRegistry};

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

fn event(metrics: &RegistryMetrics, name: &str) -> u64 {
    metrics.session_events.with_label_values(&[name]).get()
}

#[tokio::test]
async fn same_instance_replaces_other_instances_stay() {
    let metrics = RegistryMetrics::unregistered().unwrap();
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
    let metrics = RegistryMetrics::unregistered().unwrap();
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

/// The ids of a list of entries, sorted.
fn ids(entries: &[tether_server::SessionEntry]) -> Vec<u64> {
    let mut ids: Vec<u64> = entries.iter().map(|e| e.session_id).collect();
    ids.sort_unstable();
    ids
}

/// A compact form of an event for assertions.
fn describe(notice: RegistryNotice) -> String {
    match notice {
        RegistryNotice::Event(SessionEvent::SessionAdded(e)) => {
            format!("added {} {} {}", e.client, e.session_id, e.instance)
        }
        RegistryNotice::Event(SessionEvent::SessionRemoved { client, session_id }) => {
            format!("removed {client} {session_id}")
        }
        RegistryNotice::Event(SessionEvent::StaleSessionRemoved {
            client,
            session_id,
            replaced_by,
        }) => format!("stale {client} {session_id} by {replaced_by}"),
        RegistryNotice::Event(SessionEvent::SessionRevoked {
            client,
            session_id,
            reason,
        }) => format!("revoked {client} {session_id} {reason}"),
        RegistryNotice::Lagged { missed, snapshot } => {
            format!("lagged {missed} {:?}", ids(&snapshot))
        }
    }
}

#[tokio::test]
async fn subscribers_see_every_change_in_order() {
    let metrics = RegistryMetrics::unregistered().unwrap();
    let registry = Arc::new(SessionRegistry::new(metrics));
    let peer: SocketAddr = "127.0.0.1:5000".parse().unwrap();
    let (s0, _a0) = session_pair();
    let g0 = registry.insert("edge-0", "inst-z", peer, s0);

    let (initial, mut sub) = registry.subscribe();
    assert_eq!(ids(&initial), vec![g0.session_id()]);
    assert!(sub.try_recv().is_none());

    let (s1, _a1) = session_pair();
    let (s2, _a2) = session_pair();
    let g1 = registry.insert("edge-1", "inst-a", peer, s1);
    let g2 = registry.insert("edge-1", "inst-a", peer, s2);
    let (id1, id2) = (g1.session_id(), g2.session_id());
    drop(g1); // already replaced: no second event
    drop(g2);

    let mut seen = Vec::new();
    while let Some(notice) = sub.try_recv() {
        seen.push(describe(notice));
    }
    assert_eq!(
        seen,
        vec![
            format!("added edge-1 {id1} inst-a"),
            format!("added edge-1 {id2} inst-a"),
            format!("stale edge-1 {id1} by {id2}"),
            format!("removed edge-1 {id2}"),
        ]
    );

    // recv() wakes up for an event published later.
    let waiter = tokio::spawn(async move { describe(sub.recv().await) });
    tokio::task::yield_now().await;
    drop(g0);
    assert_eq!(waiter.await.unwrap(), format!("removed edge-0 {}", 1));
}

#[tokio::test]
async fn a_lagging_subscriber_gets_a_snapshot_equal_to_the_registry_then_later_events() {
    let metrics = RegistryMetrics::unregistered().unwrap();
    let registry = Arc::new(SessionRegistry::new(metrics.clone()));
    let peer: SocketAddr = "127.0.0.1:5000".parse().unwrap();
    let (_initial, mut slow) = registry.subscribe_with_capacity(3);
    let (_initial, mut fast) = registry.subscribe_with_capacity(1000);

    // 10 sessions, then 4 of them go away (one by replacement): 15 events for a queue of 3.
    let mut guards = Vec::new();
    let mut agents = Vec::new();
    for i in 0..10 {
        let (s, a) = session_pair();
        agents.push(a);
        guards.push(registry.insert("edge-1", &format!("inst-{i}"), peer, s));
    }
    let (s, a) = session_pair();
    agents.push(a);
    let replacement = registry.insert("edge-1", "inst-0", peer, s);
    let replaced = guards.remove(0);
    for _ in 0..3 {
        drop(guards.pop());
    }
    drop(replaced);

    // The fast subscriber saw all 15 (11 added, 1 stale, 3 removed) in order.
    let mut fast_events = 0;
    while let Some(notice) = fast.try_recv() {
        assert!(matches!(notice, RegistryNotice::Event(_)), "{notice:?}");
        fast_events += 1;
    }
    assert_eq!(fast_events, 15);

    // The slow one gets one notice: lagged, with the registry as it is now.
    let notice = slow.try_recv().expect("a lag notice");
    let RegistryNotice::Lagged { missed, snapshot } = notice else {
        panic!("expected a lag notice, got {notice:?}");
    };
    assert_eq!(missed, 15);
    assert_eq!(ids(&snapshot), ids(&registry.all_sessions()));
    assert_eq!(snapshot.len(), 7);
    assert!(
        !snapshot.iter().any(|e| e.session_id == 1),
        "replaced session listed"
    );
    assert!(
        slow.try_recv().is_none(),
        "events before the snapshot were dropped"
    );

    // After the snapshot it continues with ordinary events.
    let last = guards.pop().unwrap();
    let last_id = last.session_id();
    drop(last);
    assert_eq!(
        describe(slow.try_recv().unwrap()),
        format!("removed edge-1 {last_id}")
    );
    assert!(slow.try_recv().is_none());
    drop(replacement);
    assert_eq!(
        metrics
            .session_events
            .with_label_values(&["stale_removed"])
            .get(),
        1
    );
}

#[tokio::test]
async fn a_subscriber_that_never_reads_does_not_block_and_dropping_unsubscribes() {
    let metrics = RegistryMetrics::unregistered().unwrap();
    let registry = Arc::new(SessionRegistry::new(metrics));
    let peer: SocketAddr = "127.0.0.1:5000".parse().unwrap();
    let (_initial, stuck) = registry.subscribe_with_capacity(1);
    let (_initial, other) = registry.subscribe();
    assert_eq!(registry.subscriber_count(), 2);
    let (s, _a) = session_pair();
    for _ in 0..1000 {
        // The same instance over and over: each insert replaces the previous session.
        let guard = registry.insert("edge-1", "inst-a", peer, s.clone());
        drop(guard);
    }
    assert_eq!(registry.session_count(), 0);
    drop(stuck);
    assert_eq!(registry.subscriber_count(), 1);
    drop(other);
    assert_eq!(registry.subscriber_count(), 0);
}

#[tokio::test]
async fn dials_prefer_the_newest_healthy_session_and_fall_back_to_the_newest_open_one() {
    let metrics = RegistryMetrics::unregistered().unwrap();
    let registry = Arc::new(SessionRegistry::new(metrics));
    let peer: SocketAddr = "127.0.0.1:5000".parse().unwrap();
    let (s1, _a1) = session_pair();
    let (s2, _a2) = session_pair();
    let g1 = registry.insert("edge-1", "inst-a", peer, s1);
    let g2 = registry.insert("edge-1", "inst-b", peer, s2);
    let newest = registry.pick_entry("edge-1").unwrap();
    assert_eq!(newest.session_id, g2.session_id());

    newest.health.set_healthy(false);
    assert_eq!(
        registry.pick_entry("edge-1").unwrap().session_id,
        g1.session_id()
    );
    registry.sessions("edge-1")[0].health.set_healthy(false);
    // None healthy: the newest open one, rather than failing.
    assert_eq!(
        registry.pick_entry("edge-1").unwrap().session_id,
        g2.session_id()
    );
    let listed = registry.snapshot();
    assert!(listed[0].sessions.iter().all(|s| !s.healthy));
}

#[tokio::test]
async fn revoke_closes_exactly_the_refused_sessions_with_their_own_event() {
    let metrics = RegistryMetrics::unregistered().unwrap();
    let registry = Arc::new(SessionRegistry::new(metrics.clone()));
    let peer: SocketAddr = "127.0.0.1:5000".parse().unwrap();
    let (s1, a1) = session_pair();
    let (s2, _a2) = session_pair();
    let g1 = registry.insert("edge-1", "a", peer, s1.clone());
    let g2 = registry.insert("edge-2", "b", peer, s2.clone());
    let (_, mut events) = registry.subscribe();

    let closed = registry.revoke(|e| {
        (e.client == "edge-1").then(|| Revocation {
            reason: "revoked",
            detail: "certificate revoked".into(),
        })
    });
    assert_eq!(closed.len(), 1);
    assert_eq!(closed[0].0, g1.session_id());
    assert!(s1.is_closed());
    assert!(!s2.is_closed());
    assert_eq!(
        describe(events.try_recv().unwrap()),
        format!("revoked edge-1 {} revoked", g1.session_id())
    );
    assert!(events.try_recv().is_none());
    assert_eq!(event(&metrics, "revoked"), 1);
    assert_eq!(metrics.sessions.with_label_values(&["edge-1"]).get(), 0);
    // The agent heard why.
    a1.closed().await;
    assert_eq!(
        a1.peer_goaway(),
        Some((GoAwayCode::Revoked, "certificate revoked".to_owned()))
    );
    // Its guard finds nothing left: no plain removal on top.
    drop(g1);
    assert_eq!(event(&metrics, "removed"), 0);
    // A second sweep finds nothing.
    assert!(registry.revoke(|_| None).is_empty());
    drop(g2);
}
