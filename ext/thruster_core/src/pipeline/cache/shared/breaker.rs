//! The circuit breaker in front of Redis: a pure state machine (time is an
//! argument), so its rules are tested without a server or a clock.
//!
//! ```text
//!            N consecutive failures            cool-down over: the connector probes
//!   Closed ─────────────────────────► Open ───────────────────────────────► (probe)
//!     ▲   (one warning)                ▲                                       │
//!     │                                └──── probe failed: cool-down × 2 ──────┤
//!     └──────────────── probe succeeded (one info line) ──────────────────────┘
//! ```
//!
//! While open, no request touches Redis: a lookup is an immediate miss and
//! a write is skipped. Only the background connector probes, one attempt per
//! cool-down, so a down or hung server costs requests nothing and costs the
//! proxy one connection attempt per cool-down.
//!
//! Flapping (a server that answers the probe's `PING` but times out on real
//! traffic) must not reset the cool-down each time: a breaker that opens
//! again within `max_cooldown` of closing starts from twice its last
//! cool-down instead of the base.

use std::time::{Duration, Instant};

/// When to stop calling and when to try again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerSettings {
    /// Consecutive failures (timeouts, connection errors, failed connection
    /// attempts) that open the circuit.
    pub failures: u32,
    /// First cool-down after opening.
    pub cooldown: Duration,
    /// Cap of the doubling cool-down.
    pub max_cooldown: Duration,
    /// Pause between connection attempts while the circuit is still closed
    /// (the first few failures after a disconnect).
    pub retry_delay: Duration,
}

impl Default for BreakerSettings {
    /// Five failures in a row: one or two slow answers under load must not
    /// turn the tier off, but a dead server is noticed within half a second
    /// of connection attempts or five timed-out lookups. One second first,
    /// doubling to 30 s: a restart (seconds) is picked up quickly, an outage
    /// costs two connection attempts a minute.
    fn default() -> BreakerSettings {
        BreakerSettings {
            failures: 5,
            cooldown: Duration::from_secs(1),
            max_cooldown: Duration::from_secs(30),
            retry_delay: Duration::from_millis(100),
        }
    }
}

/// Who reports a failure: a request's call (ignored while open: it was
/// admitted before the circuit opened) or the connector's attempt (while
/// open, that is the probe).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Call,
    Connector,
}

/// What a report changed, for the one log line per transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    None,
    /// Closed → open: log one warning.
    Opened {
        cooldown: Duration,
    },
    /// A probe failed: stays open, longer. Not logged.
    Extended {
        cooldown: Duration,
    },
    /// Open → closed: log one info line.
    Closed {
        was_open_for: Duration,
    },
}

#[derive(Debug)]
pub struct Breaker {
    settings: BreakerSettings,
    failures: u32,
    open: Option<Open>,
    /// Last cool-down used, and when the circuit last closed: a re-open
    /// soon after starts from twice this.
    last_cooldown: Duration,
    closed_at: Option<Instant>,
}

#[derive(Debug, Clone, Copy)]
struct Open {
    since: Instant,
    until: Instant,
    cooldown: Duration,
}

impl Breaker {
    pub fn new(settings: BreakerSettings) -> Breaker {
        Breaker {
            settings,
            failures: 0,
            open: None,
            last_cooldown: Duration::ZERO,
            closed_at: None,
        }
    }

    pub fn settings(&self) -> BreakerSettings {
        self.settings
    }

    /// May a request call Redis now?
    pub fn is_closed(&self) -> bool {
        self.open.is_none()
    }

    /// How long the connector waits before its next attempt: until the
    /// cool-down ends when open, the retry delay after a failure when
    /// closed, nothing otherwise.
    pub fn wait_before_attempt(&self, now: Instant) -> Duration {
        match self.open {
            Some(open) => open.until.saturating_duration_since(now),
            None if self.failures > 0 => self.settings.retry_delay,
            None => Duration::ZERO,
        }
    }

    pub fn success(&mut self, now: Instant, source: Source) -> Transition {
        if self.open.is_some() && source == Source::Call {
            // A call admitted before the circuit opened, answered late (a
            // server that was stopped and resumed): only the connector's
            // probe closes the circuit, on a fresh connection.
            return Transition::None;
        }
        self.failures = 0;
        match self.open.take() {
            Some(open) => {
                self.closed_at = Some(now);
                Transition::Closed {
                    was_open_for: now.saturating_duration_since(open.since),
                }
            }
            None => Transition::None,
        }
    }

    pub fn failure(&mut self, now: Instant, source: Source) -> Transition {
        match (self.open, source) {
            // A call admitted before the circuit opened, finishing late.
            (Some(_), Source::Call) => Transition::None,
            (Some(open), Source::Connector) => {
                let cooldown = self.double(open.cooldown);
                self.last_cooldown = cooldown;
                self.open = Some(Open {
                    since: open.since,
                    until: now + cooldown,
                    cooldown,
                });
                Transition::Extended { cooldown }
            }
            (None, _) => {
                self.failures = self.failures.saturating_add(1);
                if self.failures < self.settings.failures.max(1) {
                    return Transition::None;
                }
                let flapping = self.closed_at.is_some_and(|at| {
                    now.saturating_duration_since(at) < self.settings.max_cooldown
                });
                let cooldown = if flapping && !self.last_cooldown.is_zero() {
                    self.double(self.last_cooldown)
                } else {
                    self.settings.cooldown.min(self.settings.max_cooldown)
                };
                self.last_cooldown = cooldown;
                self.open = Some(Open {
                    since: now,
                    until: now + cooldown,
                    cooldown,
                });
                Transition::Opened { cooldown }
            }
        }
    }

    fn double(&self, cooldown: Duration) -> Duration {
        cooldown.saturating_mul(2).min(self.settings.max_cooldown)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> BreakerSettings {
        BreakerSettings {
            failures: 3,
            cooldown: Duration::from_secs(1),
            max_cooldown: Duration::from_secs(5),
            retry_delay: Duration::from_millis(100),
        }
    }

    #[test]
    fn opens_after_n_consecutive_failures_only() {
        let t0 = Instant::now();
        let mut b = Breaker::new(settings());
        assert_eq!(b.failure(t0, Source::Call), Transition::None);
        assert_eq!(b.failure(t0, Source::Connector), Transition::None);
        // A success in between resets the count.
        assert_eq!(b.success(t0, Source::Call), Transition::None);
        assert_eq!(b.failure(t0, Source::Call), Transition::None);
        assert_eq!(b.failure(t0, Source::Call), Transition::None);
        assert!(b.is_closed());
        assert_eq!(
            b.failure(t0, Source::Call),
            Transition::Opened {
                cooldown: Duration::from_secs(1)
            }
        );
        assert!(!b.is_closed());
        assert_eq!(b.wait_before_attempt(t0), Duration::from_secs(1));
    }

    #[test]
    fn late_calls_do_not_extend_probes_do_doubling_to_the_cap() {
        let t0 = Instant::now();
        let mut b = Breaker::new(settings());
        for _ in 0..3 {
            b.failure(t0, Source::Call);
        }
        // Calls that were in flight when it opened change nothing, failed
        // or answered late: only the connector's probe closes it.
        assert_eq!(b.failure(t0, Source::Call), Transition::None);
        assert_eq!(b.success(t0, Source::Call), Transition::None);
        assert!(!b.is_closed());
        let mut now = t0;
        let mut seen = Vec::new();
        for _ in 0..5 {
            now += b.wait_before_attempt(now);
            match b.failure(now, Source::Connector) {
                Transition::Extended { cooldown } => seen.push(cooldown.as_secs()),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(seen, [2, 4, 5, 5, 5]);
        match b.success(now, Source::Connector) {
            Transition::Closed { was_open_for } => {
                assert_eq!(was_open_for, now - t0)
            }
            other => panic!("{other:?}"),
        }
        assert!(b.is_closed());
        assert_eq!(b.wait_before_attempt(now), Duration::ZERO);
    }

    #[test]
    fn retry_delay_while_closed_after_a_failure() {
        let t0 = Instant::now();
        let mut b = Breaker::new(settings());
        assert_eq!(b.wait_before_attempt(t0), Duration::ZERO);
        b.failure(t0, Source::Connector);
        assert_eq!(b.wait_before_attempt(t0), Duration::from_millis(100));
    }

    #[test]
    fn reopening_soon_after_closing_keeps_doubling() {
        let t0 = Instant::now();
        let mut b = Breaker::new(settings());
        for _ in 0..3 {
            b.failure(t0, Source::Call);
        }
        let t1 = t0 + Duration::from_secs(1);
        assert!(matches!(
            b.success(t1, Source::Connector),
            Transition::Closed { .. }
        ));
        // Flapping: opens again a moment later, from 2 s not 1 s.
        for _ in 0..2 {
            b.failure(t1, Source::Call);
        }
        assert_eq!(
            b.failure(t1, Source::Call),
            Transition::Opened {
                cooldown: Duration::from_secs(2)
            }
        );
        // Long after a close, the cool-down starts from the base again.
        let t2 = t1 + Duration::from_secs(3);
        assert!(matches!(
            b.success(t2, Source::Connector),
            Transition::Closed { .. }
        ));
        let t3 = t2 + Duration::from_secs(60);
        for _ in 0..2 {
            b.failure(t3, Source::Call);
        }
        assert_eq!(
            b.failure(t3, Source::Call),
            Transition::Opened {
                cooldown: Duration::from_secs(1)
            }
        );
    }
}
