#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Edge stacks through the admin API: versions, checks of the compose file and of what it
//! targets, and what is refused (the store's conformance suite covers both backends).

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use testkit::{http, ControlPlane};

async fn call(cp: &ControlPlane, method: Method, path: &str, body: Value) -> (StatusCode, Value) {
    testkit::api::admin_json(&http(), method, &cp.api(path), &body).await
}

fn message(v: &Value) -> String {
    v["message"].as_str().unwrap_or_default().to_owned()
}

const V1: &str = "services:\n  web:\n    image: nginx:1.27\n    restart: always\n";
const V2: &str = "services:\n  db:\n    image: postgres:16\n  web:\n    image: nginx:1.27\n    depends_on: [db]\n    environment:\n      SITE: ${EDGE_ENV_NAME}\n";

#[actix_web::test]
async fn stacks_keep_their_versions_and_refuse_what_cannot_run() {
    let cp = ControlPlane::start().await;
    let (s, g) = call(
        &cp,
        Method::POST,
        "/api/edge_groups",
        json!({"name": "all"}),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{g}");
    let group = g["id"].as_u64().unwrap();

    let (s, v) = call(
        &cp,
        Method::POST,
        "/api/edge_stacks",
        json!({"name": "signage", "compose": V1, "edgeGroupIds": [group], "variables": {"TZ": "UTC"}}),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["version"], 1);
    let id = v["id"].as_u64().unwrap();

    // A new file is the next version; the old one is kept.
    let (s, v) = call(
        &cp,
        Method::PUT,
        &format!("/api/edge_stacks/{id}"),
        json!({"compose": V2}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["version"], 2);
    assert_eq!(v["variables"], json!({"TZ": "UTC"}));
    // The list carries each stack's rollout (a screen of rollouts needs no call per stack),
    // without the counts, which take a pass over the targets.
    let (s, v) = call(&cp, Method::GET, "/api/edge_stacks", Value::Null).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v[0]["id"], id);
    assert_eq!(v[0]["rollout"]["targetVersion"], 2, "{v}");
    assert!(v[0]["rollout"]["state"].is_string(), "{v}");
    assert!(v[0].get("counts").is_none(), "{v}");
    let (s, v) = call(
        &cp,
        Method::GET,
        &format!("/api/edge_stacks/{id}/versions"),
        Value::Null,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let listed: Vec<u64> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["version"].as_u64().unwrap())
        .collect();
    assert_eq!(listed, vec![2, 1]);
    assert!(v[0].get("compose").is_none(), "the list carries no files");
    let (s, v) = call(
        &cp,
        Method::GET,
        &format!("/api/edge_stacks/{id}/versions/1"),
        Value::Null,
    )
    .await;
    assert_eq!((s, v["compose"].as_str()), (StatusCode::OK, Some(V1)));
    let (s, _) = call(
        &cp,
        Method::GET,
        &format!("/api/edge_stacks/{id}/versions/9"),
        Value::Null,
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // An edit of version 1 made while version 2 came: refused, nothing changes.
    let (s, v) = call(
        &cp,
        Method::PUT,
        &format!("/api/edge_stacks/{id}"),
        json!({"compose": V1, "baseVersion": 1, "variables": {"TZ": "CET"}}),
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    let (s, v) = call(
        &cp,
        Method::PUT,
        &format!("/api/edge_stacks/{id}"),
        json!({"baseVersion": 2}),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let (_, v) = call(
        &cp,
        Method::GET,
        &format!("/api/edge_stacks/{id}"),
        Value::Null,
    )
    .await;
    assert_eq!(
        (v["version"].as_u64(), &v["variables"]),
        (Some(2), &json!({"TZ": "UTC"}))
    );

    // Variables change in place, not as a version; the name never changes.
    let (s, v) = call(
        &cp,
        Method::PUT,
        &format!("/api/edge_stacks/{id}"),
        json!({"variables": {}}),
    )
    .await;
    assert_eq!((s, v["version"].as_u64()), (StatusCode::OK, Some(2)), "{v}");
    let (s, v) = call(
        &cp,
        Method::PUT,
        &format!("/api/edge_stacks/{id}"),
        json!({"name": "other"}),
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");

    // What cannot run, or targets nothing that exists, is refused with the reason, and
    // changes nothing.
    for (body, status, says) in [
        (
            json!({"name": "x", "compose": V1}),
            StatusCode::BAD_REQUEST,
            "required",
        ),
        (
            json!({"name": "Bad Name", "compose": V1, "edgeGroupIds": [group]}),
            StatusCode::BAD_REQUEST,
            "a-z",
        ),
        (
            json!({"name": "x", "compose": "services:\n  a:\n    image: y\n    build: .\n", "edgeGroupIds": [group]}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "build",
        ),
        (
            json!({"name": "x", "compose": "services:\n  a:\n    image: y\n    depends_on: [b]\n", "edgeGroupIds": [group]}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "depends_on",
        ),
        (
            json!({"name": "x", "compose": V1, "edgeGroupIds": [4242]}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "4242",
        ),
        (
            json!({"name": "x", "compose": V1, "edgeGroupIds": []}),
            StatusCode::BAD_REQUEST,
            "edgeGroupIds",
        ),
        (
            json!({"name": "x", "compose": V1, "edgeGroupIds": [group], "variables": {"EDGE_ID": "1"}}),
            StatusCode::BAD_REQUEST,
            "EDGE_",
        ),
        (
            json!({"name": "x", "compose": V1, "edgeGroupIds": [group], "variables": {"A": "1\n    privileged: true"}}),
            StatusCode::BAD_REQUEST,
            "line break",
        ),
        (
            json!({"name": "x", "compose": V1, "edgeGroupIds": [group], "rollout": {"batchSize": 0}}),
            StatusCode::BAD_REQUEST,
            "batchSize",
        ),
        (
            json!({"name": "x", "compose": V1, "edgeGroupIds": [group], "rollout": {"failureThreshold": -1}}),
            StatusCode::BAD_REQUEST,
            "failureThreshold",
        ),
        (
            json!({"name": "x", "compose": V1, "edgeGroupIds": [group], "rollout": {"onFailure": "panic"}}),
            StatusCode::BAD_REQUEST,
            "expected one of `pause`, `rollback`, `continue`",
        ),
        (
            json!({"name": "signage", "compose": V1, "edgeGroupIds": [group]}),
            StatusCode::CONFLICT,
            "already exists",
        ),
    ] {
        let (s, v) = call(&cp, Method::POST, "/api/edge_stacks", body.clone()).await;
        assert_eq!(s, status, "{body}: {v}");
        assert!(message(&v).contains(says), "{body}: {v}");
    }
    let (s, v) = call(
        &cp,
        Method::PUT,
        &format!("/api/edge_stacks/{id}"),
        json!({"compose": "services: {}"}),
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    let (_, v) = call(
        &cp,
        Method::GET,
        &format!("/api/edge_stacks/{id}"),
        Value::Null,
    )
    .await;
    assert_eq!(v["version"], 2, "a refused file makes no version");

    // The group it targets cannot go while it does.
    let (s, v) = call(
        &cp,
        Method::DELETE,
        &format!("/api/edge_groups/{group}"),
        Value::Null,
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert!(message(&v).contains("signage"), "{v}");

    let (s, _) = call(
        &cp,
        Method::DELETE,
        &format!("/api/edge_stacks/{id}"),
        Value::Null,
    )
    .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    for path in [
        format!("/api/edge_stacks/{id}"),
        format!("/api/edge_stacks/{id}/versions"),
    ] {
        let (s, _) = call(&cp, Method::GET, &path, Value::Null).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{path}");
    }
    let (s, _) = call(
        &cp,
        Method::DELETE,
        &format!("/api/edge_groups/{group}"),
        Value::Null,
    )
    .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    cp.stop().await;
}

#[actix_web::test]
async fn a_stack_counts_its_targets_and_pages_their_statuses() {
    use store::prelude::*;
    use store::{DeployStatus, StackStatus};
    let redis = testkit::RedisServer::start();
    let cp = ControlPlane::replica(&redis, None).await;
    // The agents' side of the statuses is not built yet: they are recorded here as a replica
    // would record agents' reports.
    let shared = store::redis::RedisStore::connect(&redis.url(), "edgeplane:")
        .await
        .unwrap();
    let (_, t) = call(&cp, Method::POST, "/api/tags", json!({"name": "kiosk"})).await;
    let tag = t["id"].as_u64().unwrap();
    let mut envs = Vec::new();
    for (name, tags) in [("a", json!([tag])), ("b", json!([tag])), ("c", json!([]))] {
        let (s, v) = call(
            &cp,
            Method::POST,
            "/api/endpoints",
            json!({"name": name, "tagIds": tags}),
        )
        .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        envs.push(v["id"].as_u64().unwrap());
    }
    let (_, g1) = call(
        &cp,
        Method::POST,
        "/api/edge_groups",
        json!({"name": "kiosks", "dynamic": true, "tagIds": [tag]}),
    )
    .await;
    let (_, g2) = call(
        &cp,
        Method::POST,
        "/api/edge_groups",
        json!({"name": "few", "environmentIds": [envs[1], envs[2]]}),
    )
    .await;
    let (s, v) = call(
        &cp,
        Method::POST,
        "/api/edge_stacks",
        json!({"name": "signage", "compose": V1, "edgeGroupIds": [g1["id"], g2["id"]]}),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let id = v["id"].as_u64().unwrap();
    let stack_path = format!("/api/edge_stacks/{id}");
    // Both groups, each environment once; nothing reported yet.
    let v = call(&cp, Method::GET, &stack_path, Value::Null).await.1;
    assert_eq!(
        (v["targets"].as_u64(), &v["counts"]),
        (Some(3), &json!({"pending": 3}))
    );

    let report = |env, status, error: Option<&str>| StackStatus {
        env,
        status,
        version: 1,
        error: error.map(str::to_owned),
        updated_ms: 1_800_000_000_000,
    };
    shared
        .record_stack_statuses(
            id,
            &[
                report(envs[0], DeployStatus::Running, None),
                report(envs[1], DeployStatus::Error, Some("pull access denied")),
            ],
        )
        .await
        .unwrap();
    let v = call(&cp, Method::GET, &stack_path, Value::Null).await.1;
    assert_eq!(v["counts"], json!({"pending": 1, "running": 1, "error": 1}));
    let page = |query: &'static str| {
        let url = cp.api(&format!("/api/edge_stacks/{id}/status{query}"));
        async move { testkit::api::admin_get(&http(), &url).await }
    };
    let (s, v, total) = page("?status=error").await;
    assert_eq!((s, total), (StatusCode::OK, Some(1)));
    assert_eq!(v[0]["environmentId"].as_u64(), Some(envs[1]));
    assert_eq!(v[0]["error"], "pull access denied");
    assert_eq!(v[0]["version"], 1);
    let (_, v, total) = page("?status=pending").await;
    assert_eq!(total, Some(1));
    assert_eq!(
        (v[0]["environmentId"].as_u64(), &v[0]["version"]),
        (Some(envs[2]), &Value::Null)
    );
    let (_, v, total) = page("?start=1&limit=1").await;
    assert_eq!(total, Some(2), "all reported statuses");
    assert_eq!(v.as_array().unwrap().len(), 1);
    let (s, v, _) = page("?status=fine").await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");

    // A new version: nothing is reported for it yet.
    let (s, v) = call(
        &cp,
        Method::PUT,
        &format!("/api/edge_stacks/{id}"),
        json!({"compose": V2}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(
        call(&cp, Method::GET, &stack_path, Value::Null).await.1["counts"],
        json!({"pending": 3})
    );
    cp.stop().await;
}

#[actix_web::test]
async fn each_environment_gets_the_file_with_its_own_values() {
    let cp = ControlPlane::start().await;
    let (_, t) = call(
        &cp,
        Method::POST,
        "/api/tags",
        json!({"name": "site=berlin"}),
    )
    .await;
    let (_, gt) = call(&cp, Method::POST, "/api/tags", json!({"name": "floor=2"})).await;
    let (_, g) = call(
        &cp,
        Method::POST,
        "/api/groups",
        json!({"name": "shops", "tagIds": [gt["id"]]}),
    )
    .await;
    let (_, e) = call(
        &cp,
        Method::POST,
        "/api/endpoints",
        json!({"name": "till-7", "tagIds": [t["id"]], "groupId": g["id"]}),
    )
    .await;
    let env = e["id"].as_u64().unwrap();
    let (_, group) = call(
        &cp,
        Method::POST,
        "/api/edge_groups",
        json!({"name": "all", "environmentIds": [env]}),
    )
    .await;
    let v1 = "services:\n  app:\n    image: app:${TAG}\n    environment:\n      SITE: ${EDGE_TAG_site}\n      FLOOR: ${EDGE_TAG_floor}\n      NAME: ${EDGE_ENV_NAME}\n      GROUP: ${EDGE_GROUP_NAME}\n      COST: $$5\n";
    let (s, v) = call(
        &cp,
        Method::POST,
        "/api/edge_stacks",
        json!({"name": "app", "compose": v1, "edgeGroupIds": [group["id"]], "variables": {"TAG": "1.4"}}),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let id = v["id"].as_u64().unwrap();
    let file = |query: String| {
        let url = cp.api(&format!("/api/edge_stacks/{id}/file{query}"));
        async move {
            let r = http()
                .get(url)
                .header("X-API-Key", testkit::ADMIN_KEY)
                .send()
                .await
                .unwrap();
            (r.status(), r.text().await.unwrap())
        }
    };
    let (s, text) = file(format!("?environmentId={env}")).await;
    assert_eq!(s, StatusCode::OK, "{text}");
    assert_eq!(
        text,
        "services:\n  app:\n    image: app:1.4\n    environment:\n      SITE: berlin\n      FLOOR: 2\n      NAME: till-7\n      GROUP: shops\n      COST: $5\n"
    );
    // A value no environment has: the version is kept (it may come with a stack variable),
    // and asking for the file names what is missing.
    let (s, v) = call(
        &cp,
        Method::PUT,
        &format!("/api/edge_stacks/{id}"),
        json!({"compose": "services:\n  app:\n    image: ${REGISTRY}/app\n"}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, text) = file(format!("?environmentId={env}")).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{text}");
    assert!(text.contains("REGISTRY is not set"), "{text}");
    // An earlier version, asked for by number; the environment's own value over the stack's.
    let (s, text) = file(format!("?environmentId={env}&version=1")).await;
    assert_eq!(s, StatusCode::OK);
    assert!(text.contains("image: app:1.4"), "{text}");
    let (s, v) = call(
        &cp,
        Method::PATCH,
        &format!("/api/endpoints/{env}"),
        json!({"variables": {"TAG": "2.0-pilot"}}),
    )
    .await;
    assert_eq!(
        (s, &v["variables"]),
        (StatusCode::OK, &json!({"TAG": "2.0-pilot"}))
    );
    let (_, text) = file(format!("?environmentId={env}&version=1")).await;
    assert!(text.contains("image: app:2.0-pilot"), "{text}");
    let (s, v) = call(
        &cp,
        Method::PATCH,
        &format!("/api/endpoints/{env}"),
        json!({"variables": {"EDGE_ENV_NAME": "x"}}),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    for (query, status) in [
        (String::new(), StatusCode::BAD_REQUEST),
        ("?environmentId=999".to_owned(), StatusCode::NOT_FOUND),
        (
            format!("?environmentId={env}&version=9"),
            StatusCode::NOT_FOUND,
        ),
    ] {
        let (s, text) = file(query.clone()).await;
        assert_eq!(s, status, "{query}: {text}");
    }
    cp.stop().await;
}

#[actix_web::test]
async fn a_staged_rollout_goes_on_across_replicas_and_a_restart() {
    use store::prelude::*;
    use store::{DeployStatus, StackStatus};
    let redis = testkit::RedisServer::start();
    let a = ControlPlane::replica(&redis, None).await;
    let b = ControlPlane::replica(&redis, Some(&a)).await;
    // Agents' reports, recorded as a replica records them.
    let shared = store::redis::RedisStore::connect(&redis.url(), "edgeplane:")
        .await
        .unwrap();
    let mut envs = Vec::new();
    for name in ["a", "b", "c", "d"] {
        let (s, v) = call(&a, Method::POST, "/api/endpoints", json!({"name": name})).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        envs.push(v["id"].as_u64().unwrap());
    }
    let (_, g) = call(
        &a,
        Method::POST,
        "/api/edge_groups",
        json!({"name": "all", "environmentIds": envs}),
    )
    .await;
    let (s, v) = call(
        &a,
        Method::POST,
        "/api/edge_stacks",
        json!({"name": "signage", "compose": V1, "edgeGroupIds": [g["id"]]}),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let id = v["id"].as_u64().unwrap();
    let path = format!("/api/edge_stacks/{id}");
    let run = |env: u64, version: u32| StackStatus {
        env,
        status: DeployStatus::Running,
        version,
        error: None,
        updated_ms: proto::clock::now_ms(),
    };
    let within = std::time::Duration::from_secs(20);
    // Version 1 all at once: done when all four run it.
    let all: Vec<StackStatus> = envs.iter().map(|&e| run(e, 1)).collect();
    shared.record_stack_statuses(id, &all).await.unwrap();
    testkit::eventually(within, "version 1 done", || async {
        let v = call(&b, Method::GET, &path, Value::Null).await.1;
        (v["rollout"]["state"] == "done" && v["counts"]["running"] == 4).then_some(())
    })
    .await;

    // Version 2 in batches of one, in rank order; replica b goes after the first batch,
    // a after the second, when a new replica takes over: the state is in the store.
    let (s, v) = call(
        &b,
        Method::PUT,
        &path,
        json!({"compose": V2, "rollout": {"batchSize": 1}}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let mut order = envs.clone();
    order.sort_by_key(|&e| control_plane::rollout::rank(id, e));
    // (b and the new replica use a's certificate, read when they start.)
    let mut live = vec![a, b];
    for (k, env) in order.iter().enumerate() {
        let batch = k as u64 + 1;
        let v = testkit::eventually(within, &format!("batch {batch}"), || async {
            let v = call(&live[0], Method::GET, &path, Value::Null).await.1;
            (v["rollout"]["batch"] == batch).then_some(v)
        })
        .await;
        assert_eq!(v["rollout"]["state"], "rolling", "{v}");
        assert_eq!(v["rollout"]["released"], batch, "{v}");
        assert_eq!(v["counts"]["pending"], 4 - k as u64, "{v}");
        match k {
            0 => live.pop().unwrap().stop().await,
            1 => {
                let c = ControlPlane::replica(&redis, Some(&live[0])).await;
                let a = std::mem::replace(&mut live[0], c);
                a.stop().await;
            }
            _ => {}
        }
        shared
            .record_stack_statuses(id, &[run(*env, 2)])
            .await
            .unwrap();
    }
    let v = testkit::eventually(within, "version 2 done", || async {
        let v = call(&live[0], Method::GET, &path, Value::Null).await.1;
        (v["rollout"]["state"] == "done").then_some(v)
    })
    .await;
    assert_eq!(v["counts"], json!({"running": 4}), "{v}");
    assert_eq!(v["rollout"]["targetVersion"], 2, "{v}");
}
