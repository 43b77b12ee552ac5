//! Dials in one round trip: with a session that negotiated early data and no other session
//! to fail over to, the stream is handed out before the agent's answer (so the consumer's
//! first bytes travel with the OPEN), and the answer is awaited and counted beside the pump.

use tether_mux::OpenAnswer;
use tether_proto::TargetAddr;
use tokio::time::Instant;

use crate::consumers::dial::{AgentDialer, DialError, DialedStream};

/// An early dial whose answer is still to come (see [`AgentDialer::dial_early`]).
#[derive(Debug)]
pub(crate) struct EarlyDial {
    answer: OpenAnswer,
    started: Instant,
    target: TargetAddr,
}

impl AgentDialer {
    /// Like [`AgentDialer::dial`], but in one round trip when the session negotiated it and
    /// there is no other session to fail over to. The answer is [`Self::answered`]'s, which
    /// counts it as `dial` counts its own.
    pub(crate) async fn dial_early(
        &self,
        client: &str,
        target: &TargetAddr,
    ) -> Result<(DialedStream, Option<EarlyDial>), DialError> {
        let entry = match self.registry.pick_entry(client) {
            Ok(entry) if entry.session.early_data() && !self.has_alternative(client, &entry) => {
                entry
            }
            _ => return self.dial(client, target).await.map(|conn| (conn, None)),
        };
        let compat = self
            .metrics
            .remotedialer
            .as_ref()
            .map(|compat| compat.connection(client));
        let started = Instant::now();
        // Boxed: see `dial`.
        let opening = Box::pin(entry.session.open_early(target.clone(), self.dial_timeout));
        match opening.await {
            Ok((stream, answer)) => {
                let conn = DialedStream {
                    stream,
                    session_id: entry.session_id,
                    instance: entry.instance,
                    _compat: compat,
                };
                let target = target.clone();
                let early = EarlyDial {
                    answer,
                    started,
                    target,
                };
                Ok((conn, Some(early)))
            }
            Err(source) => Err(self.open_failed(target, source)),
        }
    }

    /// The agent's answer to an early dial (`Ok` at once for a dial that waited for it);
    /// counted in the dial metrics. A stream that went away before its answer is `Ok`.
    pub(crate) async fn answered(&self, early: Option<EarlyDial>) -> Result<(), DialError> {
        let Some(EarlyDial {
            answer,
            started,
            target,
        }) = early
        else {
            return Ok(());
        };
        let outcome = answer.outcome().await;
        self.metrics
            .dial_duration
            .observe(started.elapsed().as_secs_f64());
        match outcome {
            Some(Err(source)) => Err(self.open_failed(&target, source)),
            _ => Ok(()),
        }
    }
}
