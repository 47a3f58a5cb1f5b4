#![no_main]
//! Snapshot deltas of async mode, as the control plane reads them: the zstd body
//! (`decompress_delta`) and the inflated codec frame (from a slice and from a reader, which
//! must agree), then `apply` to a held snapshot. Never a panic; what decodes survives a round
//! trip; a delta that applies gives a snapshot with the delta's result digest that still
//! decodes.
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use proto::codec;
use proto::snapshot::{self, Container, Snapshot, SnapshotDelta, Volume, MAX_SNAPSHOT_BYTES};

/// A snapshot the server holds; the fuzzer finds its digest in the seeds.
fn base() -> &'static Snapshot {
    static BASE: OnceLock<Snapshot> = OnceLock::new();
    BASE.get_or_init(|| {
        let mut s = Snapshot {
            taken_ms: 1,
            containers: vec![Container {
                id: "a".into(),
                names: vec!["web".into()],
                state: "running".into(),
                ..Container::default()
            }],
            volumes: vec![Volume {
                name: "data".into(),
                ..Volume::default()
            }],
            ..Snapshot::default()
        };
        let _ = s.normalise();
        s
    })
}

fn check(delta: SnapshotDelta) {
    let body = snapshot::compress_delta(&delta).expect("a decoded delta compresses");
    let again = snapshot::decompress_delta(&body).expect("round trip");
    assert!(again == delta, "round trip changed the delta");
    for held in [base(), &Snapshot::default()] {
        if let Ok(out) = snapshot::apply(held, delta.clone()) {
            assert_eq!(snapshot::digest(&out).expect("digest"), delta.result);
            let body = snapshot::compress(&out).expect("compress");
            let back = snapshot::decompress(&body).expect("an applied snapshot decodes");
            assert!(back == out);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(delta) = snapshot::decompress_delta(data) {
        check(delta);
    }
    // The frame decoded from a slice and as it is read (as bodies are): the same outcome.
    let sliced = codec::decode::<SnapshotDelta>(data, MAX_SNAPSHOT_BYTES);
    let read = codec::decode_from_read::<SnapshotDelta>(data, MAX_SNAPSHOT_BYTES);
    match (sliced, read) {
        (Ok(a), Ok(b)) => {
            assert!(a == b, "decoded from a slice and from a reader differ");
            check(a);
        }
        (Err(_), Err(_)) => {}
        (a, b) => panic!("slice and reader decodes disagree: {:?} / {:?}", a.err(), b.err()),
    }
});
