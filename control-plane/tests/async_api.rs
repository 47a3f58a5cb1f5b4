#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The async route (`/edge/a`) against an in-process control plane, with the agent crate's
//! own client: snapshots as full, delta and unchanged reports, the server asking for a full
//! one when it cannot apply a report, command delivery and results, and bad input that must
//! change nothing.

use std::collections::BTreeMap;

use edge_agent::client::AsyncTick;
use edge_agent::{CheckinError, PollClient, PollOptions, RefusalCode};
use proto::async_mode::{
    Action, AsyncIntervals, AsyncRequest, CommandResult, SnapshotReport, ASYNC_PATH,
};
use proto::proof::{self, ProofKey, Route};
use proto::snapshot::{self, Container, Snapshot};
use proto::wire::CheckinRequest;
use proto::JoinToken;
use reqwest::StatusCode;
use serde_json::{json, Value};
use testkit::{http, ControlPlane, ADMIN_KEY};
use uuid::Uuid;

async fn create(cp: &ControlPlane, body: Value) -> (u64, JoinToken) {
    testkit::create_env(&cp.url, body).await
}

fn engine(states: &[(&str, &str)], taken_ms: u64) -> Snapshot {
    let mut s = Snapshot {
        taken_ms,
        containers: states
            .iter()
            .map(|(name, state)| Container {
                id: format!("{name:0>64}"),
                names: vec![format!("/{name}")],
                image: "busybox".into(),
                state: (*state).into(),
                labels: BTreeMap::from([("app".to_owned(), "shop".to_owned())]),
                ..Container::default()
            })
            .collect(),
        ..Snapshot::default()
    };
    s.normalise();
    s
}

async fn stored_containers(cp: &ControlPlane, id: u64) -> Vec<(String, String)> {
    let url = cp.api(&format!("/api/endpoints/{id}/snapshot?section=containers"));
    let (status, v, _) = testkit::api::admin_get(&http(), &url).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    v["snapshot"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["names"][0].as_str().unwrap().to_owned(),
                c["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn tick(report: Option<SnapshotReport>) -> AsyncTick {
    AsyncTick {
        snapshot: report,
        ..AsyncTick::default()
    }
}

fn fetch(done_through: u64, results: Vec<CommandResult>) -> AsyncTick {
    AsyncTick {
        snapshot: None,
        results,
        done_through: Some(done_through),
    }
}

/// A page of `GET /commands`: (id, state) of each, and `X-Total-Count`.
async fn list_commands(cp: &ControlPlane, id: u64, query: &str) -> (Vec<(u64, String)>, u64) {
    let r = http()
        .get(cp.api(&format!("/api/endpoints/{id}/commands?{query}")))
        .header("X-API-Key", ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let total = r.headers()["x-total-count"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let page: Vec<Value> = r.json().await.unwrap();
    let page = page
        .iter()
        .map(|c| {
            (
                c["id"].as_u64().unwrap(),
                c["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    (page, total)
}

async fn queue(cp: &ControlPlane, id: u64, body: Value) -> (StatusCode, Value) {
    let r = http()
        .post(cp.api(&format!("/api/endpoints/{id}/commands")))
        .header("X-API-Key", ADMIN_KEY)
        .json(&body)
        .send()
        .await
        .unwrap();
    let s = r.status();
    (s, r.json().await.unwrap())
}

#[actix_web::test]
async fn snapshots_travel_as_deltas_and_commands_are_handed_out_until_done() {
    let cp = ControlPlane::start().await;
    let (id, token) = create(
        &cp,
        json!({"name": "metered", "mode": "async", "pingInterval": 7, "snapshotInterval": 11, "commandInterval": 0}),
    )
    .await;
    let mut client = PollClient::new(&token, PollOptions::new(Uuid::new_v4())).unwrap();

    // Full: stored and acknowledged, with the environment's intervals.
    let a = engine(&[("web", "running"), ("db", "running")], 1_000);
    let full = SnapshotReport::Full(snapshot::compress(&a).unwrap());
    let answer = client.async_tick(&tick(Some(full))).await.unwrap();
    assert_eq!(answer.snapshot_ack, Some(snapshot::digest(&a).unwrap()));
    assert!(!answer.need_full_snapshot);
    assert_eq!(
        answer.intervals,
        AsyncIntervals {
            ping: 7,
            snapshot: 11,
            command: 0
        }
    );
    assert!(answer.commands.is_empty());
    assert_eq!(testkit::get_env(&cp.url, id).await["status"], "up");
    assert_eq!(
        stored_containers(&cp, id).await,
        vec![
            ("db".into(), "running".into()),
            ("web".into(), "running".into())
        ]
    );

    // Delta against it: applied.
    let b = engine(&[("web", "exited"), ("db", "running")], 2_000);
    let delta = snapshot::compress_delta(&snapshot::diff(&a, &b).unwrap()).unwrap();
    let answer = client
        .async_tick(&tick(Some(SnapshotReport::Delta(delta))))
        .await
        .unwrap();
    assert_eq!(answer.snapshot_ack, Some(snapshot::digest(&b).unwrap()));
    assert!(stored_containers(&cp, id)
        .await
        .contains(&("web".into(), "exited".into())));

    // Unchanged: acknowledged again; a stale digest or a delta against an old base asks for
    // a full snapshot and leaves the stored one as it is.
    let digest_b = snapshot::digest(&b).unwrap();
    let answer = client
        .async_tick(&tick(Some(SnapshotReport::Unchanged { digest: digest_b })))
        .await
        .unwrap();
    assert_eq!(
        (answer.snapshot_ack, answer.need_full_snapshot),
        (Some(digest_b), false)
    );
    let stale = SnapshotReport::Unchanged {
        digest: snapshot::digest(&a).unwrap(),
    };
    let answer = client.async_tick(&tick(Some(stale))).await.unwrap();
    assert_eq!(
        (answer.snapshot_ack, answer.need_full_snapshot),
        (None, true)
    );
    let c = engine(&[("web", "running")], 3_000);
    let old_base = snapshot::compress_delta(&snapshot::diff(&a, &c).unwrap()).unwrap();
    let answer = client
        .async_tick(&tick(Some(SnapshotReport::Delta(old_base))))
        .await
        .unwrap();
    assert_eq!(
        (answer.snapshot_ack, answer.need_full_snapshot),
        (None, true)
    );
    assert!(stored_containers(&cp, id)
        .await
        .contains(&("web".into(), "exited".into())));

    // A late full report (taken before the stored one) is not stored, so not acknowledged:
    // an agent must never take as its base what the server does not hold.
    let late = engine(&[("web", "paused")], 1_500);
    let answer = client
        .async_tick(&tick(Some(SnapshotReport::Full(
            snapshot::compress(&late).unwrap(),
        ))))
        .await
        .unwrap();
    assert_eq!(
        (answer.snapshot_ack, answer.need_full_snapshot),
        (None, false)
    );
    assert!(stored_containers(&cp, id)
        .await
        .contains(&("web".into(), "exited".into())));
    assert_eq!(
        cp.metric(r#"edgeplane_async_snapshot_reports_total{kind="full",outcome="kept_newer"}"#)
            .await,
        1.0
    );

    // Commands: handed out after `done_through`, oldest first, until their results arrive.
    let mut ids = Vec::new();
    for target in ["web", "db", "cache"] {
        let (s, v) = queue(&cp, id, json!({"type": "containerStart", "target": target})).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        ids.push(v["id"].as_u64().unwrap());
    }
    let answer = client.async_tick(&fetch(0, vec![])).await.unwrap();
    assert_eq!(
        answer.commands.iter().map(|c| c.id).collect::<Vec<_>>(),
        ids
    );
    assert_eq!(
        answer.commands[0].action,
        Action::ContainerStart {
            container: "web".into()
        }
    );
    let results = vec![
        CommandResult {
            id: ids[0],
            error: None,
        },
        CommandResult {
            id: ids[1],
            error: Some("No such container: db".into()),
        },
    ];
    let answer = client
        .async_tick(&fetch(ids[1], results.clone()))
        .await
        .unwrap();
    assert_eq!(
        answer.commands.iter().map(|c| c.id).collect::<Vec<_>>(),
        vec![ids[2]]
    );
    // The same results again (an answer that was lost): the first ones stay.
    let mut again = results;
    again[1].error = None;
    client.async_tick(&fetch(ids[1], again)).await.unwrap();
    let list: Vec<Value> = http()
        .get(cp.api(&format!("/api/endpoints/{id}/commands")))
        .header("X-API-Key", ADMIN_KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let states: Vec<(u64, &str)> = list
        .iter()
        .map(|c| (c["id"].as_u64().unwrap(), c["state"].as_str().unwrap()))
        .collect();
    assert_eq!(
        states,
        vec![(ids[2], "sent"), (ids[1], "failed"), (ids[0], "succeeded")]
    );
    assert_eq!(list[1]["error"], "No such container: db");
    for (series, want) in [
        (
            r#"edgeplane_async_snapshot_reports_total{kind="full",outcome="stored"}"#,
            1.0,
        ),
        (
            r#"edgeplane_async_snapshot_reports_total{kind="delta",outcome="stored"}"#,
            1.0,
        ),
        (
            r#"edgeplane_async_snapshot_reports_total{kind="delta",outcome="need_full"}"#,
            1.0,
        ),
        (
            r#"edgeplane_async_snapshot_reports_total{kind="unchanged",outcome="need_full"}"#,
            1.0,
        ),
        (r#"edgeplane_async_commands_total{event="queued"}"#, 3.0),
        (r#"edgeplane_async_commands_total{event="delivered"}"#, 5.0),
        (
            r#"edgeplane_async_commands_total{event="result_failed"}"#,
            1.0,
        ),
    ] {
        assert_eq!(cp.metric(series).await, want, "{series}");
    }

    // Modes must match: the standard check-in is refused for this environment, and the async
    // route for a standard one; queueing for a standard one too.
    let refused = client.checkin().await;
    assert!(
        matches!(
            refused,
            Err(CheckinError::Refused {
                status: 409,
                code: RefusalCode::WrongMode,
                ..
            })
        ),
        "{refused:?}"
    );
    let (std_id, std_token) = create(&cp, json!({"name": "standard"})).await;
    let mut std_client = PollClient::new(&std_token, PollOptions::new(Uuid::new_v4())).unwrap();
    let refused = std_client.async_tick(&tick(None)).await;
    assert!(
        matches!(
            refused,
            Err(CheckinError::Refused {
                status: 409,
                code: RefusalCode::WrongMode,
                ..
            })
        ),
        "{refused:?}"
    );
    let (s, v) = queue(
        &cp,
        std_id,
        json!({"type": "containerStart", "target": "x"}),
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert!(
        v["message"].as_str().unwrap().contains("standard mode"),
        "{v}"
    );
    cp.stop().await;
}

#[actix_web::test]
async fn command_ids_keep_growing_and_old_finished_commands_are_dropped() {
    let cp = ControlPlane::start().await;
    let (id, token) = create(&cp, json!({"name": "busy-kiosk", "mode": "async"})).await;
    let mut client = PollClient::new(&token, PollOptions::new(Uuid::new_v4())).unwrap();
    let keep = store::KEEP_FINISHED_COMMANDS_PER_ENV;

    // Ids grow, with gaps, and read as the queue time: ms × 1000 (+ a count within the ms).
    let mut ids = Vec::new();
    for i in 0..keep + 5 {
        let before = now_ms();
        let (s, v) = queue(
            &cp,
            id,
            json!({"type": "containerStart", "target": format!("c{i}")}),
        )
        .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        let cmd = v["id"].as_u64().unwrap();
        assert!(
            ids.last().is_none_or(|&last| cmd > last),
            "{cmd} after {ids:?}"
        );
        assert!(
            cmd / 1000 >= before && cmd / 1000 <= now_ms(),
            "{cmd} at {before}"
        );
        ids.push(cmd);
    }

    // The agent works through them, a page per tick, `done_through` moving up the gaps.
    let mut done_through = 0;
    let mut results = Vec::new();
    loop {
        let answer = client
            .async_tick(&fetch(done_through, std::mem::take(&mut results)))
            .await
            .unwrap();
        if answer.commands.is_empty() {
            break;
        }
        for c in &answer.commands {
            assert!(c.id > done_through);
            done_through = c.id;
            results.push(CommandResult {
                id: c.id,
                error: None,
            });
        }
    }
    assert_eq!(done_through, ids[ids.len() - 1]);
    let (_, total) = list_commands(&cp, id, "limit=1").await;
    assert_eq!(
        total,
        keep + 5,
        "nothing dropped before the next command is queued"
    );

    // Queueing drops the finished ones beyond the newest `keep`; the new one is above all.
    let (s, v) = queue(&cp, id, json!({"type": "containerStop", "target": "web"})).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let newest = v["id"].as_u64().unwrap();
    assert!(newest > done_through);
    let mut want: Vec<u64> = ids[5..].to_vec();
    want.push(newest);
    want.reverse();
    // Pages of 7 over ids with gaps: newest first, meeting without overlap.
    let mut listed = Vec::new();
    let mut start = 0;
    loop {
        let (page, total) = list_commands(&cp, id, &format!("start={start}&limit=7")).await;
        assert_eq!(total, keep + 1);
        if page.is_empty() {
            break;
        }
        start += page.len();
        listed.extend(page);
    }
    assert_eq!(listed.iter().map(|(c, _)| *c).collect::<Vec<_>>(), want);
    assert_eq!(listed[0].1, "pending");
    assert!(listed[1..].iter().all(|(_, state)| state == "succeeded"));

    // The agent, at its `done_through`, gets just the new one.
    let answer = client
        .async_tick(&fetch(done_through, vec![]))
        .await
        .unwrap();
    assert_eq!(
        answer.commands.iter().map(|c| c.id).collect::<Vec<_>>(),
        vec![newest]
    );
    cp.stop().await;
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A signed async request, built by hand.
fn signed(token: &JoinToken, edge: Uuid, snapshot: Option<SnapshotReport>) -> Vec<u8> {
    let ts = now_ms();
    let req = AsyncRequest {
        checkin: CheckinRequest {
            endpoint_id: token.endpoint_id,
            edge_id: Some(edge),
            timestamp_lo: proto::wire::timestamp_lo(ts),
            timestamp_hi: Some((ts >> 32) as u32),
            interval_secs: 60,
            agent: None,
        },
        snapshot,
        results: Vec::new(),
        done_through: None,
    };
    proof::sign(
        &req,
        Route::Async,
        &ProofKey::derive(&token.secret, None),
        &edge,
        ts,
    )
    .unwrap()
}

async fn post(cp: &ControlPlane, body: Vec<u8>) -> (StatusCode, Value) {
    let r = http()
        .post(cp.api(ASYNC_PATH))
        .body(body)
        .send()
        .await
        .unwrap();
    let s = r.status();
    (s, r.json().await.unwrap_or(Value::Null))
}

#[actix_web::test]
async fn corrupt_and_oversized_reports_are_refused_and_change_nothing() {
    let cp = ControlPlane::start().await;
    let (id, token) = create(&cp, json!({"name": "sat-link", "mode": "async"})).await;
    let edge = Uuid::new_v4();
    let a = engine(&[("web", "running")], 1_000);
    let (s, _) = post(
        &cp,
        signed(
            &token,
            edge,
            Some(SnapshotReport::Full(snapshot::compress(&a).unwrap())),
        ),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let before = stored_containers(&cp, id).await;

    let bomb = zstd::bulk::compress(&vec![0u8; snapshot::MAX_SNAPSHOT_BYTES + 1], 3).unwrap();
    for (report, what) in [
        (SnapshotReport::Delta(b"not zstd".to_vec()), "corrupt delta"),
        (SnapshotReport::Full(b"not zstd".to_vec()), "corrupt full"),
        (SnapshotReport::Full(bomb), "decompression bomb"),
        (
            SnapshotReport::Full(zstd::bulk::compress(b"\x01garbage", 3).unwrap()),
            "not a snapshot",
        ),
    ] {
        let (s, v) = post(&cp, signed(&token, edge, Some(report))).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{what}: {v}");
        assert!(
            v["message"].as_str().unwrap().starts_with("snapshot:"),
            "{what}: {v}"
        );
        assert_eq!(stored_containers(&cp, id).await, before, "{what}");
    }
    // Oversized: 413 before anything is read further.
    let (s, v) = post(&cp, vec![7u8; proto::async_mode::MAX_ASYNC_FRAME + 1]).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "{v}");
    // Garbage that is no signed frame at all.
    let (s, v) = post(&cp, b"\x01\x02\x03".to_vec()).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    // A replayed request is refused, and changes nothing either.
    let frame = signed(&token, edge, None);
    assert_eq!(post(&cp, frame.clone()).await.0, StatusCode::OK);
    let (s, v) = post(&cp, frame).await;
    assert_eq!(
        (s, v["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("replay"))
    );
    assert_eq!(stored_containers(&cp, id).await, before);
    assert_eq!(
        cp.metric(r#"edgeplane_async_snapshot_reports_total{kind="full",outcome="bad"}"#)
            .await,
        3.0
    );
    cp.stop().await;
}
