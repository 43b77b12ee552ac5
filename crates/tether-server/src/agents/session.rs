//! One agent's session after its upgrade: the multiplexer over the WebSocket (tether.v1
//! framing, or the remotedialer translation), registered for exactly as long as it runs, its
//! end remembered in the client's history.

use std::net::SocketAddr;

use axum::extract::ws::WebSocket;
use prometheus::IntGauge;
use tether_mux::remotedialer::{self, RdSettings, RdTransport};
use tether_mux::{Incoming, Role, Session, SessionDriver, SessionEnd};
use tether_proto::GoAwayCode;
use tether_proto::remotedialer::RdLimits;
use tokio::time::Instant;
use tracing::{Span, info, warn};

use crate::agents::framing::TetherFraming;
use crate::agents::listener_context::ListenerContext;
use crate::agents::registry::{PeerChain, Protocol, SessionMeta};
use crate::agents::upgrade::handoff::UpgradedAgent;
use crate::agents::websocket::AxumMessages;

/// Runs the agent's session to its end; the registry entry lives exactly as long.
pub(crate) async fn run_session(
    agents: &ListenerContext,
    agent_id: String,
    peer: SocketAddr,
    up: UpgradedAgent,
    chain: Option<PeerChain>,
) {
    let UpgradedAgent {
        socket,
        agent_id: _,
        instance,
        endpoint,
        version,
        labels,
        slot,
        protocol,
        peer_caps,
    } = up;
    let (session, incoming, driver) = start_mux(agents, socket, protocol, &peer_caps);
    let protocol_gauge = agents
        .metrics
        .protocol_sessions
        .with_label_values(&[protocol.label()]);
    protocol_gauge.inc();
    let _protocol_count = GaugeDec(protocol_gauge);
    // The server takes no streams from agents: without a receiver the mux answers every OPEN
    // with OPEN_ERR(unsupported).
    drop(incoming);
    let guard = agents.registry.insert_labelled(
        &agent_id,
        peer,
        session.clone(),
        SessionMeta {
            instance: instance.clone(),
            endpoint,
            protocol,
            labels,
            peer_chain: chain,
        },
    );
    Span::current().record("session.id", guard.session_id());
    info!(
        instance = %instance,
        agent.version = %version,
        protocol = protocol.label(),
        "agent connected"
    );
    if agents.shutdown.is_cancelled() {
        session.goaway(GoAwayCode::Shutdown, "server shutting down");
    }
    let connected_at = Instant::now();
    let run = driver.run();
    tokio::pin!(run);
    let end = tokio::select! {
        end = &mut run => end,
        _ = agents.hard_stop.cancelled() => {
            session.close();
            run.await
        }
    };
    // Free the max_agents slot first: once the session is gone from the registry, a new one
    // is admitted.
    let session_id = guard.session_id();
    drop(slot);
    drop(guard);
    agents.registry.history().session_ended(
        &agent_id,
        session_id,
        end.label(),
        &end.to_string(),
        connected_at.elapsed().as_secs_f64(),
    );
    match end {
        SessionEnd::Protocol(_) => warn!(reason = end.label(), error = %end, "agent disconnected"),
        _ => info!(reason = end.label(), "agent disconnected"),
    }
}

/// Decrements a gauge when dropped, on every exit path.
struct GaugeDec(IntGauge);

impl Drop for GaugeDec {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The multiplexer over an upgraded WebSocket, in the upgrade's wire protocol.
fn start_mux(
    agents: &ListenerContext,
    socket: WebSocket,
    protocol: Protocol,
    peer_caps: &tether_proto::Caps,
) -> (Session, Incoming, SessionDriver) {
    let messages = AxumMessages::new(socket, protocol.label());
    let metrics = agents.metrics.mux.clone();
    match protocol {
        Protocol::Tether => {
            let framing = TetherFraming::new(messages, agents.mux_config.limits());
            // Capabilities: what both sides offered (nothing new with an older agent).
            let config = agents.mux_config.clone().negotiate(peer_caps);
            Session::new(framing, Role::Server, config, metrics)
        }
        Protocol::Remotedialer => {
            let config = remotedialer::mux_config(Role::Server, &agents.mux_config);
            let settings = RdSettings {
                close_linger: agents.rd_close_linger,
                sync_grace: agents.rd_sync_grace,
                ..remotedialer::settings_for(&config)
            };
            let transport = RdTransport::new(messages, Role::Server, settings, RdLimits::default());
            Session::new(transport, Role::Server, config, metrics)
        }
    }
}
