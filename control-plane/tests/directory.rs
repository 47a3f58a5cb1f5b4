#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The admin list and summary served from each replica's environment index (two replicas on
//! one real `redis-server`): what one replica creates, changes and deletes, and what agents
//! checking in at the other do, shows in lists, filters and counts on both.

use std::time::Duration;

use edge_agent::{PollClient, PollOptions};
use proto::JoinToken;
use serde_json::{json, Value};
use testkit::{eventually, http, ControlPlane, RedisServer, ADMIN_KEY};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(20);

async fn admin(cp: &ControlPlane, method: reqwest::Method, path: &str, body: Value) -> Value {
    let (status, answer) = testkit::api::admin_json(&http(), method, &cp.api(path), &body).await;
    assert!(status.is_success(), "{path}: {status}");
    answer
}

/// The ids a list answers, and its `X-Total-Count`.
async fn list(cp: &ControlPlane, query: &str) -> (Vec<u64>, usize) {
    let r = http()
        .get(cp.api(&format!("/api/endpoints?{query}")))
        .header("X-API-Key", ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{query}");
    let total = r.headers()["x-total-count"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let items: Vec<Value> = r.json().await.unwrap();
    (
        items.iter().map(|e| e["id"].as_u64().unwrap()).collect(),
        total,
    )
}

async fn summary(cp: &ControlPlane) -> Value {
    let r = http()
        .get(cp.api("/api/endpoints/summary"))
        .header("X-API-Key", ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

#[actix_web::test]
async fn lists_and_counts_follow_changes_and_check_ins_on_every_replica() {
    let redis = RedisServer::start();
    let a = ControlPlane::replica(&redis, None).await;
    let b = ControlPlane::replica(&redis, Some(&a)).await;

    let group = admin(
        &a,
        reqwest::Method::POST,
        "/api/groups",
        json!({"name": "shops"}),
    )
    .await;
    let group = group["id"].as_u64().unwrap();
    let tag = admin(
        &a,
        reqwest::Method::POST,
        "/api/tags",
        json!({"name": "lte"}),
    )
    .await;
    let tag = tag["id"].as_u64().unwrap();
    let mut ids = Vec::new();
    let mut tokens = Vec::new();
    for i in 0..6 {
        let body = match i {
            0 | 1 => json!({"name": format!("pos-{i}"), "groupId": group, "checkinInterval": 1}),
            2 => json!({"name": "pos-2", "tagIds": [tag], "checkinInterval": 1}),
            3 => json!({"name": "sat-3", "mode": "async", "groupId": group}),
            _ => json!({"name": format!("kiosk-{i}")}),
        };
        let env = admin(&a, reqwest::Method::POST, "/api/endpoints", body).await;
        ids.push(env["id"].as_u64().unwrap());
        tokens.push(JoinToken::parse(env["edgeKey"].as_str().unwrap()).unwrap());
    }

    // The replica that created them lists them at once (it notes its own writes); the other
    // once the notifications arrive. Both the same way.
    assert_eq!(list(&a, "").await, (ids.clone(), 6));
    eventually(WAIT, "b lists all six", || async {
        (list(&b, "").await == (ids.clone(), 6)).then_some(())
    })
    .await;
    for cp in [&a, &b] {
        assert_eq!(list(cp, &format!("groupId={group}")).await.1, 3);
        assert_eq!(list(cp, &format!("tagIds={tag}")).await.0, vec![ids[2]]);
        assert_eq!(list(cp, "mode=async").await.0, vec![ids[3]]);
        assert_eq!(list(cp, "search=KIOSK").await.0, vec![ids[4], ids[5]]);
        assert_eq!(
            list(cp, "status=never&start=1&limit=2").await,
            (ids[1..3].to_vec(), 6)
        );
        let s = summary(cp).await;
        assert_eq!(s["total"], 6);
        assert_eq!(s["status"], json!({"up": 0, "down": 0, "never": 6}));
        assert_eq!(s["mode"], json!({"standard": 5, "async": 1}));
        assert_eq!(s["groups"][group.to_string()]["never"], 3);
        assert_eq!(s["groups"]["0"]["never"], 3);
    }

    // Two agents check in at B (one second apart): `up` on both replicas, B from its own
    // memory, A from the store once B's heartbeats are written and A refreshes.
    let mut agents = Vec::new();
    for i in [0, 2] {
        let token = JoinToken {
            api_url: b.url.clone(),
            ..tokens[i].clone()
        };
        let mut client = PollClient::new(&token, PollOptions::new(Uuid::new_v4())).unwrap();
        client.checkin().await.unwrap();
        agents.push(client);
    }
    for cp in [&b, &a] {
        eventually(WAIT, "two up", || async {
            (list(cp, "status=up").await == (vec![ids[0], ids[2]], 2)).then_some(())
        })
        .await;
        assert_eq!(
            list(cp, &format!("status=up,never&groupId={group}"))
                .await
                .1,
            3
        );
        assert_eq!(
            summary(cp).await["status"],
            json!({"up": 2, "down": 0, "never": 4})
        );
    }

    // A renames one and deletes another; B follows.
    admin(
        &a,
        reqwest::Method::PATCH,
        &format!("/api/endpoints/{}", ids[5]),
        json!({"name": "pos-5"}),
    )
    .await;
    let r = http()
        .delete(a.api(&format!("/api/endpoints/{}", ids[4])))
        .header("X-API-Key", ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    assert_eq!(list(&a, "search=kiosk").await.1, 0);
    eventually(WAIT, "b follows the rename and the delete", || async {
        let (found, total) = list(&b, "search=pos-5").await;
        (found == vec![ids[5]] && total == 1 && list(&b, "").await.1 == 5).then_some(())
    })
    .await;

    // The agent at interval 1 stops: `down` on both once its grace (2 × 1 s + 20 s) is over,
    // while the other keeps checking in.
    drop(agents.remove(0));
    let keep = tokio::spawn({
        let mut client = agents.remove(0);
        async move {
            loop {
                let _ = client.checkin().await;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    });
    for cp in [&a, &b] {
        eventually(Duration::from_secs(40), "one down", || async {
            (list(cp, "status=down").await == (vec![ids[0]], 1)).then_some(())
        })
        .await;
        assert_eq!(list(cp, "status=up").await.0, vec![ids[2]]);
        assert_eq!(
            summary(cp).await["status"],
            json!({"up": 1, "down": 1, "never": 3})
        );
    }
    keep.abort();
}
