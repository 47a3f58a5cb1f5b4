#![no_main]
//! The codec never panics on untrusted bytes, and what it decodes survives a round trip:
//! check-in requests and answers (and the sealed credentials an answer carries, which no
//! fuzzed ciphertext opens), and the credentials themselves.
//!
//! Byte equality does not hold: bincode accepts non-minimal varints (the fuzzer found
//! `251, 0, 0` for 0). That is harmless because signed frames are verified over the bytes as
//! received, so a re-encoded frame never carries a valid MAC.
use libfuzzer_sys::fuzz_target;
use proto::codec::{decode, encode, MAX_CONTROL_FRAME};
use proto::seal::SealKey;
use proto::stacks::{DesiredState, MAX_DESIRED_ANSWER};
use proto::token::JoinSecret;
use proto::wire::{CheckinAnswer, CheckinRequest, TunnelCredentials};
use uuid::Uuid;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = decode::<CheckinRequest>(data, MAX_CONTROL_FRAME) {
        let again = encode(&m).expect("encode");
        assert_eq!(
            decode::<CheckinRequest>(&again, MAX_CONTROL_FRAME).expect("round trip"),
            m
        );
    }
    if let Ok(m) = decode::<CheckinAnswer>(data, MAX_CONTROL_FRAME) {
        let again = encode(&m).expect("encode");
        assert_eq!(
            decode::<CheckinAnswer>(&again, MAX_CONTROL_FRAME).expect("round trip"),
            m
        );
        if let Some(sealed) = &m.tunnel {
            let key = SealKey::derive(&JoinSecret::from_bytes([7; 32]), &Uuid::nil());
            assert!(key.open(sealed).is_err(), "a fuzzed ciphertext opened");
        }
    }
    let _ = decode::<TunnelCredentials>(data, MAX_CONTROL_FRAME);
    // What an agent reads of its desired stacks: bounded, and a round trip.
    if let Ok(m) = decode::<DesiredState>(data, MAX_DESIRED_ANSWER) {
        let again = encode(&m).expect("encode");
        assert_eq!(
            decode::<DesiredState>(&again, MAX_DESIRED_ANSWER).expect("round trip"),
            m
        );
    }
});
