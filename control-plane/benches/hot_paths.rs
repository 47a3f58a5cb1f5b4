//! The per-check-in work of the server, without the network: decode and split the signed
//! frame, then the environment state machine's decision (proof, freshness, replay, binding).
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

criterion_group!(benches, checkin);
criterion_main!(benches);
