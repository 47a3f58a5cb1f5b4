//! The reverse tunnel: opened on the control plane's request, carries the operator's Docker API
//! connections to the local engine, closes itself when idle and comes back by itself when it
//! drops while wanted.
//!
//! * `handshake` ([`handshake()`]): TCP (3 s) and TLS pinned to the join token's fingerprint,
//!   then the one-time credentials in a [`Hello::Agent`](proto::tunnel::Hello::Agent) and the
//!   gateway's [`HelloAnswer`](proto::tunnel::HelloAnswer), all within
//!   [`HANDSHAKE_TIMEOUT`](proto::tunnel::HANDSHAKE_TIMEOUT).
//! * `serve`: yamux (the agent is the server): the agent opens the control stream and answers
//!   pings on it; every stream the gateway opens is connected to `DOCKER_HOST` and answered
//!   with a [`StreamOpen`](proto::tunnel::StreamOpen) frame, then piped both ways (half-close
//!   included). No stream for `EDGE_INACTIVITY_TIMEOUT` ([`Inactivity`]): a snapshot goes
//!   home, then the tunnel closes with [`CloseReason::Inactive`].
//! * `supervise` ([`supervise()`]): takes credentials from the main loop, opens tunnels, and
//!   when one is lost (not closed on purpose) asks for fresh credentials on the tunnel request
//!   route with jittered backoff ([`Reconnect`]).
//!
//! This module holds what they share: the settings, the constants, the errors and why a
//! tunnel ended.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use proto::seal::SealKey;
use proto::tunnel::{CloseReason, HelloRefusal};
use uuid::Uuid;

use crate::docker::DockerHost;

mod handshake;
mod serve;
mod supervise;

pub use handshake::{handshake, Established};
pub use serve::Inactivity;
pub use supervise::{supervise, CredentialSlot, Reconnect};

/// TCP connect to one gateway.
pub const GATEWAY_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Connecting a stream to the engine.
pub const ENGINE_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// First reconnect step after repeated losses or failures; doubles up to [`RECONNECT_CAP`].
pub const RECONNECT_BASE: Duration = Duration::from_millis(200);
pub const RECONNECT_CAP: Duration = Duration::from_secs(10);
/// A tunnel that stayed up this long was stable: the next loss reconnects at once again.
pub const STABLE_AFTER: Duration = Duration::from_secs(30);
/// A lost tunnel is asked for again for at least this long (or the inactivity timeout, if
/// longer: by then nobody is waiting for it), then the agent waits for the control plane.
pub const RECOVERY_MIN_WINDOW: Duration = Duration::from_secs(60);
/// How long closing (the `Closing` frame, the session's GoAway) may take.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// What a tunnel needs to know, fixed for the agent's life.
#[derive(Debug, Clone)]
pub struct TunnelSettings {
    pub endpoint_id: u64,
    pub edge_id: Uuid,
    /// Opens the sealed credentials (join secret + Edge ID).
    pub seal: SealKey,
    /// The join token's tunnel address: used when credentials name no gateway.
    pub default_gateway: String,
    /// Pinned to the join token's fingerprint ([`crate::tls::tunnel_config`]).
    pub tls: Arc<rustls::ClientConfig>,
    pub docker: DockerHost,
    pub inactivity_timeout: Duration,
    /// Local address to bind before connecting to a gateway (load tests spread agents over
    /// 127.0.0.0/8); `None`: the system's choice.
    pub local_addr: Option<IpAddr>,
}

/// Why a tunnel could not be opened through one gateway. Each names the gateway and says
/// whether another gateway could help ([`TunnelError::try_next`]).
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("gateway address {addr:?} is not host:port")]
    BadAddress { addr: String },
    #[error("cannot connect to gateway {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("gateway {addr} did not accept the connection within {timeout:?}")]
    ConnectTimeout { addr: String, timeout: Duration },
    #[error("gateway {addr} presented a certificate whose fingerprint does not match EDGE_KEY")]
    FingerprintMismatch { addr: String },
    #[error("tls handshake with gateway {addr} failed: {source}")]
    Tls {
        addr: String,
        source: std::io::Error,
    },
    #[error("tunnel handshake with gateway {addr} failed: {detail}")]
    Handshake { addr: String, detail: String },
    #[error("gateway {addr} did not complete the tunnel handshake within {timeout:?}")]
    HandshakeTimeout { addr: String, timeout: Duration },
    #[error("gateway refused the tunnel credentials ({code:?}): {message}")]
    Refused {
        addr: String,
        code: HelloRefusal,
        message: String,
    },
}

impl TunnelError {
    /// The gateway this is about.
    pub fn gateway(&self) -> &str {
        match self {
            Self::BadAddress { addr }
            | Self::Connect { addr, .. }
            | Self::ConnectTimeout { addr, .. }
            | Self::FingerprintMismatch { addr }
            | Self::Tls { addr, .. }
            | Self::Handshake { addr, .. }
            | Self::HandshakeTimeout { addr, .. }
            | Self::Refused { addr, .. } => addr,
        }
    }

    /// Whether the same credentials may work on another gateway: not once a gateway judged
    /// them (they are unknown, used, expired, or someone else's everywhere).
    pub fn try_next(&self) -> bool {
        !matches!(
            self,
            Self::Refused {
                code: HelloRefusal::BadCredentials | HelloRefusal::Mismatch,
                ..
            }
        )
    }

    /// A fixed label for log throttling.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::BadAddress { .. } => "bad_address",
            Self::Connect { .. } => "connect",
            Self::ConnectTimeout { .. } => "connect_timeout",
            Self::FingerprintMismatch { .. } => "fingerprint_mismatch",
            Self::Tls { .. } => "tls",
            Self::Handshake { .. } => "handshake",
            Self::HandshakeTimeout { .. } => "handshake_timeout",
            Self::Refused { .. } => "refused",
        }
    }
}

/// Why an open tunnel ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TunnelEnd {
    /// Closed on purpose after `EDGE_INACTIVITY_TIMEOUT` without streams.
    Inactive,
    /// Closed because the agent shuts down.
    Shutdown,
    /// Ended otherwise: the agent asks for it again.
    Lost(LostReason),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LostReason {
    #[error("gateway silent for {0:?}")]
    Silent(Duration),
    #[error("control stream ended")]
    ControlEnded,
    #[error("gateway is closing ({0:?})")]
    GatewayClosing(CloseReason),
    #[error("session ended")]
    SessionEnded,
    #[error("could not open the control stream: {0}")]
    ControlOpen(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_say_whether_another_gateway_can_help() {
        let refused = |code| TunnelError::Refused {
            addr: "gw:1".into(),
            code,
            message: "m".into(),
        };
        assert!(!refused(HelloRefusal::BadCredentials).try_next());
        assert!(!refused(HelloRefusal::Mismatch).try_next());
        assert!(refused(HelloRefusal::Unavailable).try_next());
        assert_eq!(
            refused(HelloRefusal::BadCredentials).to_string(),
            "gateway refused the tunnel credentials (BadCredentials): m"
        );
        let mismatch = TunnelError::FingerprintMismatch {
            addr: "gw:1".into(),
        };
        assert!(mismatch.try_next());
        assert_eq!(
            mismatch.to_string(),
            "gateway gw:1 presented a certificate whose fingerprint does not match EDGE_KEY"
        );
    }
}
