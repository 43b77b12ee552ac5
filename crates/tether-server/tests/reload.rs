//! `ServerReloader::reload`: the allow-list and forwards change in place (an added forward
//! serves at once, a removed one stops accepting, an untouched one keeps its listener and its
//! open connections), a new tunnel listener address is reported as needing a restart, an
//! identical config is `unchanged` and an invalid one is rejected. The agent session stays up.

// Helpers outside #[test] functions panic on failure too; that is what a test wants.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;

use support::{base_config, client_config, connect_agent, spawn_dialing_agent, start};
use tether_server::ForwardConfig;
use tether_testkit::{TestPki, echo_server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn forward(name: &str, target: SocketAddr) -> ForwardConfig {
    ForwardConfig {
        name: name.into(),
        listen: "127.0.0.1:0".into(),
        client: "edge-1".into(),
        target: target.to_string(),
    }
}

async fn round_trip(tcp: &mut TcpStream, data: &[u8]) {
    tcp.write_all(data).await.unwrap();
    let mut buf = vec![0u8; data.len()];
    tcp.read_exact(&mut buf).await.unwrap();
    assert_eq!(buf, data);
}

#[tokio::test]
async fn allow_list_and_forwards_change_in_place() {
    let pki = TestPki::new();
    let (echo, _echo) = echo_server().await;
    let mut config = base_config(&pki);
    config.allowed_agents = vec!["edge-1".into()];
    config.forwards = vec![forward("a", echo)];
    let server = start(config.clone()).await;
    let agent = pki.agent("edge-1");
    let (agent_session, _) = connect_agent(server.tunnel, client_config(&pki, &agent), "i-1").await;
    let _dialer = spawn_dialing_agent(agent_session.incoming);
    support::eventually("agent registered", || server.registry.session_count() == 1).await;
    let a = server.reloader.forward_addrs()["a"];
    let mut through_a = TcpStream::connect(a).await.unwrap();
    round_trip(&mut through_a, b"one").await;

    // Identical: nothing to do.
    let outcome = server.reloader.reload(config.clone()).await.unwrap();
    assert_eq!(outcome.result.label(), "unchanged");

    // Add forward b, widen the allow-list, and ask for a new tunnel address.
    let mut next = config.clone();
    next.allowed_agents.push("edge-2".into());
    next.forwards.push(forward("b", echo));
    next.listen = "127.0.0.1:1".into();
    let outcome = server.reloader.reload(next.clone()).await.unwrap();
    assert_eq!(outcome.result.label(), "applied");
    assert!(
        outcome.changed.contains(&"forwards".to_owned()),
        "{outcome:?}"
    );
    assert!(
        outcome
            .changed
            .iter()
            .any(|f| f.starts_with("allowed_agents"))
    );
    assert_eq!(outcome.restart_required, ["listen"]);
    assert_eq!(server.metric("tether_config_restart_required_total"), 1.0);
    let addrs = server.reloader.forward_addrs();
    assert_eq!(addrs["a"], a, "an untouched forward keeps its listener");
    let mut through_b = TcpStream::connect(addrs["b"]).await.unwrap();
    round_trip(&mut through_b, b"two").await;
    round_trip(&mut through_a, b"three").await;
    // edge-2 is allowed now.
    let edge2 = pki.agent("edge-2");
    let (_edge2, response) = connect_agent(server.tunnel, client_config(&pki, &edge2), "i-2").await;
    assert_eq!(response.status(), 101);

    // Remove a: its listener closes, its open connection keeps flowing, b is untouched.
    next.forwards.retain(|f| f.name != "a");
    next.listen = config.listen.clone();
    let outcome = server.reloader.reload(next.clone()).await.unwrap();
    assert_eq!(outcome.result.label(), "applied");
    assert!(
        TcpStream::connect(a).await.is_err(),
        "removed forward stops accepting"
    );
    round_trip(&mut through_a, b"four").await;
    round_trip(&mut through_b, b"five").await;
    assert_eq!(server.reloader.forward_addrs()["b"], addrs["b"]);

    // Invalid: rejected, counted, nothing changes.
    let mut invalid = next.clone();
    invalid.forwards.push(forward("c", echo));
    invalid.forwards[1].target = "no port".into();
    let errors = server.reloader.reload(invalid).await.unwrap_err();
    assert!(
        errors.to_string().contains("forwards[1].target"),
        "{errors}"
    );
    assert_eq!(
        server.metric("tether_config_reloads_total{result=\"invalid\"}"),
        1.0
    );
    assert_eq!(server.reloader.forward_addrs().len(), 1);
    assert_eq!(server.reloader.current(), next.clone().effective());

    // The agent session was never touched.
    assert!(!agent_session.session.is_closed());
    assert_eq!(
        server.metric("tether_config_reloads_total{result=\"unchanged\"}"),
        1.0
    );
    assert_eq!(
        server.metric("tether_config_reloads_total{result=\"applied\"}"),
        2.0
    );

    // A restart-only change is reported as such, once: a later reload of the same file is
    // `unchanged` and does not count (or warn) again; an in-place change next to it does not
    // announce it again either.
    let mut restart = next.clone();
    restart.listen = "127.0.0.1:2".into();
    let outcome = server.reloader.reload(restart.clone()).await.unwrap();
    assert_eq!(outcome.result.label(), "restart_required", "{outcome:?}");
    assert_eq!(outcome.restart_required, ["listen"]);
    assert_eq!(server.metric("tether_config_restart_required_total"), 2.0);
    let outcome = server.reloader.reload(restart.clone()).await.unwrap();
    assert_eq!(outcome.result.label(), "unchanged", "{outcome:?}");
    restart.max_agents += 1;
    let outcome = server.reloader.reload(restart.clone()).await.unwrap();
    assert_eq!(outcome.result.label(), "applied", "{outcome:?}");
    assert!(outcome.restart_required.is_empty(), "{outcome:?}");
    assert_eq!(server.metric("tether_config_restart_required_total"), 2.0);
    assert_eq!(
        server.metric("tether_config_reloads_total{result=\"restart_required\"}"),
        1.0
    );
    assert_eq!(
        server.reloader.current().listen,
        next.listen,
        "still the running value"
    );
    server.stop().await.unwrap();
}
