//! The reverse tunnel's messages: the handshake an agent (or a control-plane replica) sends a
//! gateway after TLS, the status that opens every stream, and the control stream's pings.
//!
//! Every message here travels as a *tunnel frame*: a 2-byte big-endian length, then a codec
//! frame of that length ([`encode_frame`], [`frame_len`]). The multiplexer (yamux) only starts
//! after the handshake, so a peer that speaks garbage is refused before any stream exists.
//!
//! Sequence (see `docs/protocol.md`):
//! 1. Agent: TLS to a gateway, pinned to the fingerprint in its join token; sends
//!    [`Hello::Agent`] with its one-time credentials. Gateway: [`HelloAnswer`].
//! 2. Both run yamux over the TLS stream; the agent is the yamux server. The agent opens one
//!    stream, the control stream, and both sides exchange [`Control`] frames on it.
//! 3. Every other stream is opened by the serving side (gateway or embedded control plane)
//!    and is one Docker API connection: the agent connects to its engine and answers with a
//!    [`StreamOpen`] frame, then the stream is a raw byte pipe.
//! 4. A control-plane replica reaches a tunnel held by a separate gateway through a dial
//!    session: TLS to the gateway, [`Hello::Dial`], yamux (the replica is the client); each
//!    stream starts with a [`DialRequest`], and the gateway splices it onto a stream of the
//!    agent's tunnel, so the first frame the replica reads is the agent's [`StreamOpen`], or
//!    the gateway's own refusal.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::codec::{self, CodecError};

/// Check-in route an agent uses instead of [`crate::wire::CHECKIN_PATH`] when it asks for
/// tunnel credentials itself: its tunnel dropped while in use and it wants it back at once.
/// Same body as a check-in; same length as the check-in path, so it costs no byte.
pub const TUNNEL_REQUEST_PATH: &str = "/edge/t";

/// Decode limit for tunnel frames (handshake, stream status, control messages).
pub const MAX_TUNNEL_FRAME: usize = 4 * 1024;

/// A TLS handshake plus the hello must complete within this, or the gateway hangs up.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How often the gateway pings over the control stream.
pub const PING_INTERVAL: Duration = Duration::from_secs(3);

/// Silence on the control stream for this long means the peer is gone: both sides close.
pub const DEAD_AFTER: Duration = Duration::from_secs(10);

/// The first message on a connection to a gateway.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Hello {
    /// An agent presenting its one-time credentials.
    Agent {
        endpoint_id: u64,
        edge_id: Uuid,
        token: [u8; 32],
    },
    /// A control-plane replica opening a dial session; `secret` is the cluster secret kept in
    /// the shared store.
    Dial { secret: [u8; 32] },
}

impl std::fmt::Debug for Hello {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Agent {
                endpoint_id,
                edge_id,
                token: _,
            } => f
                .debug_struct("Agent")
                .field("endpoint_id", endpoint_id)
                .field("edge_id", edge_id)
                .field("token", &"<redacted>")
                .finish(),
            Self::Dial { secret: _ } => f
                .debug_struct("Dial")
                .field("secret", &"<redacted>")
                .finish(),
        }
    }
}

/// The gateway's answer to a [`Hello`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HelloAnswer {
    /// Tunnel (or dial session) established; yamux starts now. `epoch` is the tunnel's
    /// location epoch (0 for dial sessions).
    Accepted {
        gateway_id: String,
        epoch: u64,
    },
    Refused {
        code: HelloRefusal,
        message: String,
    },
}

/// Why a gateway refused a hello. Each has one meaning for the agent's retry logic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HelloRefusal {
    /// Unknown, already used or expired credentials: check in again for fresh ones.
    BadCredentials,
    /// The credentials belong to another environment or Edge ID.
    Mismatch,
    /// A dial session with a wrong cluster secret.
    NotAuthorized,
    /// The gateway is at its tunnel limit or its store is unavailable: try another / later.
    Unavailable,
}

/// What a control-plane replica sends first on every stream of a dial session.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DialRequest {
    pub endpoint_id: u64,
    /// The location epoch the replica read; a gateway holding another epoch refuses.
    pub epoch: u64,
}

/// The first frame read on a Docker stream: the agent reached its engine, or why not.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StreamOpen {
    Ok,
    Refused {
        code: StreamRefusal,
        message: String,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StreamRefusal {
    /// The agent could not connect to `DOCKER_HOST`.
    EngineUnreachable,
    /// The gateway holds no tunnel of this environment (or another epoch of it).
    NoTunnel,
    /// Too many streams open on this tunnel.
    TooManyStreams,
}

/// Frames on the control stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Control {
    Ping(u64),
    Pong(u64),
    /// The agent is about to close the tunnel on purpose (not a failure).
    Closing(CloseReason),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CloseReason {
    /// No stream for `EDGE_INACTIVITY_TIMEOUT`.
    Inactive,
    /// The agent is shutting down.
    Shutdown,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("tunnel frame of {len} bytes exceeds the limit of {limit} bytes")]
    TooLarge { len: usize, limit: usize },
    #[error("tunnel frame: {0}")]
    Codec(#[from] CodecError),
}

/// `[len: u16 BE][codec frame]`.
pub fn encode_frame<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let body = codec::encode(msg)?;
    let len = u16::try_from(body.len())
        .ok()
        .filter(|&l| usize::from(l) <= MAX_TUNNEL_FRAME)
        .ok_or(FrameError::TooLarge {
            len: body.len(),
            limit: MAX_TUNNEL_FRAME,
        })?;
    let mut out = Vec::with_capacity(2 + body.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// The body length announced by a frame's 2-byte prefix, refused above the limit before
/// anything is read or allocated.
pub fn frame_len(prefix: [u8; 2]) -> Result<usize, FrameError> {
    let len = usize::from(u16::from_be_bytes(prefix));
    if len > MAX_TUNNEL_FRAME {
        return Err(FrameError::TooLarge {
            len,
            limit: MAX_TUNNEL_FRAME,
        });
    }
    Ok(len)
}

/// Decodes a frame body (without its prefix).
pub fn decode_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    Ok(codec::decode(body, MAX_TUNNEL_FRAME)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip<T: Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug>(msg: T) {
        let frame = encode_frame(&msg).unwrap();
        let len = frame_len([frame[0], frame[1]]).unwrap();
        assert_eq!(len, frame.len() - 2);
        let back: T = decode_body(&frame[2..]).unwrap();
        assert_eq!(back, msg);
    }

    #[test]
    fn frames_roundtrip() {
        roundtrip(Hello::Agent {
            endpoint_id: 7,
            edge_id: Uuid::new_v4(),
            token: [9; 32],
        });
        roundtrip(Hello::Dial { secret: [1; 32] });
        roundtrip(HelloAnswer::Accepted {
            gateway_id: "gw-1".into(),
            epoch: 12,
        });
        roundtrip(StreamOpen::Refused {
            code: StreamRefusal::EngineUnreachable,
            message: "no such file".into(),
        });
        roundtrip(DialRequest {
            endpoint_id: 1,
            epoch: 2,
        });
        roundtrip(Control::Ping(u64::MAX));
    }

    #[test]
    fn oversized_prefix_is_refused_before_reading() {
        assert_eq!(
            frame_len([0xff, 0xff]),
            Err(FrameError::TooLarge {
                len: 65535,
                limit: MAX_TUNNEL_FRAME
            })
        );
        let huge = StreamOpen::Refused {
            code: StreamRefusal::NoTunnel,
            message: "x".repeat(MAX_TUNNEL_FRAME),
        };
        assert!(matches!(
            encode_frame(&huge),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn garbage_bodies_are_errors() {
        assert!(decode_body::<Hello>(&[]).is_err());
        assert!(decode_body::<Hello>(&[1, 9, 9, 9]).is_err());
        assert!(decode_body::<Control>(&[7, 0]).is_err());
    }

    #[test]
    fn debug_hides_secrets() {
        let h = Hello::Agent {
            endpoint_id: 1,
            edge_id: Uuid::nil(),
            token: [0xab; 32],
        };
        assert!(!format!("{h:?}").contains("171"));
        assert!(format!("{h:?}").contains("redacted"));
    }
}
