#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The whole standard-mode story with the real `control-plane` binary and the real agent loop:
//! enrol, bind, refuse an impostor, restart the control plane, stop the agent, see it go down.

use std::time::Duration;

use edge_agent::{CheckinError, PollClient, PollOptions, RefusalCode};
use proto::JoinToken;
use reqwest::StatusCode;
use serde_json::{json, Value};
use testkit::{eventually, http, Agent, CpProcess, ADMIN_KEY};
use uuid::Uuid;

async fn env(url: &str, id: u64) -> Value {
    testkit::get_env(url, id).await
}

async fn impostor_refused(token: &JoinToken) {
    let mut c = PollClient::new(token, PollOptions::new(Uuid::new_v4())).unwrap();
    match c.checkin().await {
        Err(CheckinError::Refused {
            status: 403,
            code: RefusalCode::EdgeIdMismatch,
            ..
        }) => {}
        other => panic!("impostor not refused: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrol_bind_restart_and_go_down() {
    testkit::api::install_crypto();
    let data = tempfile::tempdir().unwrap();
    let agent_dir = tempfile::tempdir().unwrap();
    let cp = CpProcess::spawn(data.path(), &[]).await;

    // Without the key: refused.
    let r = http().get(cp.api("/api/endpoints")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);

    let interval = 1u64;
    let r = http()
        .post(cp.api("/api/endpoints"))
        .header("X-API-Key", ADMIN_KEY)
        .json(&json!({"name": "kiosk-7", "checkinInterval": interval}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let created: Value = r.json().await.unwrap();
    let id = created["id"].as_u64().unwrap();
    let key = created["edgeKey"].as_str().unwrap().to_owned();

    // The real agent loop, with an Edge ID it generates and persists itself.
    let agent = Agent::start(edge_agent::Args {
        edge_key: Some(key.clone()),
        data_dir: Some(agent_dir.path().to_owned()),
        ..Default::default()
    });
    let edge_id = eventually(
        Duration::from_secs(2 * interval + 5),
        "agent up",
        || async {
            let e = env(&cp.url, id).await;
            (e["status"] == "up").then(|| e["edgeId"].as_str().unwrap().to_owned())
        },
    )
    .await;
    let persisted = std::fs::read_to_string(agent_dir.path().join("edge_id")).unwrap();
    assert_eq!(
        persisted.trim(),
        edge_id,
        "the agent's persisted ID is the bound one"
    );

    let token = JoinToken::parse(&key).unwrap();
    impostor_refused(&token).await;

    // The binary's allocator counts itself on /metrics: what the program holds, within the
    // pages it uses; something resident.
    let samples = testkit::api::metric_samples(&cp.metrics_url).await;
    let m = testkit::api::allocator_bytes(&samples);
    let kind = |k: &str| m.get(k).copied();
    let (allocated, active, resident) = (kind("allocated"), kind("active"), kind("resident"));
    let (Some(allocated), Some(active), Some(resident)) = (allocated, active, resident) else {
        panic!("no allocator counts on /metrics: {m:?}");
    };
    assert!(
        0.0 < allocated && allocated <= active && 0.0 < resident,
        "allocated {allocated}, active {active}, resident {resident}"
    );

    // Restart the control plane on the same data dir: environment, binding and refusal hold,
    // and the agent (which kept retrying meanwhile) is up again.
    cp.stop();
    let cp = CpProcess::spawn_on_same_ports(data.path(), &token).await;
    let e = env(&cp.url, id).await;
    assert_eq!(e["name"], "kiosk-7");
    assert_eq!(e["edgeId"], edge_id.as_str());
    assert_eq!(
        e["edgeKey"],
        key.as_str(),
        "the join token is stable across restarts"
    );
    impostor_refused(&token).await;
    eventually(
        Duration::from_secs(10),
        "agent checks in after the restart",
        || async {
            let e = env(&cp.url, id).await;
            let fresh = e["lastCheckIn"].as_str().is_some_and(|t| {
                let t =
                    time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
                        .unwrap();
                time::OffsetDateTime::now_utc() - t < time::Duration::seconds(3)
            });
            fresh.then_some(())
        },
    )
    .await;

    // Stop the agent: down after 2 * interval + 20 s.
    assert!(agent.stop().await, "the agent stops cleanly");
    eventually(
        Duration::from_secs(2 * interval + 20 + 10),
        "environment down",
        || async { (env(&cp.url, id).await["status"] == "down").then_some(()) },
    )
    .await;
    cp.stop();
}

/// A graceful stop with tunnels open on the embedded gateway (whose tunnels run on the API's
/// worker threads): a Docker call in flight through a tunnel is answered to its last byte,
/// then the tunnels close and the process exits, without waiting out the grace for the
/// engine connections kept idle for the next call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_lets_docker_calls_through_tunnels_finish() {
    const BYTES: usize = 32 * 1024 * 1024;
    let engine = testkit::mini_engine::start();
    let data = tempfile::tempdir().unwrap();
    let tunnel_port = testkit::free_port();
    let mut cp = CpProcess::spawn(
        data.path(),
        &["--tunnel-addr", &format!("127.0.0.1:{tunnel_port}")],
    )
    .await;
    let (id, key) =
        testkit::api::create_env_key(&cp.url, json!({ "name": "stopping", "checkinInterval": 1 }))
            .await;
    let _agent = Agent::standard(&key, &format!("tcp://{engine}"), "5m");
    eventually(Duration::from_secs(15), "agent up", || async {
        (env(&cp.url, id).await["status"] == "up").then_some(())
    })
    .await;
    // The tunnel opens; this call's engine connection is kept for the next one.
    let (status, body) = testkit::api::docker_get(&cp.url, id, "/_ping").await;
    assert_eq!((status, body.as_str()), (200, "OK"));

    let mut answer = http()
        .get(cp.api(&format!("/api/endpoints/{id}/docker/bulk?bytes={BYTES}")))
        .header("X-API-Key", ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    let mut received = answer.chunk().await.unwrap().map_or(0, |c| c.len());
    assert!(received > 0 && received < BYTES);

    let stopped_at = std::time::Instant::now();
    cp.sigterm();
    loop {
        match answer.chunk().await {
            Ok(Some(chunk)) => received += chunk.len(),
            Ok(None) => break,
            Err(e) => panic!("the call in flight was cut after {received} bytes: {e}"),
        }
    }
    assert_eq!(received, BYTES, "the call in flight was cut");
    let status = tokio::task::spawn_blocking(move || cp.exited_within(Duration::from_secs(30)))
        .await
        .unwrap()
        .expect("the control plane did not exit");
    assert!(status.success(), "{status}");
    // The drain waits for calls, not for the idle engine connections (10 s grace).
    assert!(
        stopped_at.elapsed() < Duration::from_secs(9),
        "stopping took {:?}",
        stopped_at.elapsed()
    );
}
