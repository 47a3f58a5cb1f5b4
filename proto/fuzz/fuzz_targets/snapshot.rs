#![no_main]
//! Snapshot uploads, as the control plane reads them: the zstd body (`decompress`, decoded
//! as it is inflated) and the inflated codec frame itself, so the fuzzer reaches the decoder
//! and its bounds without having to forge zstd; the frame is decoded from a slice and from a
//! reader, which must agree. Never a panic; what decodes survives a round trip, and normalising it never panics, changes nothing the second time and
//! leaves a snapshot that still decodes.
use libfuzzer_sys::fuzz_target;
use proto::codec;
use proto::snapshot::{self, Snapshot, MAX_SNAPSHOT_BYTES};

fn check(snap: Snapshot) {
    let body = snapshot::compress(&snap).expect("a decoded snapshot compresses");
    let again = snapshot::decompress(&body).expect("round trip");
    assert!(again == snap, "round trip changed the snapshot");
    let mut normal = snap;
    let _ = normal.normalise();
    let once = normal.clone();
    assert!(normal.normalise().is_empty(), "normalising twice clipped");
    assert!(normal == once, "normalising twice changed the snapshot");
    let body = snapshot::compress(&normal).expect("compress");
    let back = snapshot::decompress(&body).expect("a normalised snapshot decodes");
    assert!(back == normal);
    assert_eq!(
        snapshot::digest(&back).expect("digest"),
        snapshot::digest(&normal).expect("digest")
    );
}

fuzz_target!(|data: &[u8]| {
    if let Ok(snap) = snapshot::decompress(data) {
        check(snap);
    }
    // The frame decoded from a slice and as it is read (as bodies are): the same outcome.
    let sliced = codec::decode::<Snapshot>(data, MAX_SNAPSHOT_BYTES);
    let read = codec::decode_from_read::<Snapshot>(data, MAX_SNAPSHOT_BYTES);
    match (sliced, read) {
        (Ok(a), Ok(b)) => {
            assert!(a == b, "decoded from a slice and from a reader differ");
            check(a);
        }
        (Err(_), Err(_)) => {}
        (a, b) => panic!("slice and reader decodes disagree: {:?} / {:?}", a.err(), b.err()),
    }
});
