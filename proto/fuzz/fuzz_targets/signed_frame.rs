#![no_main]
//! Signed frames: splitting, decoding and verifying never panic, and no fuzzed frame verifies
//! under a key the fuzzer cannot know.
use libfuzzer_sys::fuzz_target;
use proto::proof::{open, verify, replay_tag, ProofKey};
use proto::token::JoinSecret;
use proto::wire::CheckinRequest;
use uuid::Uuid;

fuzz_target!(|data: &[u8]| {
    let key = ProofKey::derive(&JoinSecret::from_bytes([7; 32]), Some("fuzz"));
    if let Ok((_, unverified)) = open::<CheckinRequest>(data, 16 * 1024) {
        assert!(!unverified.verify(&key, &Uuid::nil(), 0));
    }
    assert!(!verify(data, &key, &Uuid::nil(), 0));
    let _ = replay_tag(data);
});
