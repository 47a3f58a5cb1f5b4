//! The state machine, exhaustively and without actix: each rule, then proptest where rules
//! interact.

use super::*;

const NOW: u64 = 1_800_000_000_000;

pub(super) fn env(edge_id: Option<Uuid>) -> (Environment, JoinSecret) {
    let secret = JoinSecret::generate();
    let env = Environment {
        id: 7,
        name: "kiosk".into(),
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
        edge_id,
        created_at_ms: 0,
    };
    (env, secret)
}

/// A first-of-process style request: carries the Edge ID, asks with interval 5.
fn signed(
    secret: &JoinSecret,
    agent_secret: Option<&str>,
    edge_id: Uuid,
    ts: u64,
) -> (CheckinRequest, Vec<u8>) {
    signed_as(secret, agent_secret, edge_id, Some(edge_id), ts)
}

fn signed_as(
    secret: &JoinSecret,
    agent_secret: Option<&str>,
    signer: Uuid,
    sent: Option<Uuid>,
    ts: u64,
) -> (CheckinRequest, Vec<u8>) {
    signed_for(Route::Checkin, secret, agent_secret, signer, sent, ts)
}

/// A check-in signed for `route`.
fn signed_for(
    route: Route,
    secret: &JoinSecret,
    agent_secret: Option<&str>,
    signer: Uuid,
    sent: Option<Uuid>,
    ts: u64,
) -> (CheckinRequest, Vec<u8>) {
    let req = CheckinRequest {
        endpoint_id: 7,
        edge_id: sent,
        timestamp_lo: proto::wire::timestamp_lo(ts),
        timestamp_hi: sent.map(|_| (ts >> 32) as u32),
        interval_secs: 5,
        agent: None,
    };
    let frame = proof::sign(
        &req,
        route,
        &ProofKey::derive(secret, agent_secret),
        &signer,
        ts,
    )
    .unwrap();
    (req, frame)
}

fn idle(interval: u32) -> Verdict {
    Verdict::Answer(Answer {
        status: EdgeStatus::Idle,
        interval_secs: interval,
        server_time_ms: None,
        unchanged: interval == 5,
        tunnel: None,
        async_intervals: None,
        desired: None,
    })
}

#[test]
fn first_checkin_binds_then_answers() {
    let (e, secret) = env(None);
    let mut s = EnvState::new(&e, None).unwrap();
    let id = Uuid::new_v4();
    let (req, frame) = signed(&secret, None, id, NOW);
    assert_eq!(s.checkin(&req, &frame, NOW, 5), Verdict::Bind(id));
    assert_eq!(
        s.last_checkin_ms(),
        None,
        "nothing recorded before the binding holds"
    );
    s.set_binding(id);
    assert_eq!(s.checkin(&req, &frame, NOW, 5), idle(5));
    assert_eq!(s.last_checkin_ms(), Some(NOW));
    assert_eq!(s.edge_id(), Some(id));
}

#[test]
fn other_edge_id_is_refused_and_changes_nothing() {
    let bound = Uuid::new_v4();
    let (e, secret) = env(Some(bound));
    let mut s = EnvState::new(&e, None).unwrap();
    let (req, frame) = signed(&secret, None, Uuid::new_v4(), NOW);
    assert_eq!(
        s.checkin(&req, &frame, NOW, 5),
        Verdict::Refuse(Refusal::EdgeIdMismatch)
    );
    assert_eq!(s.edge_id(), Some(bound));
    assert_eq!(s.last_checkin_ms(), None);
}

#[test]
fn wrong_secret_and_agent_secret() {
    let id = Uuid::new_v4();
    let (e, secret) = env(Some(id));
    let mut s = EnvState::new(&e, Some("shh")).unwrap();
    let (req, frame) = signed(&JoinSecret::generate(), Some("shh"), id, NOW);
    assert_eq!(
        s.checkin(&req, &frame, NOW, 5),
        Verdict::Refuse(Refusal::BadProof)
    );
    let (req, frame) = signed(&secret, None, id, NOW);
    assert_eq!(
        s.checkin(&req, &frame, NOW, 5),
        Verdict::Refuse(Refusal::AgentSecretMismatch)
    );
    let (req, frame) = signed(&secret, Some("other"), id, NOW);
    assert_eq!(
        s.checkin(&req, &frame, NOW, 5),
        Verdict::Refuse(Refusal::BadProof)
    );
    let (req, frame) = signed(&secret, Some("shh"), id, NOW);
    assert_eq!(s.checkin(&req, &frame, NOW, 5), idle(5));
}

#[test]
fn replay_and_skew() {
    let id = Uuid::new_v4();
    let (e, secret) = env(Some(id));
    let mut s = EnvState::new(&e, None).unwrap();
    let (req, frame) = signed(&secret, None, id, NOW);
    assert_eq!(s.checkin(&req, &frame, NOW, 5), idle(5));
    assert_eq!(
        s.checkin(&req, &frame, NOW + 10, 5),
        Verdict::Refuse(Refusal::Replay)
    );
    // Outside the window a replay is a skew refusal, which tells the server time.
    let late = NOW + FRESHNESS_WINDOW_MS + 1;
    assert_eq!(
        s.checkin(&req, &frame, late, 5),
        Verdict::Refuse(Refusal::ClockSkew {
            server_time_ms: late
        })
    );
    // A skew within the window is accepted but reported.
    let (req, frame) = signed(&secret, None, id, NOW + 5_000);
    assert_eq!(
        s.checkin(&req, &frame, NOW, 5),
        Verdict::Answer(Answer {
            status: EdgeStatus::Idle,
            interval_secs: 5,
            server_time_ms: Some(NOW),
            unchanged: false,
            tunnel: None,
            async_intervals: None,
            desired: None,
        })
    );
}

#[test]
fn a_frame_replayed_one_timestamp_wrap_later_fails_the_proof() {
    let id = Uuid::new_v4();
    let (e, secret) = env(Some(id));
    let mut s = EnvState::new(&e, None).unwrap();
    // A steady frame (no high bits, no Edge ID) accepted now ...
    let (req, frame) = signed_as(&secret, None, id, None, NOW);
    assert_eq!(s.checkin(&req, &frame, NOW, 5), idle(5));
    // ... replayed when the low 32 bits come round again: same bytes, other instant.
    let later = NOW + (1 << 32);
    assert_eq!(
        s.checkin(&req, &frame, later, 5),
        Verdict::Refuse(Refusal::BadProof)
    );
}

#[test]
fn a_far_off_clock_is_told_the_time_not_refused_as_bad_proof() {
    let id = Uuid::new_v4();
    let (e, secret) = env(Some(id));
    let mut s = EnvState::new(&e, None).unwrap();
    // A device that booted in 1970: its first request carries the high bits.
    let (req, frame) = signed(&secret, None, id, 5_000);
    assert_eq!(
        s.checkin(&req, &frame, NOW, 5),
        Verdict::Refuse(Refusal::ClockSkew {
            server_time_ms: NOW
        })
    );
}

#[test]
fn recent_set_is_bounded_and_pruned() {
    let id = Uuid::new_v4();
    let (e, secret) = env(Some(id));
    let mut s = EnvState::new(&e, None).unwrap();
    for i in 0..200 {
        let (req, frame) = signed(&secret, None, id, NOW + i);
        assert_eq!(s.checkin(&req, &frame, NOW + i, 5), idle(5));
    }
    assert!(s.recent.len() <= MAX_RECENT);
    let later = NOW + 2 * FRESHNESS_WINDOW_MS;
    let (req, frame) = signed(&secret, None, id, later);
    s.checkin(&req, &frame, later, 5);
    assert_eq!(s.recent.len(), 1);
}

#[test]
fn required_interval_mode_and_reload() {
    let id = Uuid::new_v4();
    let (mut e, secret) = env(Some(id));
    e.checkin_interval = Some(30);
    let mut s = EnvState::new(&e, None).unwrap();
    s.set_required(true);
    let (req, frame) = signed(&secret, None, id, NOW);
    assert_eq!(
        s.checkin(&req, &frame, NOW, 5),
        Verdict::Answer(Answer {
            status: EdgeStatus::Required,
            interval_secs: 30,
            server_time_ms: None,
            unchanged: false,
            tunnel: None,
            async_intervals: None,
            desired: None,
        })
    );
    // Association reset: new secret, no binding. Old key is refused; new agent binds.
    let new_secret = JoinSecret::generate();
    e.join_secret = new_secret.to_text();
    e.edge_id = None;
    e.mode = EdgeMode::Async;
    s.reload(&e, None).unwrap();
    let (req, frame) = signed(&secret, None, id, NOW + 1);
    assert_eq!(
        s.checkin(&req, &frame, NOW + 1, 5),
        Verdict::Refuse(Refusal::BadProof)
    );
    let (req, frame) = signed(&new_secret, None, id, NOW + 2);
    assert_eq!(
        s.checkin(&req, &frame, NOW + 2, 5),
        Verdict::Refuse(Refusal::WrongMode)
    );
}

#[test]
fn steady_requests_omit_the_edge_id_which_the_mac_still_covers() {
    let id = Uuid::new_v4();
    let (e, secret) = env(None);
    let mut s = EnvState::new(&e, None).unwrap();
    // Unbound and no Edge ID sent: nothing to bind to.
    let (req, frame) = signed_as(&secret, None, id, None, NOW);
    assert_eq!(
        s.checkin(&req, &frame, NOW, 5),
        Verdict::Refuse(Refusal::EdgeIdRequired)
    );
    s.set_binding(id);
    // Bound: the steady request without the ID verifies against the bound one.
    assert_eq!(s.checkin(&req, &frame, NOW, 5), idle(5));
    // An impostor omitting its ID fails the proof (its MAC covers its own ID) ...
    let other = Uuid::new_v4();
    let (req, frame) = signed_as(&secret, None, other, None, NOW + 1);
    assert_eq!(
        s.checkin(&req, &frame, NOW + 1, 5),
        Verdict::Refuse(Refusal::BadProof)
    );
    // ... and sending it is refused as a mismatch.
    let (req, frame) = signed_as(&secret, None, other, Some(other), NOW + 2);
    assert_eq!(
        s.checkin(&req, &frame, NOW + 2, 5),
        Verdict::Refuse(Refusal::EdgeIdMismatch)
    );
    // Claiming the bound ID without the matching signer fails too.
    let (req, frame) = signed_as(&secret, None, other, Some(id), NOW + 3);
    assert_eq!(
        s.checkin(&req, &frame, NOW + 3, 5),
        Verdict::Refuse(Refusal::BadProof)
    );
}

#[test]
fn unchanged_only_when_the_agent_knows_everything() {
    let id = Uuid::new_v4();
    let (e, secret) = env(Some(id));
    let mut s = EnvState::new(&e, None).unwrap();
    let mut ts = NOW;
    let mut ask = |s: &mut EnvState, interval: u32, info: bool, default: u32| {
        ts += 1;
        let mut req = CheckinRequest {
            endpoint_id: 7,
            edge_id: None,
            timestamp_lo: proto::wire::timestamp_lo(ts),
            timestamp_hi: None,
            interval_secs: interval,
            agent: None,
        };
        if info {
            req.agent = Some(proto::wire::AgentInfo {
                version: "t".into(),
                platform: proto::wire::Platform::Docker,
                hostname: "h".into(),
            });
        }
        let frame = proof::sign(
            &req,
            Route::Checkin,
            &ProofKey::derive(&secret, None),
            &id,
            ts,
        )
        .unwrap();
        match s.checkin(&req, &frame, ts, default) {
            Verdict::Answer(a) => a.unchanged,
            other => panic!("{other:?}"),
        }
    };
    assert!(ask(&mut s, 5, false, 5));
    assert!(
        !ask(&mut s, 5, true, 5),
        "a new process gets the full answer"
    );
    assert!(!ask(&mut s, 5, false, 9), "a new interval is sent");
    s.set_required(true);
    assert!(!ask(&mut s, 5, false, 5), "required is sent");
}

fn status_of(v: Verdict) -> EdgeStatus {
    match v {
        Verdict::Answer(a) => a.status,
        other => panic!("{other:?}"),
    }
}

#[test]
fn one_grant_at_a_time_until_the_window_passes_or_the_tunnel_settles() {
    let id = Uuid::new_v4();
    let (e, secret) = env(Some(id));
    let mut s = EnvState::new(&e, None).unwrap();
    let mut ts = NOW;
    let mut poll = |s: &mut EnvState, kind: CheckinKind, now: u64| {
        ts = ts.max(now) + 1;
        let (req, frame) = signed_for(kind.route(), &secret, None, id, Some(id), ts);
        status_of(s.checkin_as(kind, &req, &frame, ts, 5))
    };
    assert_eq!(poll(&mut s, CheckinKind::Held, NOW), EdgeStatus::Idle);
    s.want_tunnel(NOW + 15_000);
    // Swarm agents share the Edge ID: the first gets credentials, the others wait.
    assert_eq!(poll(&mut s, CheckinKind::Held, NOW), EdgeStatus::Required);
    assert_eq!(poll(&mut s, CheckinKind::Held, NOW), EdgeStatus::Idle);
    assert!(!s.take_grant(NOW + 10));
    // The first never connected: after the window another one gets fresh credentials.
    assert_eq!(
        poll(&mut s, CheckinKind::Held, NOW + GRANT_WINDOW_MS + 1),
        EdgeStatus::Required
    );
    // Open: nobody gets credentials, and the wish is served.
    s.set_open(Some(3));
    assert_eq!(s.open_epoch(), Some(3));
    assert_eq!(poll(&mut s, CheckinKind::Held, NOW), EdgeStatus::Idle);
    // Closed later: not wanted any more, so still idle ...
    s.set_open(None);
    assert_eq!(poll(&mut s, CheckinKind::Held, NOW), EdgeStatus::Idle);
    // ... until an operator wants it again.
    s.want_tunnel(NOW + 30_000);
    assert!(s.take_grant(NOW + 20));
    s.release_grant();
    assert!(
        s.take_grant(NOW + 21),
        "an undelivered grant frees the slot"
    );
    // A wish that expired is no wish.
    let mut s = EnvState::new(&e, None).unwrap();
    s.want_tunnel(NOW);
    assert!(!s.take_grant(NOW + 1));
}

#[test]
fn an_agent_that_lost_its_tunnel_gets_credentials_even_if_it_looks_open() {
    let id = Uuid::new_v4();
    let (e, secret) = env(Some(id));
    let mut s = EnvState::new(&e, None).unwrap();
    s.set_open(Some(9));
    let (req, frame) = signed_for(Route::Tunnel, &secret, None, id, Some(id), NOW);
    assert_eq!(
        status_of(s.checkin_as(CheckinKind::AskTunnel, &req, &frame, NOW, 5)),
        EdgeStatus::Required
    );
    assert!(s.seal_key().is_some());
    let unbound = EnvState::new(&env(None).0, None).unwrap();
    assert!(unbound.seal_key().is_none());
}

#[test]
fn a_frame_signed_for_one_route_is_refused_on_another() {
    let id = Uuid::new_v4();
    let (e, secret) = env(Some(id));
    let mut s = EnvState::new(&e, None).unwrap();
    s.set_open(Some(9));
    // A held check-in (seen on the wire, say) replayed to the tunnel route: no credentials.
    let (req, held) = signed_for(Route::Held, &secret, None, id, Some(id), NOW);
    assert_eq!(
        s.checkin_as(CheckinKind::AskTunnel, &req, &held, NOW, 5),
        Verdict::Refuse(Refusal::BadProof)
    );
    assert_eq!(
        s.checkin_as(CheckinKind::Poll, &req, &held, NOW, 5),
        Verdict::Refuse(Refusal::BadProof)
    );
    for kind in [CheckinKind::Poll, CheckinKind::Held, CheckinKind::AskTunnel] {
        for signed_for_route in Route::ALL {
            let (req, frame) = signed_for(signed_for_route, &secret, None, id, Some(id), NOW);
            let verdict = s.gate.read().check_checkin(kind, &req, &frame, NOW);
            assert_eq!(
                verdict.is_ok(),
                kind.route() == signed_for_route,
                "{kind:?} signed for {signed_for_route:?}: {verdict:?}"
            );
        }
    }
    // On its own route it is answered.
    assert_eq!(
        status_of(s.checkin_as(CheckinKind::Held, &req, &held, NOW, 5)),
        EdgeStatus::Idle
    );
}

#[test]
fn liveness_rule() {
    assert_eq!(liveness(None, 5, NOW), Liveness::Never);
    assert_eq!(liveness(Some(NOW - 30_000), 5, NOW), Liveness::Up);
    assert_eq!(liveness(Some(NOW - 30_001), 5, NOW), Liveness::Down);
    assert_eq!(liveness(Some(NOW + 1_000), 5, NOW), Liveness::Up);
}

proptest::proptest! {
    /// Whatever sequence of agents and clocks, an environment bound to one Edge ID never
    /// accepts another, and nothing but a verified, fresh, bound request is answered.
    #[test]
    fn only_bound_fresh_verified_requests_are_answered(
        steps in proptest::collection::vec((0u8..3, 0u8..3, -90_000i64..90_000), 1..40)
    ) {
        let ids = [Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4()];
        let (e, secret) = env(None);
        let wrong = JoinSecret::generate();
        let mut s = EnvState::new(&e, None).unwrap();
        let mut bound: Option<Uuid> = None;
        for (i, (who, key, skew)) in steps.into_iter().enumerate() {
            let now = NOW + i as u64 * 5_000;
            let ts = (now as i64 + skew) as u64;
            let k = if key == 0 { &wrong } else { &secret };
            let (req, frame) = signed(k, None, ids[who as usize], ts);
            match s.checkin(&req, &frame, now, 5) {
                Verdict::Bind(id) => {
                    proptest::prop_assert!(bound.is_none());
                    bound = Some(id);
                    s.set_binding(id);
                }
                Verdict::Answer(_) => {
                    proptest::prop_assert!(key != 0);
                    proptest::prop_assert!(skew.unsigned_abs() <= FRESHNESS_WINDOW_MS);
                    proptest::prop_assert_eq!(Some(ids[who as usize]), bound);
                }
                Verdict::Refuse(_) => {}
            }
            proptest::prop_assert_eq!(s.edge_id(), bound);
        }
    }
}
