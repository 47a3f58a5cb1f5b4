//! The wall clock as every edgeplane process writes it: milliseconds since the Unix epoch.
//! Records, grants, heartbeats and leases all carry this form, so they share one reading.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (0 if the clock is set before 1970).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Microseconds since the Unix epoch (0 if the clock is set before 1970).
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_are_in_this_century_and_agree() {
        let ms = now_ms();
        let us = now_us();
        assert!(ms > 1_577_836_800_000, "{ms}");
        assert!(us / 1000 >= ms && us / 1000 - ms < 1000, "{us} vs {ms}");
    }
}
