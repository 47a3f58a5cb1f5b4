//! Messages between agents and servers, as plain serde types.
//!
//! Field order is part of the wire format (bincode is positional): append new fields only at
//! the end of a message and only together with a protocol version bump, see `docs/protocol.md`.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Path of the standard-mode check-in route on the control plane.
pub const CHECKIN_PATH: &str = "/edge/checkin";

/// Sent by a standard-mode agent at every check-in, inside a signed frame (see [`crate::proof`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckinRequest {
    pub endpoint_id: u64,
    pub edge_id: Uuid,
    /// The agent's clock, in milliseconds since the Unix epoch, corrected by the offset the
    /// server last reported. Strictly increasing for one agent process.
    pub timestamp_ms: u64,
    /// Sent with the first check-in of an agent process (and after errors), otherwise `None`.
    pub agent: Option<AgentInfo>,
}

/// Who the agent is. Only sent now and then, so it may be wordy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentInfo {
    pub version: String,
    pub platform: Platform,
    pub hostname: String,
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
}
