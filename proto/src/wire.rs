//! Messages between agents and servers, as plain serde types.
//!
//! Field order is part of the wire format (bincode is positional): append new fields only at
//! the end of a message and only together with a protocol version bump, see `docs/protocol.md`.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Path of the standard-mode check-in route on the control plane (short: it is sent with every
/// poll on metered links).
pub const CHECKIN_PATH: &str = "/edge/c";

/// The same check-in, but the server may hold an idle answer for up to the interval and
/// answers it the moment a tunnel is wanted (fast wake-up at the same number of bytes).
pub const HELD_CHECKIN_PATH: &str = "/edge/h";

/// Sent by a standard-mode agent at every check-in, inside a signed frame (see [`crate::proof`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckinRequest {
    pub endpoint_id: u64,
    /// Sent with the first check-in of a process and after any error (so binding and impostor
    /// detection see it); otherwise `None`, and the server verifies the MAC with the bound ID.
    pub edge_id: Option<Uuid>,
    /// The low 32 bits of the agent's clock in milliseconds since the Unix epoch, corrected by
    /// the offset the server last reported; strictly increasing for one agent process. The
    /// server unwraps it to the instant nearest its own clock ([`unwrap_timestamp`]): 5 bytes
    /// on the wire instead of 9, and unambiguous since the wrap period (49.7 days) dwarfs the
    /// freshness window.
    pub timestamp_lo: u32,
    /// The high 32 bits of that clock, sent with the Edge ID (first check-in of a process and
    /// after errors) so a clock that is far off is still recognised as skewed. The MAC always
    /// covers the full 64-bit timestamp, so a frame replayed one wrap (49.7 days) later fails.
    pub timestamp_hi: Option<u32>,
    /// The interval the agent runs at now; when it is current and nothing else changed, the
    /// server answers `204 No Content` instead of a body.
    pub interval_secs: u32,
    /// Sent with the first check-in of an agent process (and after errors), otherwise `None`.
    pub agent: Option<AgentInfo>,
}

/// The wire form of a millisecond timestamp (its low 32 bits).
pub fn timestamp_lo(ms: u64) -> u32 {
    ms as u32
}

/// The full timestamp of a request: exact when the high bits were sent, otherwise the instant
/// with these low bits nearest `now_ms`.
pub fn request_timestamp(lo: u32, hi: Option<u32>, now_ms: u64) -> u64 {
    match hi {
        Some(hi) => (u64::from(hi) << 32) | u64::from(lo),
        None => unwrap_timestamp(lo, now_ms),
    }
}

/// The full millisecond timestamp whose low 32 bits are `lo` and which is nearest `now_ms`.
pub fn unwrap_timestamp(lo: u32, now_ms: u64) -> u64 {
    const PERIOD: i128 = 1 << 32;
    let now = i128::from(now_ms);
    let mut t = (now & !(PERIOD - 1)) | i128::from(lo);
    if t - now > PERIOD / 2 {
        t -= PERIOD;
    } else if now - t > PERIOD / 2 {
        t += PERIOD;
    }
    t.clamp(0, i128::from(u64::MAX)) as u64
}

/// Longest `version` or `hostname` of an [`AgentInfo`], in bytes (a Linux host name has at
/// most 64): refused when decoded, since an async request may be much larger than a check-in.
pub const MAX_AGENT_TEXT: usize = 1024;

/// Who the agent is. Only sent now and then, so it may be wordy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentInfo {
    #[serde(deserialize_with = "agent_text")]
    pub version: String,
    pub platform: Platform,
    #[serde(deserialize_with = "agent_text")]
    pub hostname: String,
}

fn agent_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    use serde::de::DeserializeSeed;
    crate::codec::bound::Text {
        what: "agent info",
        max: MAX_AGENT_TEXT,
    }
    .deserialize(d)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Platform {
    Docker,
    Swarm,
    Kubernetes,
    Nomad,
    Podman,
}

/// "Do you need me?": the answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EdgeStatus {
    /// Nothing to do; come back after `interval_secs`.
    Idle,
    /// An operator wants this environment: open the tunnel.
    Required,
}

/// Answer to a check-in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckinAnswer {
    pub status: EdgeStatus,
    /// When to check in next, in seconds.
    pub interval_secs: u32,
    /// The server's clock, sent only when the agent's timestamp is off by more than a second,
    /// so the agent can correct its clock offset.
    pub server_time_ms: Option<u64>,
    /// One-time tunnel credentials sealed for this agent, when `status` is `Required`.
    pub tunnel: Option<SealedCredentials>,
    /// (Version 2.) The digest of the stacks this environment should run, while the agent
    /// has not acknowledged it (see [`crate::stacks`]); `None` otherwise.
    pub desired: Option<u64>,
}

/// Tunnel credentials encrypted with [`crate::seal`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedCredentials {
    pub nonce: [u8; 12],
    pub ciphertext: Vec<u8>,
}

/// What a sealed credential holds once opened by the agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunnelCredentials {
    /// Random one-time token, consumed by the gateway on use.
    pub token: [u8; 32],
    /// After this instant (ms since the Unix epoch, server clock) the token is dead.
    pub expires_ms: u64,
    /// Gateways to try, in order (`host:port`); empty: the tunnel address of the join token.
    pub gateways: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_unwrap_to_the_nearest_instant() {
        let now = 1_800_000_000_000u64;
        for delta in [
            0i64,
            1,
            -1,
            59_999,
            -60_000,
            3_600_000,
            -3_600_000,
            2_000_000_000,
            -2_000_000_000,
        ] {
            let t = (now as i64 + delta) as u64;
            assert_eq!(unwrap_timestamp(timestamp_lo(t), now), t, "delta {delta}");
        }
        // Across a wrap of the low bits.
        let now = (7u64 << 32) + 10;
        assert_eq!(unwrap_timestamp(timestamp_lo(now - 20), now), now - 20);
        assert_eq!(
            unwrap_timestamp(
                timestamp_lo(now + u64::from(u32::MAX)),
                now + u64::from(u32::MAX) - 5
            ),
            now + u64::from(u32::MAX)
        );
        assert_eq!(unwrap_timestamp(5, 0), 5);
    }
}
