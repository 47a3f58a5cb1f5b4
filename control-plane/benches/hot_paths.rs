//! The per-check-in work of the server, without the network: decode and split the signed
//! frame, then the environment state machine's decision (proof, freshness, replay, binding);
//! and reading a snapshot upload (decoded as it is inflated), or refusing a zstd bomb.
//!     cargo bench -p control-plane --bench hot_paths

use control_plane::fleet::state::EnvState;
use criterion::{black_box, criterion_group, criterion_main, Criterion};
use proto::proof::{self, ProofKey, Route};
use proto::token::JoinSecret;
use proto::wire::{timestamp_lo, CheckinRequest};
use store::{EdgeMode, Environment};
use uuid::Uuid;

fn env(secret: &JoinSecret, edge: Uuid) -> Environment {
    Environment {
        id: 7,
        name: "bench".into(),
        mode: EdgeMode::Standard,
        checkin_interval: None,
        ping_interval: None,
        snapshot_interval: None,
        command_interval: None,
        group_id: None,
        tag_ids: vec![],
        env_vars: vec![],
        variables: Default::default(),
        allow_self_signed: false,
        join_secret: secret.to_text(),
        edge_id: Some(edge),
        created_at_ms: 0,
    }
}

fn checkin(c: &mut Criterion) {
    let secret = JoinSecret::generate();
    let edge = Uuid::new_v4();
    let key = ProofKey::derive(&secret, None);
    let mut state = EnvState::new(&env(&secret, edge), None).expect("state");
    let now = 1_800_000_000_000u64;
    let mut ts = now;
    c.bench_function("checkin: open + decide (steady, 204)", |b| {
        b.iter(|| {
            ts += 1;
            let req = CheckinRequest {
                endpoint_id: 7,
                edge_id: None,
                timestamp_lo: timestamp_lo(ts),
                timestamp_hi: None,
                interval_secs: 5,
                agent: None,
            };
            let frame = proof::sign(&req, Route::Checkin, &key, &edge, ts).expect("sign");
            let (decoded, _) =
                proof::open::<CheckinRequest>(black_box(&frame), 16 * 1024).expect("open");
            black_box(state.checkin(&decoded, &frame, ts, 5))
        })
    });
    let req = CheckinRequest {
        endpoint_id: 7,
        edge_id: None,
        timestamp_lo: timestamp_lo(now),
        timestamp_hi: None,
        interval_secs: 5,
        agent: None,
    };
    let frame = proof::sign(&req, Route::Checkin, &key, &edge, now).expect("sign");
    c.bench_function("proof: verify one frame", |b| {
        b.iter(|| {
            black_box(proof::verify(
                black_box(&frame),
                Route::Checkin,
                &key,
                &edge,
                now,
            ))
        })
    });
}

/// A snapshot of 500 containers with ten labels each (a 349 KB frame).
fn big_snapshot() -> proto::snapshot::Snapshot {
    use proto::snapshot::{Container, Snapshot};
    let containers = (0..500)
        .map(|i| Container {
            id: format!("{i:064x}"),
            names: vec![format!("/container-{i}")],
            image: "registry.example.com/team/app:1.2.3".into(),
            image_id: format!("sha256:{i:064x}"),
            command: "/bin/sh -c 'exec app --serve'".into(),
            state: "running".into(),
            labels: (0..10)
                .map(|j| (format!("com.example.label.{j}"), format!("value {i} {j}")))
                .collect(),
            ..Container::default()
        })
        .collect();
    Snapshot {
        containers,
        ..Snapshot::default()
    }
}

fn snapshots(c: &mut Criterion) {
    use proto::snapshot::{self, Snapshot, MAX_SNAPSHOT_BYTES};
    let snap = big_snapshot();
    let frame = proto::codec::encode(&snap).expect("encode");
    let body = snapshot::compress(&snap).expect("compress");
    c.bench_function(
        "snapshot: decompress 500 containers (decoded as inflated)",
        |b| b.iter(|| black_box(snapshot::decompress(black_box(&body)).expect("decode"))),
    );
    c.bench_function("snapshot: inflate whole, then decode the slice", |b| {
        b.iter(|| {
            let inflated = zstd::bulk::decompress(black_box(&body), frame.len()).expect("zstd");
            black_box(
                proto::codec::decode::<Snapshot>(&inflated, MAX_SNAPSHOT_BYTES).expect("decode"),
            )
        })
    });
    let bomb = testkit::hostile::zstd_bomb(1_500_000);
    c.bench_function("snapshot: refuse a bomb of 1.5 M empty containers", |b| {
        b.iter(|| black_box(snapshot::decompress(black_box(&bomb)).expect_err("refused")))
    });
}

criterion_group!(benches, checkin, snapshots);
criterion_main!(benches);
