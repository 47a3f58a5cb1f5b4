#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Edge groups through the admin API (embedded store; both stores keep them alike, see the
//! store's conformance suite): static and dynamic membership, what follows changes on its
//! own, and what is refused.

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use testkit::{http, ControlPlane};

async fn call(cp: &ControlPlane, method: Method, path: &str, body: Value) -> (StatusCode, Value) {
    testkit::api::admin_json(&http(), method, &cp.api(path), &body).await
}

/// A GET: the status, the JSON answer and `X-Total-Count`.
async fn get(cp: &ControlPlane, path: &str) -> (StatusCode, Value, Option<u64>) {
    testkit::api::admin_get(&http(), &cp.api(path)).await
}

async fn create(cp: &ControlPlane, path: &str, body: Value) -> u64 {
    let (s, v) = call(cp, Method::POST, path, body).await;
    assert_eq!(s, StatusCode::CREATED, "{path}: {v}");
    v["id"].as_u64().unwrap()
}

/// The ids of the group's current members, and the total it reports.
async fn members(cp: &ControlPlane, group: u64, query: &str) -> (Vec<u64>, u64) {
    let (s, v, total) = get(cp, &format!("/api/edge_groups/{group}/environments{query}")).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let ids = v
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_u64().unwrap())
        .collect();
    (ids, total.unwrap())
}

fn message(v: &Value) -> String {
    v["message"].as_str().unwrap_or_default().to_owned()
}

#[actix_web::test]
async fn dynamic_groups_follow_tags_and_static_groups_lose_deleted_environments() {
    let cp = ControlPlane::start().await;
    let kiosk = create(&cp, "/api/tags", json!({"name": "kiosk"})).await;
    let lobby = create(&cp, "/api/tags", json!({"name": "lobby"})).await;
    let a = create(
        &cp,
        "/api/endpoints",
        json!({"name": "a", "tagIds": [kiosk]}),
    )
    .await;
    let b = create(
        &cp,
        "/api/endpoints",
        json!({"name": "b", "tagIds": [kiosk, lobby]}),
    )
    .await;
    let c = create(
        &cp,
        "/api/endpoints",
        json!({"name": "c", "tagIds": [lobby]}),
    )
    .await;
    let d = create(&cp, "/api/endpoints", json!({"name": "d"})).await;

    // Dynamic: any of the tags, or all of them.
    let any = create(
        &cp,
        "/api/edge_groups",
        json!({"name": "kiosks or lobbies", "dynamic": true, "tagIds": [kiosk, lobby], "match": "any"}),
    )
    .await;
    let all = create(
        &cp,
        "/api/edge_groups",
        json!({"name": "lobby kiosks", "dynamic": true, "tagIds": [lobby, kiosk], "match": "all"}),
    )
    .await;
    assert_eq!(members(&cp, any, "").await, (vec![a, b, c], 3));
    assert_eq!(members(&cp, all, "").await, (vec![b], 1));
    // Pages of members, with the total.
    assert_eq!(members(&cp, any, "?start=1&limit=1").await, (vec![b], 3));

    // Tags change, membership follows without touching the groups.
    let (s, v) = call(
        &cp,
        Method::PATCH,
        &format!("/api/endpoints/{d}"),
        json!({"tagIds": [lobby, kiosk]}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = call(
        &cp,
        Method::PATCH,
        &format!("/api/endpoints/{b}"),
        json!({"tagIds": []}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(members(&cp, any, "").await, (vec![a, c, d], 3));
    assert_eq!(members(&cp, all, "").await, (vec![d], 1));

    // A group's tags count as its environments' own, and follow changes to the group.
    let shops = create(
        &cp,
        "/api/groups",
        json!({"name": "shops", "tagIds": [lobby]}),
    )
    .await;
    let e = create(
        &cp,
        "/api/endpoints",
        json!({"name": "e", "groupId": shops}),
    )
    .await;
    assert_eq!(members(&cp, any, "").await, (vec![a, c, d, e], 4));
    assert_eq!(members(&cp, all, "").await, (vec![d], 1));
    let (s, v) = call(
        &cp,
        Method::PATCH,
        &format!("/api/groups/{shops}"),
        json!({"tagIds": [lobby, kiosk]}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let mut both = vec![kiosk, lobby];
    both.sort_unstable();
    assert_eq!(v["tagIds"], json!(both));
    assert_eq!(members(&cp, all, "").await, (vec![d, e], 2));
    let (s, v) = call(
        &cp,
        Method::PATCH,
        &format!("/api/groups/{shops}"),
        json!({"tagIds": []}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(members(&cp, any, "").await, (vec![a, c, d], 3));
    let (s, _) = call(
        &cp,
        Method::DELETE,
        &format!("/api/endpoints/{e}"),
        Value::Null,
    )
    .await;
    assert_eq!(s, StatusCode::NO_CONTENT);

    // Static: the listed environments; unknown ones are refused by id.
    let (s, v) = call(
        &cp,
        Method::POST,
        "/api/edge_groups",
        json!({"name": "tills", "environmentIds": [a, 999_999]}),
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert!(message(&v).contains("999999"), "{v}");
    let tills = create(
        &cp,
        "/api/edge_groups",
        json!({"name": "tills", "environmentIds": [c, a, c]}),
    )
    .await;
    let (s, g, _) = get(&cp, &format!("/api/edge_groups/{tills}")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(g["environmentIds"], json!([a, c]));
    assert_eq!(g["dynamic"], json!(false));
    assert_eq!(members(&cp, tills, "").await, (vec![a, c], 2));

    // A deleted environment leaves every group: the static one's list, the dynamic one's
    // members.
    let (s, _) = call(
        &cp,
        Method::DELETE,
        &format!("/api/endpoints/{c}"),
        Value::Null,
    )
    .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (_, g, _) = get(&cp, &format!("/api/edge_groups/{tills}")).await;
    assert_eq!(g["environmentIds"], json!([a]));
    assert_eq!(members(&cp, tills, "").await, (vec![a], 1));
    assert_eq!(members(&cp, any, "").await, (vec![a, d], 2));

    // Neither can a tag of a group.
    let (s, v) = call(
        &cp,
        Method::PATCH,
        &format!("/api/groups/{shops}"),
        json!({"tagIds": [kiosk]}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = call(
        &cp,
        Method::DELETE,
        &format!("/api/tags/{kiosk}"),
        Value::Null,
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    let (s, v) = call(
        &cp,
        Method::DELETE,
        &format!("/api/groups/{shops}"),
        Value::Null,
    )
    .await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{v}");

    // A tag that selects a group's members cannot be deleted from under it.
    let (s, v) = call(
        &cp,
        Method::PATCH,
        &format!("/api/endpoints/{d}"),
        json!({"tagIds": []}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = call(
        &cp,
        Method::PATCH,
        &format!("/api/endpoints/{a}"),
        json!({"tagIds": []}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = call(
        &cp,
        Method::DELETE,
        &format!("/api/tags/{lobby}"),
        Value::Null,
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert!(message(&v).contains("lobby kiosks"), "{v}");
    assert_eq!(members(&cp, any, "").await, (vec![], 0));

    // Changing a group: its kind, its tags, its name.
    let (s, v) = call(
        &cp,
        Method::PATCH,
        &format!("/api/edge_groups/{all}"),
        json!({"dynamic": false, "environmentIds": [a, d]}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(
        (v["tagIds"].clone(), v["environmentIds"].clone()),
        (json!([]), json!([a, d]))
    );
    let (s, _) = call(
        &cp,
        Method::DELETE,
        &format!("/api/tags/{lobby}"),
        Value::Null,
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT, "still selects the first group");
    let (s, v) = call(
        &cp,
        Method::PATCH,
        &format!("/api/edge_groups/{any}"),
        json!({"tagIds": [kiosk], "name": "kiosks"}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["name"], "kiosks");
    let (s, v) = call(
        &cp,
        Method::DELETE,
        &format!("/api/tags/{lobby}"),
        Value::Null,
    )
    .await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{v}");

    // The list pages through the groups, with the total.
    let (s, v, total) = get(&cp, "/api/edge_groups?start=1&limit=1").await;
    assert_eq!((s, total), (StatusCode::OK, Some(3)));
    assert_eq!(v[0]["id"].as_u64(), Some(all));

    // Deleted: gone.
    let (s, _) = call(
        &cp,
        Method::DELETE,
        &format!("/api/edge_groups/{tills}"),
        Value::Null,
    )
    .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _, _) = get(&cp, &format!("/api/edge_groups/{tills}")).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _, _) = get(&cp, &format!("/api/edge_groups/{tills}/environments")).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    cp.stop().await;
}

#[actix_web::test]
async fn bad_edge_groups_get_a_clear_4xx_and_change_nothing() {
    let cp = ControlPlane::start().await;
    let tag = create(&cp, "/api/tags", json!({"name": "t"})).await;
    create(&cp, "/api/edge_groups", json!({"name": "taken"})).await;
    for (body, status, says) in [
        (
            json!({"dynamic": true, "tagIds": [tag]}),
            StatusCode::BAD_REQUEST,
            "name is required",
        ),
        (
            json!({"name": " "}),
            StatusCode::BAD_REQUEST,
            "name must be",
        ),
        (
            json!({"name": "d", "dynamic": true}),
            StatusCode::BAD_REQUEST,
            "tagIds",
        ),
        (
            json!({"name": "d", "dynamic": true, "tagIds": [tag], "environmentIds": [1]}),
            StatusCode::BAD_REQUEST,
            "no environmentIds",
        ),
        (
            json!({"name": "s", "tagIds": [tag]}),
            StatusCode::BAD_REQUEST,
            "no tagIds",
        ),
        (
            json!({"name": "d", "dynamic": true, "tagIds": [424_242]}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "424242",
        ),
        (
            json!({"name": "d", "dynamic": true, "tagIds": [tag], "match": "most"}),
            StatusCode::BAD_REQUEST,
            "expected `any` or `all`",
        ),
        (
            json!({"name": "d", "colour": "red"}),
            StatusCode::BAD_REQUEST,
            "colour",
        ),
        (
            json!({"name": "taken"}),
            StatusCode::CONFLICT,
            "already exists",
        ),
    ] {
        let (s, v) = call(&cp, Method::POST, "/api/edge_groups", body.clone()).await;
        assert_eq!(s, status, "{body}: {v}");
        assert!(message(&v).contains(says), "{body}: {v}");
    }
    let (_, _, total) = get(&cp, "/api/edge_groups").await;
    assert_eq!(total, Some(1), "nothing was created");
    for (path, status) in [
        ("/api/edge_groups?limit=0", StatusCode::BAD_REQUEST),
        ("/api/edge_groups?start=x", StatusCode::BAD_REQUEST),
        ("/api/edge_groups/77", StatusCode::NOT_FOUND),
        ("/api/edge_groups/77/environments", StatusCode::NOT_FOUND),
    ] {
        let (s, v, _) = get(&cp, path).await;
        assert_eq!(s, status, "{path}: {v}");
    }
    let (s, _) = call(
        &cp,
        Method::PATCH,
        "/api/edge_groups/77",
        json!({"name": "x"}),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = call(&cp, Method::DELETE, "/api/edge_groups/77", Value::Null).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    cp.stop().await;
}
