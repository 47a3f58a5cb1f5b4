#![no_main]
//! Signed frames, as the control plane reads them before it knows who sent them: check-ins,
//! snapshot uploads, async requests, desired-state fetches and stack reports. Splitting, decoding and verifying never panic, and no
//! fuzzed frame verifies under a key the fuzzer cannot know.
use libfuzzer_sys::fuzz_target;
use proto::async_mode::{AsyncRequest, MAX_ASYNC_FRAME};
use proto::codec::MAX_CONTROL_FRAME;
use proto::proof::{open, replay_tag, verify, ProofKey, Route};
use proto::snapshot::{SnapshotUpload, MAX_UPLOAD_FRAME};
use proto::stacks::{StackReport, StackSync, MAX_REPORT_FRAME, MAX_SYNC_FRAME};
use proto::token::JoinSecret;
use proto::wire::CheckinRequest;
use uuid::Uuid;

fuzz_target!(|data: &[u8]| {
    let key = ProofKey::derive(&JoinSecret::from_bytes([7; 32]), Some("fuzz"));
    if let Ok((_, unverified)) = open::<CheckinRequest>(data, MAX_CONTROL_FRAME) {
        for route in Route::ALL {
            assert!(!unverified.verify(route, &key, &Uuid::nil(), 0));
        }
    }
    if let Ok((upload, unverified)) = open::<SnapshotUpload>(data, MAX_UPLOAD_FRAME) {
        assert!(!unverified.verify(Route::Snapshot, &key, &upload.edge_id, upload.timestamp_ms));
    }
    if let Ok((_, unverified)) = open::<AsyncRequest>(data, MAX_ASYNC_FRAME) {
        assert!(!unverified.verify(Route::Async, &key, &Uuid::nil(), 0));
    }
    if let Ok((sync, unverified)) = open::<StackSync>(data, MAX_SYNC_FRAME) {
        assert!(!unverified.verify(Route::Desired, &key, &sync.edge_id, sync.timestamp_ms));
    }
    if let Ok((report, unverified)) = open::<StackReport>(data, MAX_REPORT_FRAME) {
        let s = &report.sync;
        assert!(!unverified.verify(Route::Report, &key, &s.edge_id, s.timestamp_ms));
    }
    for route in Route::ALL {
        assert!(!verify(data, route, &key, &Uuid::nil(), 0));
    }
    let _ = replay_tag(data);
});
