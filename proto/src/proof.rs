//! Proof that an agent holds its environment's join secret, without sending the secret.
//!
//! The agent signs each request frame with HMAC-SHA256 (truncated to [`MAC_LEN`] bytes) under
//! a key derived with HKDF from the join secret, salted with `AGENT_SECRET` when one is set.
//! A signed frame is `[version][bincode payload][mac]`; the MAC covers the agent's Edge ID
//! (which a steady-state request does not carry: the server supplies the bound one), the
//! [`Route`] it is sent to (a frame signed for one route is refused on every other: a held
//! check-in replayed to the tunnel route issues no credentials), the version byte and the
//! payload exactly as received. Freshness (the timestamp inside the payload) and replay checks
//! are the server's job; [`check_freshness`] holds the shared rule.

use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use serde::de::DeserializeOwned;
use serde::Serialize;
use sha2::Sha256;
use subtle::ConstantTimeEq;
use uuid::Uuid;

use crate::codec::{self, CodecError, PROTOCOL_VERSION};
use crate::token::JoinSecret;

/// Bytes of MAC appended to a signed frame.
/// 96 bits, as in HMAC-SHA256-96 (IPsec): ample against online forgery, 4 bytes saved per poll.
pub const MAC_LEN: usize = 12;
/// A request whose timestamp differs from the server clock by more than this is refused
/// (and the answer tells the agent the server time so it can correct its offset).
pub const FRESHNESS_WINDOW_MS: u64 = 60_000;

const KEY_INFO: &[u8] = b"edgeplane/v1 request proof";
const MAC_DOMAIN: &[u8] = b"edgeplane/v1 signed frame\0";

/// The route a signed frame is sent to, covered by its MAC as one byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Route {
    /// [`crate::wire::CHECKIN_PATH`].
    Checkin = 1,
    /// [`crate::wire::HELD_CHECKIN_PATH`].
    Held = 2,
    /// [`crate::tunnel::TUNNEL_REQUEST_PATH`].
    Tunnel = 3,
    /// [`crate::snapshot::SNAPSHOT_PATH`].
    Snapshot = 4,
    /// [`crate::async_mode::ASYNC_PATH`].
    Async = 5,
    /// [`crate::stacks::DESIRED_PATH`].
    Desired = 6,
    /// [`crate::stacks::STACK_REPORT_PATH`].
    Report = 7,
}

impl Route {
    pub const ALL: [Route; 7] = [
        Route::Checkin,
        Route::Held,
        Route::Tunnel,
        Route::Snapshot,
        Route::Async,
        Route::Desired,
        Route::Report,
    ];

    /// The path of the route on the control plane.
    pub fn path(self) -> &'static str {
        match self {
            Route::Checkin => crate::wire::CHECKIN_PATH,
            Route::Held => crate::wire::HELD_CHECKIN_PATH,
            Route::Tunnel => crate::tunnel::TUNNEL_REQUEST_PATH,
            Route::Snapshot => crate::snapshot::SNAPSHOT_PATH,
            Route::Async => crate::async_mode::ASYNC_PATH,
            Route::Desired => crate::stacks::DESIRED_PATH,
            Route::Report => crate::stacks::STACK_REPORT_PATH,
        }
    }
}

/// The HMAC key of one environment (and `AGENT_SECRET`). Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct ProofKey([u8; 32]);

impl std::fmt::Debug for ProofKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProofKey(<redacted>)")
    }
}

impl ProofKey {
    pub fn derive(secret: &JoinSecret, agent_secret: Option<&str>) -> Self {
        let salt = agent_secret.map(str::as_bytes);
        let hk = Hkdf::<Sha256>::new(salt, secret.as_bytes());
        let mut key = [0u8; 32];
        // 32 bytes is far below HKDF-SHA256's output limit: expand cannot fail.
        hk.expand(KEY_INFO, &mut key)
            .unwrap_or_else(|_| unreachable!("32-byte HKDF output"));
        Self(key)
    }

    fn mac(&self, route: Route, edge_id: &Uuid, timestamp_ms: u64, signed: &[u8]) -> [u8; MAC_LEN] {
        // HMAC accepts keys of any length: new_from_slice cannot fail.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
        mac.update(MAC_DOMAIN);
        mac.update(&[route as u8]);
        mac.update(edge_id.as_bytes());
        mac.update(&timestamp_ms.to_be_bytes());
        mac.update(signed);
        let full = mac.finalize().into_bytes();
        let mut out = [0u8; MAC_LEN];
        out.copy_from_slice(&full[..MAC_LEN]);
        out
    }
}

/// Encodes and signs `msg` for `route` as the agent `edge_id` at `timestamp_ms` (the full
/// clock value, of which the message may carry only part): `[version][payload][mac]`.
pub fn sign<T: Serialize>(
    msg: &T,
    route: Route,
    key: &ProofKey,
    edge_id: &Uuid,
    timestamp_ms: u64,
) -> Result<Vec<u8>, CodecError> {
    let mut out = Vec::with_capacity(64);
    out.push(PROTOCOL_VERSION);
    codec::encode_into(msg, &mut out)?;
    let mac = key.mac(route, edge_id, timestamp_ms, &out);
    out.extend_from_slice(&mac);
    Ok(out)
}

/// A received signed frame whose payload decoded but whose MAC is not checked yet (the key
/// depends on the environment named inside the payload).
#[derive(Debug)]
pub struct Unverified<'a> {
    signed: &'a [u8],
    mac: [u8; MAC_LEN],
}

impl Unverified<'_> {
    /// Constant-time check of the MAC under `key` for `route`, the agent `edge_id` at
    /// `timestamp_ms`.
    pub fn verify(&self, route: Route, key: &ProofKey, edge_id: &Uuid, timestamp_ms: u64) -> bool {
        key.mac(route, edge_id, timestamp_ms, self.signed)
            .ct_eq(&self.mac)
            .into()
    }
}

/// Splits and decodes a signed frame of at most `limit` bytes. The caller must then
/// [`Unverified::verify`] it before trusting anything in it.
pub fn open<T: DeserializeOwned>(
    frame: &[u8],
    limit: usize,
) -> Result<(T, Unverified<'_>), CodecError> {
    if frame.len() > limit {
        return Err(CodecError::TooLarge {
            len: frame.len(),
            limit,
        });
    }
    if frame.len() <= MAC_LEN {
        return Err(if frame.is_empty() {
            CodecError::Empty
        } else {
            CodecError::Malformed(format!(
                "signed frame of {} bytes is shorter than its MAC",
                frame.len()
            ))
        });
    }
    let (signed, mac_bytes) = frame.split_at(frame.len() - MAC_LEN);
    let payload = codec::check_frame(signed, limit)?;
    let msg = codec::decode_payload(payload)?;
    let mut mac = [0u8; MAC_LEN];
    mac.copy_from_slice(mac_bytes);
    Ok((msg, Unverified { signed, mac }))
}

/// Verifies the MAC at the end of a signed `frame` received on `route` under `key` for the
/// agent `edge_id`, in constant time.
pub fn verify(
    frame: &[u8],
    route: Route,
    key: &ProofKey,
    edge_id: &Uuid,
    timestamp_ms: u64,
) -> bool {
    if frame.len() <= MAC_LEN {
        return false;
    }
    let (signed, mac) = frame.split_at(frame.len() - MAC_LEN);
    key.mac(route, edge_id, timestamp_ms, signed)
        .ct_eq(mac)
        .into()
}

/// A short fingerprint of a signed frame (the first MAC bytes) for replay detection.
pub fn replay_tag(frame: &[u8]) -> u64 {
    let start = frame.len().saturating_sub(MAC_LEN);
    let mut tag = [0u8; 8];
    for (dst, src) in tag.iter_mut().zip(&frame[start..]) {
        *dst = *src;
    }
    u64::from_le_bytes(tag)
}

/// How far a request timestamp is from the server clock, when it is too far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Skew {
    /// Request time minus server time, in milliseconds.
    pub offset_ms: i64,
}

/// The freshness rule: `|request - now| <= FRESHNESS_WINDOW_MS`.
pub fn check_freshness(request_ms: u64, now_ms: u64) -> Result<(), Skew> {
    let offset_ms = request_ms as i128 - now_ms as i128;
    if offset_ms.unsigned_abs() <= u128::from(FRESHNESS_WINDOW_MS) {
        Ok(())
    } else {
        Err(Skew {
            offset_ms: offset_ms.clamp(i64::MIN as i128, i64::MAX as i128) as i64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::CheckinRequest;
    use uuid::Uuid;

    const EDGE: Uuid = Uuid::from_u128(0x1234);

    fn req() -> CheckinRequest {
        CheckinRequest {
            endpoint_id: 3,
            edge_id: None,
            timestamp_lo: 1_000,
            timestamp_hi: None,
            interval_secs: 5,
            agent: None,
        }
    }

    #[test]
    fn sign_open_verify() {
        let secret = JoinSecret::generate();
        let key = ProofKey::derive(&secret, None);
        let frame = sign(&req(), Route::Checkin, &key, &EDGE, 1_000).unwrap();
        let (decoded, unverified) = open::<CheckinRequest>(&frame, 1024).unwrap();
        assert_eq!(decoded.endpoint_id, 3);
        assert!(unverified.verify(Route::Checkin, &key, &EDGE, 1_000));
        assert!(verify(&frame, Route::Checkin, &key, &EDGE, 1_000));
        assert!(
            !verify(&frame, Route::Checkin, &key, &EDGE, 1_000 + (1 << 32)),
            "the same low bits one wrap later fail"
        );
        assert!(
            !unverified.verify(Route::Checkin, &key, &Uuid::from_u128(0x1235), 1_000),
            "another Edge ID fails"
        );
        assert!(!unverified.verify(
            Route::Checkin,
            &ProofKey::derive(&JoinSecret::generate(), None),
            &EDGE,
            1_000
        ));
        assert!(!unverified.verify(
            Route::Checkin,
            &ProofKey::derive(&secret, Some("agent-secret")),
            &EDGE,
            1_000
        ));
    }

    #[test]
    fn a_frame_holds_only_on_the_route_it_was_signed_for() {
        let key = ProofKey::derive(&JoinSecret::generate(), None);
        for signed_for in Route::ALL {
            let frame = sign(&req(), signed_for, &key, &EDGE, 1_000).unwrap();
            for sent_to in Route::ALL {
                assert_eq!(
                    verify(&frame, sent_to, &key, &EDGE, 1_000),
                    signed_for == sent_to,
                    "signed for {signed_for:?}, sent to {sent_to:?}"
                );
            }
        }
        let paths: std::collections::BTreeSet<_> = Route::ALL.iter().map(|r| r.path()).collect();
        assert_eq!(paths.len(), Route::ALL.len(), "one path per route");
    }

    #[test]
    fn any_flipped_bit_fails() {
        let key = ProofKey::derive(&JoinSecret::generate(), Some("s"));
        let frame = sign(&req(), Route::Checkin, &key, &EDGE, 1_000).unwrap();
        for i in 0..frame.len() {
            for bit in 0..8 {
                let mut f = frame.clone();
                f[i] ^= 1 << bit;
                if let Ok((_, u)) = open::<CheckinRequest>(&f, 1024) {
                    assert!(
                        !u.verify(Route::Checkin, &key, &EDGE, 1_000),
                        "flip at byte {i} bit {bit} verified"
                    );
                }
            }
        }
    }

    #[test]
    fn short_frames_are_refused() {
        assert_eq!(
            open::<CheckinRequest>(&[], 100).unwrap_err(),
            CodecError::Empty
        );
        assert!(matches!(
            open::<CheckinRequest>(&[1; 10], 100),
            Err(CodecError::Malformed(_))
        ));
        assert!(matches!(
            open::<CheckinRequest>(&[1; 200], 100),
            Err(CodecError::TooLarge { .. })
        ));
    }

    #[test]
    fn freshness() {
        assert!(check_freshness(100_000, 100_000).is_ok());
        assert!(check_freshness(100_000 + FRESHNESS_WINDOW_MS, 100_000).is_ok());
        assert_eq!(
            check_freshness(100_000, 100_000 + FRESHNESS_WINDOW_MS + 1),
            Err(Skew {
                offset_ms: -(FRESHNESS_WINDOW_MS as i64) - 1
            })
        );
        assert!(check_freshness(u64::MAX, 0).is_err());
    }
}
