//! Check-in timestamps: the local clock corrected by what the server taught us, and strictly
//! increasing within one process (the server refuses a repeated or older timestamp as a replay).
//!
//! The agent talks to the control plane over more than one connection (the held check-in, and
//! short-lived ones for tunnel requests and snapshot uploads), so its clients share one
//! [`SharedClock`]: every request of the process gets its own, strictly greater timestamp, and
//! an offset learned by one client serves all.

use std::sync::Arc;

use parking_lot::{Mutex, MutexGuard};

/// Milliseconds since the Unix epoch on the local clock (0 if the clock is before 1970).
pub fn unix_now_ms() -> u64 {
    proto::clock::now_ms()
}

/// The corrected clock of one agent process. Pure: callers pass the local time in.
#[derive(Debug, Clone, Default)]
pub struct CheckinClock {
    /// Server time minus local time, in milliseconds.
    offset_ms: i64,
    /// The last timestamp handed out.
    last_ms: u64,
}

impl CheckinClock {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn offset_ms(&self) -> i64 {
        self.offset_ms
    }

    /// The timestamp for the next request: corrected local time, but always at least one
    /// millisecond after the previous one, even if the offset moved backwards.
    pub fn next_timestamp(&mut self, local_now_ms: u64) -> u64 {
        let corrected = local_now_ms.saturating_add_signed(self.offset_ms);
        let ts = corrected.max(self.last_ms.saturating_add(1));
        self.last_ms = ts;
        ts
    }

    /// Learns the offset from a server time read at (about) `local_now_ms`.
    pub fn learn(&mut self, server_ms: u64, local_now_ms: u64) {
        let offset = i128::from(server_ms) - i128::from(local_now_ms);
        self.offset_ms = offset.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64;
    }

    /// The corrected time, without handing out a timestamp (e.g. when a snapshot was taken).
    pub fn corrected(&self, local_now_ms: u64) -> u64 {
        local_now_ms.saturating_add_signed(self.offset_ms)
    }
}

/// One [`CheckinClock`] shared by all the clients of an agent process; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct SharedClock(Arc<Mutex<CheckinClock>>);

impl SharedClock {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, CheckinClock> {
        self.0.lock()
    }

    /// The next request timestamp on the local clock, see [`CheckinClock::next_timestamp`].
    pub fn next_timestamp(&self) -> u64 {
        self.lock().next_timestamp(unix_now_ms())
    }

    /// Learns the offset from a server time read just now.
    pub fn learn(&self, server_ms: u64) {
        self.lock().learn(server_ms, unix_now_ms());
    }

    pub fn offset_ms(&self) -> i64 {
        self.lock().offset_ms()
    }

    /// The corrected time now.
    pub fn now_ms(&self) -> u64 {
        self.lock().corrected(unix_now_ms())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_local_time_without_offset() {
        let mut c = CheckinClock::new();
        assert_eq!(c.next_timestamp(1_000), 1_000);
        assert_eq!(c.next_timestamp(6_000), 6_000);
    }

    #[test]
    fn strictly_increasing_even_if_local_clock_stalls_or_jumps_back() {
        let mut c = CheckinClock::new();
        assert_eq!(c.next_timestamp(1_000), 1_000);
        assert_eq!(c.next_timestamp(1_000), 1_001);
        assert_eq!(c.next_timestamp(500), 1_002);
        assert_eq!(c.next_timestamp(2_000), 2_000);
    }

    #[test]
    fn applies_learned_offset_both_ways() {
        let mut c = CheckinClock::new();
        c.learn(10_000, 4_000);
        assert_eq!(c.offset_ms(), 6_000);
        assert_eq!(c.next_timestamp(4_100), 10_100);
        // The server is behind us: the offset is negative, but the sequence never goes back.
        c.learn(3_000, 5_000);
        assert_eq!(c.offset_ms(), -2_000);
        assert_eq!(c.next_timestamp(5_000), 10_101);
        assert_eq!(c.next_timestamp(20_000), 18_000);
    }

    #[test]
    fn extreme_values_saturate() {
        let mut c = CheckinClock::new();
        c.learn(u64::MAX, 0);
        assert_eq!(c.next_timestamp(u64::MAX), u64::MAX);
        let mut c = CheckinClock::new();
        c.learn(0, u64::MAX);
        assert_eq!(c.next_timestamp(5), 1);
    }

    #[test]
    fn shared_clock_hands_out_strictly_increasing_timestamps_to_all_holders() {
        let a = SharedClock::new();
        let b = a.clone();
        let mut last = 0;
        for i in 0..1000 {
            let ts = if i % 2 == 0 {
                a.next_timestamp()
            } else {
                b.next_timestamp()
            };
            assert!(ts > last, "{ts} after {last}");
            last = ts;
        }
        // An offset learned through one holder applies to the other.
        a.learn(unix_now_ms() + 3_600_000);
        assert!((b.offset_ms() - 3_600_000).abs() < 1_000);
        assert!(b.now_ms() > unix_now_ms() + 3_500_000);
    }

    #[test]
    fn local_clock_is_sane() {
        // After 2020-01-01: catches a unit mistake (seconds instead of milliseconds).
        assert!(unix_now_ms() > 1_577_836_800_000);
    }
}
