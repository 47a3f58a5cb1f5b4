//! The one place that turns wire types into bytes and back.
//!
//! Frame: `[protocol version: u8][bincode 2 (serde mode, standard config) payload]`.
//! Decoding refuses empty input, frames over the caller's limit (checked before any decoding),
//! unknown versions, malformed payloads and trailing bytes.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Current protocol version, the first byte of every frame.
pub const PROTOCOL_VERSION: u8 = 1;
/// Oldest protocol version this build still reads.
pub const MIN_PROTOCOL_VERSION: u8 = 1;
/// Decode limit for small control messages (check-ins and their answers).
pub const MAX_CONTROL_FRAME: usize = 16 * 1024;

/// bincode's own allocation limit, a second fence behind the length check.
const BINCODE_LIMIT: usize = 64 * 1024 * 1024;

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<BINCODE_LIMIT>()
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    #[error("empty message")]
    Empty,
    #[error("message of {len} bytes exceeds the limit of {limit} bytes")]
    TooLarge { len: usize, limit: usize },
    #[error("protocol version {got} is not supported (this side speaks {MIN_PROTOCOL_VERSION}..={PROTOCOL_VERSION})")]
    Version { got: u8 },
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("message has {0} unexpected trailing bytes")]
    Trailing(usize),
    #[error("could not encode message: {0}")]
    Encode(String),
}

/// Encodes `msg` as a versioned frame.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, CodecError> {
    let mut out = Vec::with_capacity(64);
    out.push(PROTOCOL_VERSION);
    encode_into(msg, &mut out)?;
    Ok(out)
}

/// Appends the bincode payload of `msg` (no version byte) to `out`.
pub(crate) fn encode_into<T: Serialize>(msg: &T, out: &mut Vec<u8>) -> Result<(), CodecError> {
    bincode::serde::encode_into_std_write(msg, out, config())
        .map(|_| ())
        .map_err(|e| CodecError::Encode(e.to_string()))
}

/// Decodes a versioned frame of at most `limit` bytes.
pub fn decode<T: DeserializeOwned>(frame: &[u8], limit: usize) -> Result<T, CodecError> {
    let payload = check_frame(frame, limit)?;
    decode_payload(payload)
}

/// Checks size and version; returns the payload after the version byte.
pub(crate) fn check_frame(frame: &[u8], limit: usize) -> Result<&[u8], CodecError> {
    if frame.len() > limit {
        return Err(CodecError::TooLarge {
            len: frame.len(),
            limit,
        });
    }
    let (&version, payload) = frame.split_first().ok_or(CodecError::Empty)?;
    if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&version) {
        return Err(CodecError::Version { got: version });
    }
    Ok(payload)
}

pub(crate) fn decode_payload<T: DeserializeOwned>(payload: &[u8]) -> Result<T, CodecError> {
    let (msg, used) = bincode::serde::decode_from_slice(payload, config())
        .map_err(|e| CodecError::Malformed(e.to_string()))?;
    if used != payload.len() {
        return Err(CodecError::Trailing(payload.len() - used));
    }
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{CheckinAnswer, CheckinRequest, EdgeStatus};
    use uuid::Uuid;

    #[test]
    fn round_trip_and_size() {
        let req = CheckinRequest {
            endpoint_id: 12345,
            edge_id: None,
            timestamp_lo: crate::wire::timestamp_lo(1_790_000_000_000),
            timestamp_hi: None,
            interval_secs: 5,
            agent: None,
        };
        let bytes = encode(&req).unwrap();
        assert!(
            bytes.len() <= 16,
            "steady check-in request is {} bytes",
            bytes.len()
        );
        assert_eq!(
            decode::<CheckinRequest>(&bytes, MAX_CONTROL_FRAME).unwrap(),
            req
        );
        let first = CheckinRequest {
            edge_id: Some(Uuid::new_v4()),
            ..req.clone()
        };
        assert_eq!(
            decode::<CheckinRequest>(&encode(&first).unwrap(), MAX_CONTROL_FRAME).unwrap(),
            first
        );

        let ans = CheckinAnswer {
            status: EdgeStatus::Idle,
            interval_secs: 5,
            server_time_ms: None,
            tunnel: None,
        };
        let bytes = encode(&ans).unwrap();
        assert!(bytes.len() <= 6, "idle answer is {} bytes", bytes.len());
        assert_eq!(
            decode::<CheckinAnswer>(&bytes, MAX_CONTROL_FRAME).unwrap(),
            ans
        );
    }

    #[test]
    fn refusals() {
        let ans = CheckinAnswer {
            status: EdgeStatus::Required,
            interval_secs: 5,
            server_time_ms: Some(1),
            tunnel: None,
        };
        let good = encode(&ans).unwrap();
        assert_eq!(decode::<CheckinAnswer>(&[], 100), Err(CodecError::Empty));
        assert_eq!(
            decode::<CheckinAnswer>(&good, 2),
            Err(CodecError::TooLarge {
                len: good.len(),
                limit: 2
            })
        );
        let mut bad_version = good.clone();
        bad_version[0] = 99;
        assert_eq!(
            decode::<CheckinAnswer>(&bad_version, 100),
            Err(CodecError::Version { got: 99 })
        );
        let mut trailing = good.clone();
        trailing.push(0);
        assert_eq!(
            decode::<CheckinAnswer>(&trailing, 100),
            Err(CodecError::Trailing(1))
        );
        assert!(matches!(
            decode::<CheckinAnswer>(&good[..good.len() - 1], 100),
            Err(CodecError::Malformed(_))
        ));
    }

    #[test]
    fn huge_claimed_lengths_do_not_allocate() {
        // version, then a Vec length prefix claiming u64::MAX elements.
        let frame = [
            PROTOCOL_VERSION,
            0,
            5,
            0,
            1,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
        ];
        assert!(decode::<CheckinAnswer>(&frame, 100).is_err());
    }

    proptest::proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let _ = decode::<CheckinRequest>(&bytes, MAX_CONTROL_FRAME);
            let _ = decode::<CheckinAnswer>(&bytes, MAX_CONTROL_FRAME);
        }
    }
}
