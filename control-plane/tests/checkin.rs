#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Agent check-ins against an in-process control plane, with the agent crate's own client.

use std::time::Duration;

use edge_agent::{CheckinError, PollClient, PollOptions, RefusalCode};
use proto::proof::{self, ProofKey, Route};
use proto::token::JoinSecret;
use proto::wire::{CheckinRequest, EdgeStatus};
use proto::JoinToken;
use reqwest::StatusCode;
use serde_json::{json, Value};
use testkit::{http, ControlPlane, ADMIN_KEY};
use uuid::Uuid;

async fn create(cp: &ControlPlane, body: Value) -> (u64, JoinToken) {
    testkit::create_env(&cp.url, body).await
}

async fn env(cp: &ControlPlane, id: u64) -> Value {
    testkit::get_env(&cp.url, id).await
}

fn client(token: &JoinToken, edge: Uuid, agent_secret: Option<&str>) -> PollClient {
    let mut o = PollOptions::new(edge);
    o.agent_secret = agent_secret.map(str::to_owned);
    PollClient::new(token, o).unwrap()
}

fn refusal(r: Result<edge_agent::CheckinOutcome, CheckinError>) -> (u16, RefusalCode) {
    match r {
        Err(CheckinError::Refused { status, code, .. }) => (status, code),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[actix_web::test]
async fn first_checkin_binds_and_another_edge_id_is_refused() {
    let cp = ControlPlane::start().await;
    let (id, token) = create(&cp, json!({"name": "kiosk", "checkinInterval": 3})).await;
    let first = Uuid::new_v4();
    let mut a = client(&token, first, None);
    let out = a.checkin().await.unwrap();
    assert_eq!(out.status, EdgeStatus::Idle);
    assert_eq!(out.interval, Duration::from_secs(3));
    let e = env(&cp, id).await;
    assert_eq!(e["edgeId"], first.to_string());
    assert_eq!(e["status"], "up");
    assert!(e["lastCheckIn"].is_string());

    // Same key, another Edge ID: 403, counted, binding unchanged.
    let mut b = client(&token, Uuid::new_v4(), None);
    assert_eq!(
        refusal(b.checkin().await),
        (403, RefusalCode::EdgeIdMismatch)
    );
    assert_eq!(
        refusal(b.checkin().await),
        (403, RefusalCode::EdgeIdMismatch)
    );
    assert_eq!(env(&cp, id).await["edgeId"], first.to_string());
    assert_eq!(
        cp.metric("edgeplane_checkin_requests_total{result=\"edge_id_mismatch\"}")
            .await,
        2.0
    );
    let agents = http()
        .get(format!("{}/metrics/agents", cp.metrics_url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        agents.contains(&format!(
            "edgeplane_agent_refused_total{{endpoint=\"{id}\"}} 2"
        )),
        "{agents}"
    );
    // The bound agent keeps working on its kept-alive connection.
    a.checkin().await.unwrap();
    a.checkin().await.unwrap();
    assert_eq!(a.connects(), 1);

    // Association reset: a new key; the old one no longer proves anything; a new agent binds.
    let r = http()
        .post(cp.api(&format!("/api/endpoints/{id}/association")))
        .header("X-API-Key", ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["edgeId"], Value::Null);
    let new_token = JoinToken::parse(v["edgeKey"].as_str().unwrap()).unwrap();
    assert_ne!(new_token.secret, token.secret);
    assert_eq!(refusal(a.checkin().await), (401, RefusalCode::BadProof));
    let second = Uuid::new_v4();
    client(&new_token, second, None).checkin().await.unwrap();
    assert_eq!(env(&cp, id).await["edgeId"], second.to_string());
    cp.stop().await;
}

#[actix_web::test]
async fn agent_secret_is_enforced() {
    let cp = ControlPlane::start_with(|c| c.agent_secret = Some("fleet-secret".into())).await;
    let (_, token) = create(&cp, json!({"name": "k"})).await;
    let edge = Uuid::new_v4();
    assert_eq!(
        refusal(client(&token, edge, None).checkin().await),
        (401, RefusalCode::AgentSecretMismatch)
    );
    assert_eq!(
        refusal(client(&token, edge, Some("guess")).checkin().await),
        (401, RefusalCode::BadProof)
    );
    client(&token, edge, Some("fleet-secret"))
        .checkin()
        .await
        .unwrap();
    cp.stop().await;
}

async fn raw(cp: &ControlPlane, body: Vec<u8>) -> (StatusCode, Value) {
    let (s, body) = raw_to(cp, proto::wire::CHECKIN_PATH, body).await;
    (s, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

/// POSTs `body` to `path`: the status and the answer's bytes.
async fn raw_to(cp: &ControlPlane, path: &str, body: Vec<u8>) -> (StatusCode, Vec<u8>) {
    let r = http().post(cp.api(path)).body(body).send().await.unwrap();
    let s = r.status();
    (s, r.bytes().await.unwrap().to_vec())
}

fn frame(token: &JoinToken, secret: &JoinSecret, edge: Uuid, ts: u64) -> Vec<u8> {
    frame_for(Route::Checkin, token, secret, edge, ts)
}

/// A check-in signed for `route`.
fn frame_for(route: Route, token: &JoinToken, secret: &JoinSecret, edge: Uuid, ts: u64) -> Vec<u8> {
    let req = CheckinRequest {
        endpoint_id: token.endpoint_id,
        edge_id: Some(edge),
        timestamp_lo: proto::wire::timestamp_lo(ts),
        timestamp_hi: Some((ts >> 32) as u32),
        interval_secs: 5,
        agent: None,
    };
    proof::sign(&req, route, &ProofKey::derive(secret, None), &edge, ts).unwrap()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[actix_web::test]
async fn bad_checkins_get_precise_refusals_and_change_nothing() {
    let cp = ControlPlane::start().await;
    let (id, token) = create(&cp, json!({"name": "k"})).await;
    let edge = Uuid::new_v4();

    let cases: Vec<(Vec<u8>, StatusCode, &str)> = vec![
        (vec![], StatusCode::BAD_REQUEST, "bad_request"),
        (
            b"GET / HTTP/1.1 garbage garbage".to_vec(),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (vec![0xff; 64], StatusCode::BAD_REQUEST, "bad_request"),
        // A wrong secret: the proof fails.
        (
            frame(&token, &JoinSecret::generate(), edge, now_ms()),
            StatusCode::UNAUTHORIZED,
            "bad_proof",
        ),
        // Clock far off: refused with the server time.
        (
            frame(&token, &token.secret, edge, now_ms() - 3_600_000),
            StatusCode::UNAUTHORIZED,
            "clock_skew",
        ),
    ];
    for (body, status, code) in cases {
        let (s, v) = raw(&cp, body.clone()).await;
        assert_eq!(s, status, "{v}");
        assert_eq!(v["code"], code, "{v}");
        assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()));
        if code == "clock_skew" {
            assert!(v["serverTimeMs"].as_u64().unwrap() > 0);
        }
    }
    // Oversized body: 413 before decoding.
    let r = http()
        .post(cp.api(proto::wire::CHECKIN_PATH))
        .body(vec![1u8; 17 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let v: Value = r.json().await.unwrap();
    assert!(
        v["message"].as_str().unwrap().contains("larger than"),
        "{v}"
    );
    // Unknown environment.
    let mut ghost = token.clone();
    ghost.endpoint_id = 4242;
    let (s, v) = raw(&cp, frame(&ghost, &token.secret, edge, now_ms())).await;
    assert_eq!(
        (s, v["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("unknown_environment"))
    );
    // None of that bound anything.
    assert_eq!(env(&cp, id).await["edgeId"], Value::Null);
    assert_eq!(env(&cp, id).await["status"], "never");

    // A good request binds; the very same bytes again are a replay.
    let good = frame(&token, &token.secret, edge, now_ms());
    let (s, _) = raw(&cp, good.clone()).await;
    assert_eq!(
        s,
        StatusCode::NO_CONTENT,
        "bound; it already knows its interval"
    );
    let (s, v) = raw(&cp, good).await;
    assert_eq!(
        (s, v["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("replay"))
    );
    cp.stop().await;
}

#[actix_web::test]
async fn a_full_environment_answers_busy_at_once() {
    // No room at all: every check-in is refused with 503 and a retry-after, none queue.
    let cp = ControlPlane::start_with(|c| c.limits.actor_mailbox = 0).await;
    let (_, token) = create(&cp, json!({"name": "k"})).await;
    let edge = Uuid::new_v4();
    let r = http()
        .post(cp.api(proto::wire::CHECKIN_PATH))
        .body(frame(&token, &token.secret, edge, now_ms()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.headers().get("retry-after").unwrap(), "1");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["code"], "busy");
    match client(&token, edge, None).checkin().await {
        Err(CheckinError::Busy { retry_after }) => {
            assert_eq!(retry_after, Some(Duration::from_secs(1)))
        }
        other => panic!("expected busy, got {other:?}"),
    }
    cp.stop().await;
}

#[actix_web::test]
async fn heartbeats_are_written_behind_in_batches_and_survive_restart() {
    let dir = tempfile::tempdir().unwrap();
    // A flush period far longer than the test: nothing may reach the store per check-in.
    let slow = |c: &mut control_plane::config::Config| {
        c.limits.heartbeat_flush = Duration::from_secs(3600)
    };
    let cp = ControlPlane::start_in(dir.path(), slow).await;
    let (id, token) = create(&cp, json!({"name": "k", "checkinInterval": 60})).await;
    let mut a = client(&token, Uuid::new_v4(), None);
    for _ in 0..20 {
        a.checkin().await.unwrap();
    }
    assert_eq!(
        cp.metric("edgeplane_checkin_requests_total{result=\"idle\"}")
            .await,
        20.0
    );
    // The first tick of the interval fires at start (empty); no batch carried a heartbeat yet.
    assert_eq!(
        cp.metric("edgeplane_store_heartbeat_batch_size_count")
            .await,
        0.0
    );
    // Status is served from memory meanwhile.
    assert_eq!(env(&cp, id).await["status"], "up");
    cp.stop().await; // graceful stop writes the pending batch

    let cp = ControlPlane::start_in(dir.path(), slow).await;
    let e = env(&cp, id).await;
    assert_eq!(e["status"], "up", "{e}");
    assert!(e["lastCheckIn"].is_string());
    cp.stop().await;
}

#[actix_web::test]
async fn steady_check_ins_need_no_room_at_the_actor_and_bad_frames_are_told_why() {
    // No room at all at the environment's actor: anything sent there would be 503. Frames
    // signed with another key are refused with what is wrong with them, and a bound agent's
    // check-ins and uploads are decided in place, never queued, so they are answered.
    let cp = ControlPlane::start_with(|c| c.limits.actor_mailbox = 0).await;
    let edge = Uuid::new_v4();
    // Pre-assigned: bound without a check-in (which could not get through here).
    let (_, token) = create(
        &cp,
        json!({"name": "k", "edgeId": edge, "checkinInterval": 1}),
    )
    .await;
    let wrong = JoinSecret::generate();
    for _ in 0..50 {
        let (s, v) = raw(&cp, frame(&token, &wrong, edge, now_ms())).await;
        assert_eq!(
            (s, v["code"].as_str()),
            (StatusCode::UNAUTHORIZED, Some("bad_proof"))
        );
    }
    // A skewed clock, too, is told so rather than busy.
    let (s, v) = raw(
        &cp,
        frame(&token, &token.secret, edge, now_ms() - 3_600_000),
    )
    .await;
    assert_eq!(
        (s, v["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("clock_skew"))
    );
    // ... while the real agent's check-ins (held ones too) and uploads are answered.
    let mut agent = client(&token, edge, None);
    let out = agent.checkin().await.unwrap();
    assert_eq!(out.status, EdgeStatus::Idle);
    let out = agent
        .checkin_via(edge_agent::CheckinRoute::Held)
        .await
        .unwrap();
    assert_eq!(out.status, EdgeStatus::Idle);
    let snapshot = proto::snapshot::compress(&proto::snapshot::Snapshot::default()).unwrap();
    agent.upload_snapshot(&snapshot).await.unwrap();
    // What needs the actor does not get through: a tunnel's credentials.
    match agent.checkin_via(edge_agent::CheckinRoute::AskTunnel).await {
        Err(CheckinError::Busy { .. }) => {}
        other => panic!("expected busy, got {other:?}"),
    }
    // An upload from another Edge ID is refused before the bound, as a mismatch.
    let mut other = client(&token, Uuid::new_v4(), None);
    match other.upload_snapshot(&snapshot).await {
        Err(CheckinError::Refused { code, .. }) => assert_eq!(code, RefusalCode::EdgeIdMismatch),
        got => panic!("expected a refusal, got {got:?}"),
    }
    cp.stop().await;
}

#[actix_web::test]
async fn a_swarm_of_held_check_ins_leaves_room_for_the_next_one() {
    // Two slots; many agents of one swarm (one environment, one Edge ID) holding check-ins at
    // once. Holds give their slot back, so nobody is told busy.
    let cp = ControlPlane::start_with(|c| c.limits.actor_mailbox = 2).await;
    let (_, token) = create(&cp, json!({"name": "swarm"})).await;
    let edge = Uuid::new_v4();
    client(&token, edge, None).checkin().await.unwrap();
    // One after another (so no two reach the bound at the same instant): each is held and
    // gives its slot back; before, the third would have been told busy.
    let mut nodes = Vec::new();
    for n in 1..=20 {
        let mut node = client(&token, edge, None);
        // The first check-in of a process tells the server who it is (answered at once); the
        // next one is held.
        node.checkin().await.unwrap();
        nodes.push(actix_web::rt::spawn(async move {
            node.checkin_via(edge_agent::CheckinRoute::Held).await
        }));
        testkit::eventually(Duration::from_secs(10), "the check-in held", || async {
            let held = cp
                .metric("edgeplane_checkin_requests_total{result=\"held\"}")
                .await;
            (held >= f64::from(n)).then_some(())
        })
        .await;
    }
    // Every node is held, and a plain check-in still gets through at once.
    let out = client(&token, edge, None).checkin().await.unwrap();
    assert_eq!(out.status, EdgeStatus::Idle);
    for node in nodes {
        node.abort();
    }
    cp.stop().await;
}

#[actix_web::test]
async fn held_check_ins_are_counted_until_pruned_and_unknown_ids_are_cached() {
    let cp = ControlPlane::start().await;
    let (id, token) = create(&cp, json!({"name": "held-gauge", "checkinInterval": 3})).await;
    let edge = Uuid::new_v4();
    let held = "edgeplane_fleet_held_checkins";
    let gauge_is = |want: f64| {
        let cp = &cp;
        async move { (cp.metric(held).await == want).then_some(()) }
    };
    // Three nodes of one swarm holding check-ins at once: three entries.
    let mut nodes = Vec::new();
    for _ in 0..3 {
        let mut node = client(&token, edge, None);
        node.checkin().await.unwrap();
        nodes.push(node);
    }
    // One after the other, as fast as the gauge shows each: nodes of one swarm sign with the
    // same key and Edge ID, so two of them may sign the same frame in the same millisecond
    // (a replay); the one refused signs again, still without its agent info, and is held too.
    let mut waiting = Vec::new();
    for (k, mut node) in nodes.into_iter().enumerate() {
        waiting.push(actix_web::rt::spawn(async move {
            let out = node.checkin_via(edge_agent::CheckinRoute::Held).await;
            (node, out)
        }));
        testkit::eventually(Duration::from_secs(5), "held check-ins counted", || {
            gauge_is((k + 1) as f64)
        })
        .await;
    }
    // Their holds end (idle answers); the entries stay until the next hold prunes them.
    let mut nodes = Vec::new();
    for w in waiting {
        let (node, out) = w.await.unwrap();
        assert_eq!(out.unwrap().status, EdgeStatus::Idle);
        nodes.push(node);
    }
    assert_eq!(cp.metric(held).await, 3.0);
    let mut node = nodes.pop().unwrap();
    let next =
        actix_web::rt::spawn(async move { node.checkin_via(edge_agent::CheckinRoute::Held).await });
    testkit::eventually(Duration::from_secs(5), "ended holds pruned", || {
        gauge_is(1.0)
    })
    .await;
    assert_eq!(next.await.unwrap().unwrap().status, EdgeStatus::Idle);

    // The environment goes: its actor stops and takes its entries off the gauge; a check-in
    // for it now is remembered as unknown.
    let r = http()
        .delete(cp.api(&format!("/api/endpoints/{id}")))
        .header("X-API-Key", ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    testkit::eventually(Duration::from_secs(5), "the actor's entries gone", || {
        gauge_is(0.0)
    })
    .await;
    assert!(client(&token, edge, None).checkin().await.is_err());
    assert_eq!(
        cp.metric("edgeplane_fleet_entries{map=\"unknown\"}").await,
        1.0
    );
    assert_eq!(cp.metric("edgeplane_fleet_checkins_in_flight").await, 0.0);
    cp.stop().await;
}

#[actix_web::test]
async fn a_check_in_replayed_to_another_route_is_refused_and_issues_nothing() {
    let cp = ControlPlane::start().await;
    let (id, token) = create(&cp, json!({"name": "routes"})).await;
    let edge = Uuid::new_v4();
    client(&token, edge, None).checkin().await.unwrap();
    let issued = "edgeplane_checkin_requests_total{result=\"required\"}";
    let before = cp.metric(issued).await;
    // A held check-in, as if taken off the wire, replayed to the tunnel route (which answers
    // with credentials even when no operator wants a tunnel) and to the plain route.
    let held = frame_for(Route::Held, &token, &token.secret, edge, now_ms());
    for path in [
        proto::tunnel::TUNNEL_REQUEST_PATH,
        proto::wire::CHECKIN_PATH,
    ] {
        let (s, body) = raw_to(&cp, path, held.clone()).await;
        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        assert_eq!(
            (s, v["code"].as_str()),
            (StatusCode::UNAUTHORIZED, Some("bad_proof")),
            "{path}: {v}"
        );
    }
    assert_eq!(cp.metric(issued).await, before, "no credentials issued");
    // The same request signed for the tunnel route gets credentials there.
    let ask = frame_for(Route::Tunnel, &token, &token.secret, edge, now_ms() + 1);
    let (s, body) = raw_to(&cp, proto::tunnel::TUNNEL_REQUEST_PATH, ask).await;
    assert_eq!(s, StatusCode::OK);
    let answer: proto::wire::CheckinAnswer =
        proto::codec::decode(&body, proto::codec::MAX_CONTROL_FRAME).unwrap();
    assert_eq!(answer.status, EdgeStatus::Required);
    assert!(answer.tunnel.is_some());
    assert_eq!(env(&cp, id).await["edgeId"], edge.to_string());
    cp.stop().await;
}
