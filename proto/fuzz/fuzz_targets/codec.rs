#![no_main]
//! The codec never panics on untrusted bytes, and what it decodes re-encodes to the same bytes
//! (bincode is canonical for these types).
use libfuzzer_sys::fuzz_target;
use proto::codec::{decode, encode, MAX_CONTROL_FRAME};
use proto::wire::{CheckinAnswer, CheckinRequest, TunnelCredentials};

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = decode::<CheckinRequest>(data, MAX_CONTROL_FRAME) {
        assert_eq!(encode(&m).expect("encode"), data);
    }
    if let Ok(m) = decode::<CheckinAnswer>(data, MAX_CONTROL_FRAME) {
        assert_eq!(encode(&m).expect("encode"), data);
    }
    let _ = decode::<TunnelCredentials>(data, MAX_CONTROL_FRAME);
});
