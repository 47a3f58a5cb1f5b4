//! When to try again after a failed check-in, and when to say so in the log.
//!
//! Two kinds of failure behave differently:
//! * network errors and server trouble (5xx): jittered exponential backoff, so a fleet that lost
//!   its server does not come back as one thundering herd;
//! * refusals (401/403/404/400): the server is fine but does not want this agent as it is. An
//!   admin may fix that at any time (reset the association, fix `AGENT_SECRET`), so the agent
//!   keeps asking at a calm pace and logs once per change, not once per attempt.

use std::time::{Duration, Instant};

use rand::Rng;

use crate::client::{CheckinError, RetryClass};

/// First backoff step.
pub const BACKOFF_BASE: Duration = Duration::from_secs(1);
/// Backoff never waits less than this at its cap (the cap is `max(interval, this)`).
pub const BACKOFF_MIN_CAP: Duration = Duration::from_secs(60);
/// Refusals are retried no faster than this.
pub const REFUSAL_MIN_DELAY: Duration = Duration::from_secs(30);
/// A server's `retry-after` is honoured up to this much.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(5 * 60);
/// An unchanged failure is logged again after this long.
pub const LOG_REPEAT: Duration = Duration::from_secs(10 * 60);

/// Exponential backoff with full jitter: the n-th delay is uniform in `[0, min(cap, base*2^n)]`.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    attempt: u32,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(BACKOFF_BASE)
    }
}

impl Backoff {
    pub fn new(base: Duration) -> Self {
        Self { base, attempt: 0 }
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// The upper bound of the next delay, before jitter.
    pub fn ceiling(&self, cap: Duration) -> Duration {
        // 2^20 s is far beyond any cap; stop doubling there so the shift cannot overflow.
        let factor = 1u32 << self.attempt.min(20);
        self.base.saturating_mul(factor).min(cap)
    }

    pub fn next_delay<R: Rng + ?Sized>(&mut self, cap: Duration, rng: &mut R) -> Duration {
        let ceiling = self.ceiling(cap);
        self.attempt = self.attempt.saturating_add(1);
        let ceiling_ms = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(rng.gen_range(0..=ceiling_ms))
    }
}

/// The backoff cap for a check-in interval.
pub fn backoff_cap(interval: Duration) -> Duration {
    interval.max(BACKOFF_MIN_CAP)
}

/// How long to wait after `err` before the next check-in.
pub fn retry_delay<R: Rng + ?Sized>(
    err: &CheckinError,
    interval: Duration,
    backoff: &mut Backoff,
    rng: &mut R,
) -> Duration {
    let cap = backoff_cap(interval);
    match err.retry_class() {
        RetryClass::Refused => {
            backoff.reset();
            interval.max(REFUSAL_MIN_DELAY)
        }
        RetryClass::Backoff => backoff.next_delay(cap, rng),
        RetryClass::Busy(retry_after) => {
            let jittered = backoff.next_delay(cap, rng);
            retry_after.map_or(jittered, |ra| ra.min(MAX_RETRY_AFTER).max(jittered))
        }
    }
}

/// How long to wait after `err` on a check-in that was held (`held`): [`retry_delay`], except
/// when the held check-in's connection broke. Then the server went away (a restart, a replica
/// killed, a load balancer reset) under the whole fleet at once, and a retry within the first
/// second would bring the whole fleet back within that second: thousands of TLS handshakes
/// together, more than a server takes at once. The agent comes back at a random point of its
/// interval instead (its next check-in was due within it anyway, so it loses nothing, and it
/// stays `up`: the grace is two intervals and 20 s), which spreads the fleet's reconnections
/// over an interval. Later failures back off as usual.
pub fn after_failure<R: Rng + ?Sized>(
    err: &CheckinError,
    held: bool,
    interval: Duration,
    backoff: &mut Backoff,
    rng: &mut R,
) -> Duration {
    let delay = retry_delay(err, interval, backoff, rng);
    if held && err.breaks_connection() {
        let interval_ms = u64::try_from(interval.as_millis()).unwrap_or(u64::MAX);
        return Duration::from_millis(rng.gen_range(0..=interval_ms));
    }
    delay
}

/// What to log about the latest check-in, decided by [`LogThrottle`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogDecision {
    /// Say nothing.
    Quiet,
    /// A new kind of failure (or the first one).
    Changed,
    /// The same failure is still going on; `attempts` failed since the last line.
    StillFailing { attempts: u64 },
    /// Success after `failures` failed attempts.
    Recovered { failures: u64 },
}

/// Collapses repeated failures into one log line per state change (plus a reminder every
/// [`LOG_REPEAT`]), so an agent refused for a week does not fill its disk.
#[derive(Debug, Clone, Default)]
pub struct LogThrottle {
    current: Option<String>,
    last_logged: Option<Instant>,
    since_logged: u64,
    failures: u64,
}

impl LogThrottle {
    pub fn failure(&mut self, key: &str, now: Instant) -> LogDecision {
        self.failures += 1;
        if self.current.as_deref() != Some(key) {
            self.current = Some(key.to_owned());
            self.last_logged = Some(now);
            self.since_logged = 0;
            return LogDecision::Changed;
        }
        self.since_logged += 1;
        match self.last_logged {
            Some(at) if now.saturating_duration_since(at) < LOG_REPEAT => LogDecision::Quiet,
            _ => {
                self.last_logged = Some(now);
                let attempts = std::mem::take(&mut self.since_logged);
                LogDecision::StillFailing { attempts }
            }
        }
    }

    pub fn success(&mut self) -> LogDecision {
        let failures = std::mem::take(&mut self.failures);
        self.current = None;
        self.last_logged = None;
        self.since_logged = 0;
        if failures == 0 {
            LogDecision::Quiet
        } else {
            LogDecision::Recovered { failures }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::RefusalCode;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn rng() -> StdRng {
        StdRng::seed_from_u64(7)
    }

    #[test]
    fn backoff_ceiling_doubles_up_to_cap() {
        let mut b = Backoff::default();
        let cap = Duration::from_secs(60);
        let mut r = rng();
        let mut ceilings = Vec::new();
        for _ in 0..10 {
            ceilings.push(b.ceiling(cap).as_secs());
            b.next_delay(cap, &mut r);
        }
        assert_eq!(ceilings, [1, 2, 4, 8, 16, 32, 60, 60, 60, 60]);
        b.reset();
        assert_eq!(b.ceiling(cap), Duration::from_secs(1));
    }

    #[test]
    fn backoff_delays_stay_within_bounds_and_jitter() {
        let cap = Duration::from_secs(60);
        let mut r = rng();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            let mut b = Backoff::default();
            for n in 0..40u32 {
                let ceiling = b.ceiling(cap);
                let d = b.next_delay(cap, &mut r);
                assert!(d <= ceiling && d <= cap, "attempt {n}: {d:?} > {ceiling:?}");
                seen.insert(d);
            }
        }
        // Full jitter: delays spread out rather than repeating the same values.
        assert!(seen.len() > 1000, "only {} distinct delays", seen.len());
    }

    #[test]
    fn backoff_survives_huge_attempt_counts() {
        let mut b = Backoff::default();
        let mut r = rng();
        for _ in 0..100 {
            b.next_delay(Duration::from_secs(60), &mut r);
        }
        assert!(b.next_delay(Duration::MAX, &mut r) <= Duration::from_secs(1 << 20));
    }

    #[test]
    fn cap_is_at_least_a_minute() {
        assert_eq!(backoff_cap(Duration::from_secs(5)), Duration::from_secs(60));
        assert_eq!(
            backoff_cap(Duration::from_secs(300)),
            Duration::from_secs(300)
        );
    }

    fn refused(code: RefusalCode) -> CheckinError {
        CheckinError::Refused {
            status: 403,
            code,
            message: "x".into(),
            server_time_ms: None,
        }
    }

    #[test]
    fn refusals_wait_at_least_thirty_seconds_and_reset_backoff() {
        let mut b = Backoff::default();
        let mut r = rng();
        let net = CheckinError::Timeout(Duration::from_secs(1));
        for _ in 0..5 {
            retry_delay(&net, Duration::from_secs(5), &mut b, &mut r);
        }
        let err = refused(RefusalCode::EdgeIdMismatch);
        assert_eq!(
            retry_delay(&err, Duration::from_secs(5), &mut b, &mut r),
            Duration::from_secs(30)
        );
        assert_eq!(
            retry_delay(&err, Duration::from_secs(120), &mut b, &mut r),
            Duration::from_secs(120)
        );
        assert_eq!(b.ceiling(Duration::from_secs(60)), Duration::from_secs(1));
    }

    #[test]
    fn a_broken_held_check_in_comes_back_somewhere_in_its_interval() {
        let interval = Duration::from_secs(5);
        let broken = CheckinError::Timeout(Duration::from_secs(1));
        let mut r = rng();
        let delays: Vec<Duration> = (0..2000)
            .map(|_| after_failure(&broken, true, interval, &mut Backoff::default(), &mut r))
            .collect();
        assert!(delays.iter().all(|d| *d <= interval));
        // Spread over the whole interval, not the first second of backoff.
        let late = delays
            .iter()
            .filter(|d| **d > Duration::from_secs(4))
            .count();
        assert!((300..500).contains(&late), "{late} of 2000 after 4 s");
        // A plain check-in, or a refusal, follows the usual rules.
        let mut b = Backoff::default();
        assert!(after_failure(&broken, false, interval, &mut b, &mut r) <= Duration::from_secs(1));
        let err = refused(RefusalCode::EdgeIdMismatch);
        assert_eq!(
            after_failure(&err, true, interval, &mut Backoff::default(), &mut r),
            Duration::from_secs(30)
        );
        // The backoff still counts the failure: the next one backs off further.
        let mut b = Backoff::default();
        after_failure(&broken, true, interval, &mut b, &mut r);
        assert_eq!(b.ceiling(Duration::from_secs(60)), Duration::from_secs(2));
    }

    #[test]
    fn network_errors_back_off() {
        let mut b = Backoff::default();
        let mut r = rng();
        let err = CheckinError::Server {
            status: 500,
            message: "boom".into(),
        };
        for _ in 0..50 {
            let d = retry_delay(&err, Duration::from_secs(5), &mut b, &mut r);
            assert!(d <= Duration::from_secs(60));
        }
    }

    #[test]
    fn busy_honours_retry_after_within_reason() {
        let mut r = rng();
        let busy = |s| CheckinError::Busy {
            retry_after: Some(Duration::from_secs(s)),
        };
        let d = retry_delay(
            &busy(7),
            Duration::from_secs(5),
            &mut Backoff::default(),
            &mut r,
        );
        assert!(
            d >= Duration::from_secs(7) && d <= Duration::from_secs(60),
            "{d:?}"
        );
        let d = retry_delay(
            &busy(86_400),
            Duration::from_secs(5),
            &mut Backoff::default(),
            &mut r,
        );
        assert_eq!(d, MAX_RETRY_AFTER);
        let none = CheckinError::Busy { retry_after: None };
        let d = retry_delay(
            &none,
            Duration::from_secs(5),
            &mut Backoff::default(),
            &mut r,
        );
        assert!(d <= BACKOFF_BASE);
    }

    #[test]
    fn log_throttle_one_line_per_change() {
        let mut t = LogThrottle::default();
        let t0 = Instant::now();
        assert_eq!(t.success(), LogDecision::Quiet);
        assert_eq!(
            t.failure("refused:edge_id_mismatch", t0),
            LogDecision::Changed
        );
        for i in 1..20 {
            let at = t0 + Duration::from_secs(30 * i);
            assert_eq!(
                t.failure("refused:edge_id_mismatch", at),
                LogDecision::Quiet
            );
        }
        assert_eq!(
            t.failure("refused:edge_id_mismatch", t0 + LOG_REPEAT),
            LogDecision::StillFailing { attempts: 20 }
        );
        assert_eq!(
            t.failure("refused:edge_id_mismatch", t0 + LOG_REPEAT),
            LogDecision::Quiet
        );
        assert_eq!(t.failure("connect", t0 + LOG_REPEAT), LogDecision::Changed);
        assert_eq!(t.success(), LogDecision::Recovered { failures: 23 });
        assert_eq!(t.success(), LogDecision::Quiet);
        assert_eq!(t.failure("connect", t0), LogDecision::Changed);
    }
}
