#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Cluster mode: two control-plane replicas share one real `redis-server`. Whatever an admin
//! does on one replica reaches agents that check in at the other.

use std::time::Duration;

use edge_agent::{CheckinError, PollClient, PollOptions, RefusalCode};
use proto::JoinToken;
use reqwest::StatusCode;
use serde_json::{json, Value};
use testkit::RedisServer;
use testkit::{eventually, http, ControlPlane, ADMIN_KEY};
use uuid::Uuid;

async fn env(cp: &ControlPlane, id: u64) -> Value {
    testkit::get_env(&cp.url, id).await
}

/// The agent's token, pointed at replica `cp` (replicas sit behind one URL in production).
fn at(token: &JoinToken, cp: &ControlPlane) -> JoinToken {
    JoinToken {
        api_url: cp.url.clone(),
        ..token.clone()
    }
}

/// Checks in until the given refusal comes back (change notifications are asynchronous).
async fn until_refused(client: &mut PollClient, want: RefusalCode, what: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match client.checkin().await {
            Err(CheckinError::Refused { code, .. }) if code == want => return,
            _ => {}
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[actix_web::test]
async fn changes_on_one_replica_reach_agents_at_another() {
    let redis = RedisServer::start();
    let a = ControlPlane::replica(&redis, None).await;
    let b = ControlPlane::replica(&redis, Some(&a)).await;

    let r = http()
        .post(a.api("/api/endpoints"))
        .header("X-API-Key", ADMIN_KEY)
        .json(&json!({"name": "pos-1", "checkinInterval": 5}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let created: Value = r.json().await.unwrap();
    let id = created["id"].as_u64().unwrap();
    let token = JoinToken::parse(created["edgeKey"].as_str().unwrap()).unwrap();

    // Check in at B: binds in the shared store; A sees the binding and, once B's heartbeat
    // batch is written, the status.
    let edge = Uuid::new_v4();
    let mut agent = PollClient::new(&at(&token, &b), PollOptions::new(edge)).unwrap();
    agent.checkin().await.unwrap();
    assert_eq!(env(&a, id).await["edgeId"], edge.to_string());
    eventually(Duration::from_secs(5), "status up at replica A", || async {
        (env(&a, id).await["status"] == "up").then_some(())
    })
    .await;

    // An impostor at A is refused by the binding B made.
    let mut impostor = PollClient::new(&at(&token, &a), PollOptions::new(Uuid::new_v4())).unwrap();
    match impostor.checkin().await {
        Err(CheckinError::Refused {
            code: RefusalCode::EdgeIdMismatch,
            ..
        }) => {}
        other => panic!("impostor at A: {other:?}"),
    }

    // Settings changed on A: B's next answer carries the new default interval.
    let r = http()
        .patch(a.api(&format!("/api/endpoints/{id}")))
        .header("X-API-Key", ADMIN_KEY)
        .json(&json!({"checkinInterval": 11}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while agent.checkin().await.unwrap().interval != Duration::from_secs(11) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "B never answered the interval set on A"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Association reset on A: B refuses the old key without a restart.
    let r = http()
        .post(a.api(&format!("/api/endpoints/{id}/association")))
        .header("X-API-Key", ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let new_token = JoinToken::parse(
        r.json::<Value>().await.unwrap()["edgeKey"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    until_refused(&mut agent, RefusalCode::BadProof, "B refuses the old key").await;
    let fresh = Uuid::new_v4();
    PollClient::new(&at(&new_token, &b), PollOptions::new(fresh))
        .unwrap()
        .checkin()
        .await
        .unwrap();
    assert_eq!(env(&a, id).await["edgeId"], fresh.to_string());

    // Deleted on B: A refuses check-ins for it.
    let r = http()
        .delete(b.api(&format!("/api/endpoints/{id}")))
        .header("X-API-Key", ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let mut late = PollClient::new(&at(&new_token, &a), PollOptions::new(fresh)).unwrap();
    until_refused(
        &mut late,
        RefusalCode::UnknownEnvironment,
        "A refuses a deleted environment",
    )
    .await;

    a.stop().await;
    b.stop().await;
}
