#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The admin REST API against an in-process control plane on the embedded store.

use reqwest::StatusCode;
use serde_json::{json, Value};
use testkit::{http, ControlPlane, ADMIN_KEY};

async fn post(cp: &ControlPlane, path: &str, body: Value) -> (StatusCode, Value) {
    let r = http()
        .post(cp.api(path))
        .header("X-API-Key", ADMIN_KEY)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn get(cp: &ControlPlane, path: &str) -> (StatusCode, Value, Option<String>) {
    let r = http()
        .get(cp.api(path))
        .header("X-API-Key", ADMIN_KEY)
        .send()
        .await
        .unwrap();
    let status = r.status();
    let total = r
        .headers()
        .get("x-total-count")
        .map(|v| v.to_str().unwrap().to_owned());
    (status, r.json().await.unwrap_or(Value::Null), total)
}

fn message(v: &Value) -> &str {
    v["message"]
        .as_str()
        .unwrap_or_else(|| panic!("no message in {v}"))
}

#[actix_web::test]
async fn every_admin_route_requires_the_key() {
    let cp = ControlPlane::start().await;
    let client = http();
    assert!(control_plane::api::ROUTES.len() >= 19);
    for route in control_plane::api::ROUTES {
        let url = cp.api(&route.path.replace("{id}", "1"));
        let method = reqwest::Method::from_bytes(route.method.as_bytes()).unwrap();
        for key in [None, Some("wrong"), Some("")] {
            let mut req = client.request(method.clone(), &url);
            if let Some(k) = key {
                req = req.header("X-API-Key", k);
            }
            let r = req.send().await.unwrap();
            assert_eq!(
                r.status(),
                StatusCode::UNAUTHORIZED,
                "{} {} with key {key:?}",
                route.method,
                route.path
            );
            let body: Value = r.json().await.unwrap();
            assert!(message(&body).contains("API key") || message(&body).contains("X-API-Key"));
        }
    }
    // Unknown admin paths are refused before they are routed, too.
    let r = client.get(cp.api("/api/nope")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    // The OpenAPI document lists exactly the route table.
    let (status, doc, _) = get(&cp, "/api/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    let n: usize = doc["paths"]
        .as_object()
        .unwrap()
        .values()
        .map(|p| p.as_object().unwrap().len())
        .sum();
    assert_eq!(n, control_plane::api::ROUTES.len());
    cp.stop().await;
}

#[actix_web::test]
async fn create_get_patch_delete() {
    let cp = ControlPlane::start().await;
    let (status, env) = post(
        &cp,
        "/api/endpoints",
        json!({"name": "kiosk-1", "checkinInterval": 7}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{env}");
    let id = env["id"].as_u64().unwrap();
    assert_eq!(env["name"], "kiosk-1");
    assert_eq!(env["mode"], "standard");
    assert_eq!(env["status"], "never");
    assert_eq!(env["edgeId"], Value::Null);
    assert_eq!(env["lastCheckIn"], Value::Null);
    assert_eq!(env["checkinInterval"], 7);
    assert_eq!(env["tunnel"]["state"], "closed");
    let token = proto::JoinToken::parse(env["edgeKey"].as_str().unwrap()).unwrap();
    assert_eq!(token.endpoint_id, id);
    assert_eq!(token.api_url, cp.url);

    let (status, got, _) = get(&cp, &format!("/api/endpoints/{id}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(got["edgeKey"], env["edgeKey"]);

    let r = http()
        .patch(cp.api(&format!("/api/endpoints/{id}")))
        .header("X-API-Key", ADMIN_KEY)
        .json(&json!({"name": "kiosk-one", "checkinInterval": null}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let patched: Value = r.json().await.unwrap();
    assert_eq!(patched["name"], "kiosk-one");
    assert_eq!(
        patched["checkinInterval"], 5,
        "null falls back to the default"
    );

    // A pre-assigned Edge ID is bound from the start.
    let edge = uuid::Uuid::new_v4();
    let (status, pre) = post(
        &cp,
        "/api/endpoints",
        json!({"name": "pre", "edgeId": edge}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(pre["edgeId"], edge.to_string());

    let r = http()
        .delete(cp.api(&format!("/api/endpoints/{id}")))
        .header("X-API-Key", ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let (status, body, _) = get(&cp, &format!("/api/endpoints/{id}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(message(&body).contains("does not exist"));
    cp.stop().await;
}

#[actix_web::test]
async fn bad_input_gets_a_clear_4xx_and_changes_nothing() {
    let cp = ControlPlane::start().await;
    let client = http();
    let cases: Vec<(&str, &str, Option<&str>, StatusCode, &str)> = vec![
        (
            "POST",
            "/api/endpoints",
            Some("{not json"),
            StatusCode::BAD_REQUEST,
            "invalid JSON",
        ),
        (
            "POST",
            "/api/endpoints",
            Some(r#"{"name": "x", "bogus": 1}"#),
            StatusCode::BAD_REQUEST,
            "bogus",
        ),
        (
            "POST",
            "/api/endpoints",
            Some(r#"{"name": "  "}"#),
            StatusCode::BAD_REQUEST,
            "name",
        ),
        (
            "POST",
            "/api/endpoints",
            Some(r#"{"name": "x", "checkinInterval": 0}"#),
            StatusCode::BAD_REQUEST,
            "checkinInterval",
        ),
        (
            "POST",
            "/api/endpoints",
            Some(r#"{"name": "x", "groupId": 99}"#),
            StatusCode::BAD_REQUEST,
            "groupId 99",
        ),
        (
            "POST",
            "/api/endpoints",
            Some(r#"{"name": "x", "tagIds": [5]}"#),
            StatusCode::BAD_REQUEST,
            "tagId 5",
        ),
        (
            "POST",
            "/api/endpoints",
            Some(r#"{"name": "x", "edgeId": "not-a-uuid"}"#),
            StatusCode::BAD_REQUEST,
            "invalid JSON",
        ),
        (
            "POST",
            "/api/endpoints",
            Some(r#"{"name": "x", "mode": "turbo"}"#),
            StatusCode::BAD_REQUEST,
            "invalid JSON",
        ),
        (
            "POST",
            "/api/endpoints",
            Some(r#"{"name": "x", "envVars": ["A B"]}"#),
            StatusCode::BAD_REQUEST,
            "envVars",
        ),
        (
            "POST",
            "/api/endpoints/bulk",
            Some("[]"),
            StatusCode::BAD_REQUEST,
            "empty",
        ),
        (
            "GET",
            "/api/endpoints/999",
            None,
            StatusCode::NOT_FOUND,
            "999",
        ),
        (
            "GET",
            "/api/endpoints/abc",
            None,
            StatusCode::NOT_FOUND,
            "path",
        ),
        (
            "PATCH",
            "/api/endpoints/999",
            Some(r#"{"name": "y"}"#),
            StatusCode::NOT_FOUND,
            "999",
        ),
        (
            "DELETE",
            "/api/endpoints/999",
            None,
            StatusCode::NOT_FOUND,
            "999",
        ),
        (
            "POST",
            "/api/endpoints/999/association",
            None,
            StatusCode::NOT_FOUND,
            "999",
        ),
        (
            "GET",
            "/api/endpoints?limit=0",
            None,
            StatusCode::BAD_REQUEST,
            "limit",
        ),
        (
            "GET",
            "/api/endpoints?limit=abc",
            None,
            StatusCode::BAD_REQUEST,
            "limit",
        ),
        (
            "GET",
            "/api/endpoints?start=-1",
            None,
            StatusCode::BAD_REQUEST,
            "start",
        ),
        (
            "GET",
            "/api/endpoints?status=sideways",
            None,
            StatusCode::BAD_REQUEST,
            "status",
        ),
        (
            "GET",
            "/api/endpoints?mode=x",
            None,
            StatusCode::BAD_REQUEST,
            "mode",
        ),
        (
            "GET",
            "/api/endpoints?tagIds=1,x",
            None,
            StatusCode::BAD_REQUEST,
            "tagIds",
        ),
        (
            "PUT",
            "/api/endpoints/1",
            Some("{}"),
            StatusCode::METHOD_NOT_ALLOWED,
            "not allowed",
        ),
        (
            "GET",
            "/api/endpoints/1/install?platform=docker",
            None,
            StatusCode::NOT_FOUND,
            "environment 1",
        ),
        (
            "PATCH",
            "/api/settings",
            Some(r#"{"checkinInterval": 0}"#),
            StatusCode::BAD_REQUEST,
            "checkinInterval",
        ),
        (
            "POST",
            "/api/groups",
            Some(r#"{"name": ""}"#),
            StatusCode::BAD_REQUEST,
            "name",
        ),
    ];
    for (method, path, body, want, needle) in cases {
        let mut req = client
            .request(
                reqwest::Method::from_bytes(method.as_bytes()).unwrap(),
                cp.api(path),
            )
            .header("X-API-Key", ADMIN_KEY);
        if let Some(b) = body {
            req = req
                .header("content-type", "application/json")
                .body(b.to_owned());
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), want, "{method} {path} {body:?}");
        let v: Value = r.json().await.unwrap();
        assert!(
            message(&v).contains(needle),
            "{method} {path}: message {:?} lacks {needle:?}",
            message(&v)
        );
    }
    // curl -d sends a form content type; the body is read as JSON anyway (README, banner).
    let r = client
        .post(cp.api("/api/groups"))
        .header("X-API-Key", ADMIN_KEY)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(r#"{"name": "from-curl"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    // A JSON body over the admin limit: 413 with a message.
    let huge = format!(r#"{{"name": "{}"}}"#, "x".repeat(5 * 1024 * 1024));
    let r = client
        .post(cp.api("/api/endpoints"))
        .header("X-API-Key", ADMIN_KEY)
        .header("content-type", "application/json")
        .body(huge)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let v: Value = r.json().await.unwrap();
    assert!(message(&v).contains("larger than"), "{v}");
    // Oversized bulk.
    let many: Vec<Value> = (0..1001)
        .map(|i| json!({"name": format!("e{i}")}))
        .collect();
    let (status, body) = post(&cp, "/api/endpoints/bulk", Value::Array(many)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    // Unknown list parameters (Portainer clients send sort/order) are ignored.
    let (status, _, _) = get(&cp, "/api/endpoints?sort=Name&order=1").await;
    assert_eq!(status, StatusCode::OK);
    // Nothing was created by any of it.
    let (_, list, total) = get(&cp, "/api/endpoints").await;
    assert_eq!(total.as_deref(), Some("0"), "{list}");
    cp.stop().await;
}

#[actix_web::test]
async fn paging_filters_and_total_count() {
    let cp = ControlPlane::start().await;
    let (_, group) = post(&cp, "/api/groups", json!({"name": "stores"})).await;
    let (_, tag) = post(&cp, "/api/tags", json!({"name": "eu"})).await;
    let (gid, tid) = (group["id"].as_u64().unwrap(), tag["id"].as_u64().unwrap());
    let items: Vec<Value> = (0..25)
        .map(|i| {
            if i % 5 == 0 {
                json!({"name": format!("pos-{i:02}"), "groupId": gid, "tagIds": [tid]})
            } else if i % 2 == 0 {
                json!({"name": format!("sign-{i:02}"), "mode": "async"})
            } else {
                json!({"name": format!("kiosk-{i:02}")})
            }
        })
        .collect();
    let (status, created) = post(&cp, "/api/endpoints/bulk", Value::Array(items)).await;
    assert_eq!(status, StatusCode::CREATED);
    let created = created.as_array().unwrap();
    assert_eq!(created.len(), 25);
    let ids: Vec<u64> = created.iter().map(|e| e["id"].as_u64().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids increase in order");

    let (_, page, total) = get(&cp, "/api/endpoints?start=20&limit=10").await;
    assert_eq!(total.as_deref(), Some("25"));
    assert_eq!(page.as_array().unwrap().len(), 5);
    assert_eq!(page[0]["id"].as_u64(), Some(ids[20]));
    let (_, page, total) = get(&cp, "/api/endpoints?limit=3").await;
    assert_eq!(total.as_deref(), Some("25"));
    assert_eq!(page.as_array().unwrap().len(), 3);

    let (_, _, total) = get(&cp, "/api/endpoints?search=POS").await;
    assert_eq!(total.as_deref(), Some("5"));
    let (_, _, total) = get(&cp, &format!("/api/endpoints?groupId={gid}")).await;
    assert_eq!(total.as_deref(), Some("5"));
    let (_, _, total) = get(&cp, &format!("/api/endpoints?tagIds={tid}")).await;
    assert_eq!(total.as_deref(), Some("5"));
    let (_, page, total) = get(&cp, "/api/endpoints?mode=async&limit=100").await;
    assert_eq!(total.as_deref(), Some("10"));
    assert!(page
        .as_array()
        .unwrap()
        .iter()
        .all(|e| e["mode"] == "async"));
    let (_, _, total) = get(&cp, "/api/endpoints?status=never").await;
    assert_eq!(total.as_deref(), Some("25"));
    let (_, _, total) = get(&cp, "/api/endpoints?status=up,down").await;
    assert_eq!(total.as_deref(), Some("0"));

    // A group in use cannot be deleted; a free one can.
    let r = http()
        .delete(cp.api(&format!("/api/groups/{gid}")))
        .header("X-API-Key", ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CONFLICT);
    let (_, spare) = post(&cp, "/api/tags", json!({"name": "spare"})).await;
    let r = http()
        .delete(cp.api(&format!("/api/tags/{}", spare["id"])))
        .header("X-API-Key", ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let (status, _) = post(&cp, "/api/tags", json!({"name": "eu"})).await;
    assert_eq!(status, StatusCode::CONFLICT, "duplicate tag name");
    cp.stop().await;
}

#[actix_web::test]
async fn install_commands_carry_the_key_and_options() {
    let cp = ControlPlane::start_with(|c| c.agent_secret = Some("s3cret".into())).await;
    let (_, env) = post(
        &cp,
        "/api/endpoints",
        json!({"name": "k", "allowSelfSigned": true, "envVars": ["SITE_ID"]}),
    )
    .await;
    let id = env["id"].as_u64().unwrap();
    let key = env["edgeKey"].as_str().unwrap();
    for platform in ["docker", "swarm", "kubernetes", "nomad"] {
        let (status, v, _) = get(
            &cp,
            &format!("/api/endpoints/{id}/install?platform={platform}"),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        let cmd = v["command"].as_str().unwrap();
        assert!(cmd.contains(key), "{platform}: key missing");
        assert!(cmd.contains("EDGE_INSECURE_POLL"), "{platform}");
        assert!(
            cmd.contains("AGENT_SECRET") && cmd.contains("s3cret"),
            "{platform}"
        );
        assert!(cmd.contains("SITE_ID"), "{platform}");
    }
    let r = http()
        .get(cp.api(&format!("/api/endpoints/{id}/install")))
        .header("X-API-Key", ADMIN_KEY)
        .header("Accept", "text/plain")
        .send()
        .await
        .unwrap();
    let text = r.text().await.unwrap();
    assert!(text.starts_with("docker run -d"), "{text}");
    assert!(text.contains(&format!("-e EDGE_KEY='{key}'")));
    let (status, v, _) = get(
        &cp,
        &format!("/api/endpoints/{id}/install?platform=windows"),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(message(&v).contains("windows"));

    // Settings round trip.
    let r = http()
        .patch(cp.api("/api/settings"))
        .header("X-API-Key", ADMIN_KEY)
        .json(&json!({"checkinInterval": 9}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let (_, s, _) = get(&cp, "/api/settings").await;
    assert_eq!(s["checkinInterval"], 9);
    assert_eq!(s["pingInterval"], 60);
    let (_, e, _) = get(&cp, &format!("/api/endpoints/{id}")).await;
    assert_eq!(e["checkinInterval"], 9);
    cp.stop().await;
}
