//! The reconnect decisions of one endpoint, without I/O: which backoff step comes next, when a
//! streak starts over, and how loudly each event is logged (a failure streak is a warning once,
//! then one info line per backoff step). The supervisor's loop feeds it what happened and does
//! what it answers.

use std::sync::Arc;
use std::time::Duration;

use tether_common::backoff::Backoff;
use tether_proto::GoAwayCode;

use crate::config::ReconnectConfig;

/// How loudly to log one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Loudness {
    Warn,
    Info,
    Debug,
}

/// Failure streak bookkeeping: the first failure is a warning; later ones are logged at info
/// only when the kind of failure changes or the attempt count reaches a power of two (once per
/// doubling of the backoff), and at debug otherwise.
#[derive(Debug, Default)]
struct RetryLog {
    streak: u32,
    last_kind: Option<&'static str>,
    /// The streak follows a replica's announced restart: its first failure is news, not a
    /// warning.
    planned: bool,
}

impl RetryLog {
    fn failure(&mut self, kind: &'static str) -> Loudness {
        self.streak = self.streak.saturating_add(1);
        let changed = self.last_kind.replace(kind) != Some(kind);
        if self.streak == 1 && !self.planned {
            Loudness::Warn
        } else if self.streak == 1 || changed || self.streak.is_power_of_two() {
            Loudness::Info
        } else {
            Loudness::Debug
        }
    }

    /// Ends the streak; returns how many failures it had.
    fn reset(&mut self) -> u32 {
        self.last_kind = None;
        self.planned = false;
        std::mem::take(&mut self.streak)
    }
}

/// One more failure of the streak: wait `delay`, log it at `loudness` as attempt `attempt`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Retry {
    pub(crate) delay: Duration,
    pub(crate) loudness: Loudness,
    pub(crate) attempt: u32,
}

/// A session was established.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Connected {
    /// Failures of the streak before it (the streak goes on until a session lives long).
    pub(crate) failed_attempts: u32,
    /// A recovery is news; a flapping server (sessions that die young) is logged once per
    /// backoff step like any other failure streak.
    pub(crate) loudness: Loudness,
    /// Not this endpoint's first session (`tether_agent_reconnects_total`).
    pub(crate) is_reconnect: bool,
}

/// What to do after a session ended on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AfterSession {
    /// The replica announced a restart: not a failure; come back after `delay`.
    ReplicaRestarting { delay: Duration },
    /// The session lived long enough: a fresh streak, reconnect after `delay`.
    LivedLong { delay: Duration, loudness: Loudness },
    /// A short session: one more failure of the streak.
    Failed(Retry),
}

/// The reconnect policy of one endpoint: the backoff, the failure streak and the settings
/// (swapped by reloads).
#[derive(Debug)]
pub(crate) struct RetryPolicy {
    config: Arc<ReconnectConfig>,
    backoff: Backoff,
    log: RetryLog,
    sessions: u64,
}

impl RetryPolicy {
    pub(crate) fn new(config: Arc<ReconnectConfig>) -> RetryPolicy {
        RetryPolicy {
            backoff: Backoff::new(config.min_delay.0, config.max_delay.0),
            config,
            log: RetryLog::default(),
            sessions: 0,
        }
    }

    /// Uses `config` from now on; a changed one restarts the backoff from its `min_delay`.
    pub(crate) fn reconfigure(&mut self, config: Arc<ReconnectConfig>) {
        if config != self.config {
            self.backoff = Backoff::new(config.min_delay.0, config.max_delay.0);
            self.config = config;
        }
    }

    /// A fresh streak (the gate opened again, a duplicate became free, a reload reconnects).
    pub(crate) fn start_over(&mut self) {
        self.backoff.reset();
        self.log.reset();
    }

    /// The connection attempt failed with `kind`.
    pub(crate) fn connect_failed(&mut self, kind: &'static str) -> Retry {
        self.failure(kind)
    }

    /// A session was established.
    pub(crate) fn connected(&mut self) -> Connected {
        self.sessions = self.sessions.saturating_add(1);
        let failed_attempts = self.log.streak;
        let flapping = self
            .log
            .last_kind
            .is_some_and(|kind| kind.starts_with("session_"));
        let loudness = if !flapping || failed_attempts.is_power_of_two() {
            Loudness::Info
        } else {
            Loudness::Debug
        };
        Connected {
            failed_attempts,
            loudness,
            is_reconnect: self.sessions > 1,
        }
    }

    /// The session ended on its own after `lived`, with `kind`
    /// (`session_end_kind`) and the server's GOAWAY code if it sent one.
    pub(crate) fn session_ended(
        &mut self,
        kind: &'static str,
        goaway: Option<GoAwayCode>,
        lived: Duration,
    ) -> AfterSession {
        if goaway == Some(GoAwayCode::Restart) {
            self.start_over();
            self.log.planned = true;
            return AfterSession::ReplicaRestarting {
                delay: self.backoff.next_delay(),
            };
        }
        if lived >= self.config.reset_after.0 {
            self.start_over();
            let loudness = if goaway.is_some() {
                Loudness::Info
            } else {
                Loudness::Warn
            };
            return AfterSession::LivedLong {
                delay: self.backoff.next_delay(),
                loudness,
            };
        }
        AfterSession::Failed(self.failure(kind))
    }

    fn failure(&mut self, kind: &'static str) -> Retry {
        let loudness = self.log.failure(kind);
        Retry {
            delay: self.backoff.next_delay(),
            loudness,
            attempt: self.log.streak,
        }
    }

    #[cfg(test)]
    fn with_seed(mut self, seed: u64) -> RetryPolicy {
        self.backoff = self.backoff.with_seed(seed);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_common::duration::HumanDuration;

    use Loudness::*;

    const MIN: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_millis(800);

    fn config(reset_after_secs: u64) -> Arc<ReconnectConfig> {
        Arc::new(ReconnectConfig {
            min_delay: HumanDuration(MIN),
            max_delay: HumanDuration(MAX),
            reset_after: HumanDuration::secs(reset_after_secs),
        })
    }

    fn policy() -> RetryPolicy {
        RetryPolicy::new(config(30)).with_seed(7)
    }

    /// The ceiling the `n`th delay of a streak (from 1) is drawn under.
    fn ceiling(n: u32) -> Duration {
        (MIN * 2u32.pow(n - 1)).min(MAX)
    }

    #[test]
    fn a_streak_warns_once_then_logs_per_doubling_or_change() {
        let mut log = RetryLog::default();
        let levels: Vec<Loudness> = (0..9).map(|_| log.failure("tcp")).collect();
        assert_eq!(
            levels,
            [Warn, Info, Debug, Info, Debug, Debug, Debug, Info, Debug]
        );
        // A new kind of failure is worth a line, but never another warning.
        assert_eq!(log.failure("tls"), Info);
        assert_eq!(log.failure("tls"), Debug);
        assert_eq!(log.reset(), 11);
        assert_eq!(log.failure("tls"), Warn);
    }

    #[test]
    fn a_streak_after_an_announced_restart_starts_at_info() {
        let mut log = RetryLog {
            planned: true,
            ..RetryLog::default()
        };
        assert_eq!(log.failure("tcp"), Info);
        assert_eq!(log.failure("tcp"), Info);
        assert_eq!(log.failure("tcp"), Debug);
        log.reset();
        assert_eq!(log.failure("tcp"), Warn, "reset forgets the restart");
    }

    #[test]
    fn failures_climb_the_backoff_and_count_attempts() {
        let mut policy = policy();
        for n in 1..=6 {
            let retry = policy.connect_failed("tcp");
            assert_eq!(retry.attempt, n);
            assert!(
                (MIN..=ceiling(n)).contains(&retry.delay),
                "attempt {n}: {:?}",
                retry.delay
            );
        }
    }

    #[test]
    fn starting_over_returns_to_the_first_step_and_warns_again() {
        let mut policy = policy();
        for _ in 0..5 {
            policy.connect_failed("tcp");
        }
        policy.start_over();
        let retry = policy.connect_failed("tcp");
        assert_eq!((retry.attempt, retry.loudness), (1, Warn));
        assert!(retry.delay <= ceiling(1));
    }

    #[test]
    fn a_new_config_restarts_the_backoff_an_equal_one_does_not() {
        let mut policy = policy();
        for _ in 0..4 {
            policy.connect_failed("tcp");
        }
        policy.reconfigure(config(30));
        assert_eq!(policy.backoff.attempt(), 4, "same settings: same step");
        policy.reconfigure(config(60));
        assert_eq!(policy.backoff.attempt(), 0);
        assert_eq!(policy.config.reset_after.0, Duration::from_secs(60));
    }

    #[test]
    fn a_short_session_is_one_more_failure_a_long_one_starts_over() {
        let mut policy = policy();
        policy.connect_failed("tcp");
        let connected = policy.connected();
        assert_eq!(connected.failed_attempts, 1);
        assert!(!connected.is_reconnect);
        let short = policy.session_ended("session_peer_closed", None, Duration::from_secs(1));
        assert!(matches!(
            short,
            AfterSession::Failed(Retry { attempt: 2, .. })
        ));

        assert!(policy.connected().is_reconnect);
        let long = policy.session_ended("session_peer_closed", None, Duration::from_secs(30));
        let AfterSession::LivedLong { delay, loudness } = long else {
            panic!("{long:?}");
        };
        assert_eq!(loudness, Warn, "an unannounced end is a warning");
        assert!(delay <= ceiling(1));
        assert_eq!(policy.connected().failed_attempts, 0);
        let announced = policy.session_ended(
            "session_peer_closed",
            Some(GoAwayCode::Shutdown),
            Duration::from_secs(31),
        );
        assert!(matches!(
            announced,
            AfterSession::LivedLong { loudness: Info, .. }
        ));
    }

    #[test]
    fn a_restarting_replica_is_not_a_failure_and_its_streak_starts_at_info() {
        let mut policy = policy();
        for _ in 0..3 {
            policy.connect_failed("tcp");
        }
        policy.connected();
        let after = policy.session_ended(
            "session_peer_closed",
            Some(GoAwayCode::Restart),
            Duration::from_secs(1),
        );
        let AfterSession::ReplicaRestarting { delay } = after else {
            panic!("{after:?}");
        };
        assert!(delay <= ceiling(1));
        let retry = policy.connect_failed("tcp");
        assert_eq!((retry.attempt, retry.loudness), (1, Info));
    }

    #[test]
    fn a_flapping_server_is_logged_once_per_backoff_step() {
        let mut policy = policy();
        let mut levels = Vec::new();
        for _ in 0..5 {
            levels.push(policy.connected().loudness);
            policy.session_ended("session_transport", None, Duration::ZERO);
        }
        // Streaks 0 (a recovery) then 1, 2, 3, 4 of session failures.
        assert_eq!(levels, [Info, Info, Info, Debug, Info]);
    }
}
