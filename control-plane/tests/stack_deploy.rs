//! Edge stacks end to end, as an operator sees them: the real `control-plane` binary, three
//! real agents (two standard, one async), each with an engine of its own (Podman, isolated
//! storage, like three devices), a dynamic edge group over a tag, and the admin API.
//! A stack runs on all three (compose's names and labels, per-device variables); version 2,
//! staged in batches of one, reaches them one by one; version 3, whose image does not exist,
//! fails on the first batch with the engine's message, pauses the rollout and leaves the
//! others on version 2; `rollback` brings all back to version 2; untagging an environment
//! removes the stack from its device.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};
use testkit::api::{admin_get, admin_json};
use testkit::{eventually, http, Agent, CpProcess, Engine, IMAGE};

const WITHIN: Duration = Duration::from_secs(90);
const INTERVAL: u64 = 2;

fn agent(key: &str, engine: &Engine, dir: &std::path::Path, async_mode: bool) -> Agent {
    Agent::start(edge_agent::Args {
        edge_key: Some(key.to_owned()),
        data_dir: Some(dir.to_owned()),
        docker_host: Some(engine.docker_host()),
        async_mode: Some(if async_mode { "1" } else { "0" }.to_owned()),
        stack_settle: Some("1s".to_owned()),
        ..Default::default()
    })
}

fn compose(command: &str, image: &str) -> String {
    format!(
        r#"
services:
  web:
    image: {image}
    command: ["sh", "-c", "{command}"]
    environment:
      DEVICE: ${{EDGE_ENV_NAME}}
      SITE: ${{EDGE_TAG_site}}
    networks: [front]
    volumes: ["data:/data"]
    restart: unless-stopped
networks:
  front:
volumes:
  data:
"#
    )
}

async fn post(cp: &CpProcess, path: &str, body: Value) -> Value {
    let (status, v) = admin_json(&http(), Method::POST, &cp.api(path), &body).await;
    assert_eq!(status, 201, "POST {path}: {v}");
    v
}

async fn stack(cp: &CpProcess, id: u64) -> Value {
    let (status, v, _) = admin_get(&http(), &cp.api(&format!("/api/edge_stacks/{id}"))).await;
    assert_eq!(status, 200, "{v}");
    v
}

/// Waits until every target of stack `id` reports `status` for `version` (the version its
/// rollout brings them to).
async fn all_at(cp: &CpProcess, id: u64, version: u64, status: &str, targets: u64) -> Value {
    eventually(
        WITHIN,
        &format!("stack {id} v{version}: {targets} {status}"),
        || async {
            let v = stack(cp, id).await;
            (v["rollout"]["targetVersion"] == version
                && v["targets"] == targets
                && v["counts"][status] == targets)
                .then_some(v)
        },
    )
    .await
}

/// The version labels of the stack's containers on the engines.
fn versions(engines: &[Engine]) -> Vec<String> {
    engines
        .iter()
        .map(|e| container(e, "signage").map(|c| c.2).unwrap_or_default())
        .collect()
}

/// The stack's container on `engine`: (state, the DEVICE and SITE it got, version label).
/// (Asked again when it went between listing and inspecting: the agent was replacing it.)
fn container(engine: &Engine, name: &str) -> Option<(String, String, String)> {
    for _ in 0..20 {
        if let Ok(found) = try_container(engine, name) {
            return found;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("the container of {name} kept changing under inspection");
}

fn try_container(engine: &Engine, name: &str) -> Result<Option<(String, String, String)>, String> {
    let ps = engine.docker(&[
        "ps",
        "-a",
        "--filter",
        &format!("label=com.docker.compose.project=edge_{name}"),
        "--format",
        "{{.Names}}",
    ]);
    if ps.is_empty() {
        return Ok(None);
    }
    assert_eq!(
        ps,
        format!("edge_{name}-web-1"),
        "one container, compose's name"
    );
    let out = engine.try_docker(&[
        "inspect",
        "--format",
        "{{.State.Status}}|{{range .Config.Env}}{{.}};{{end}}|{{index .Config.Labels \"io.edgeplane.stack.version\"}}|{{index .Config.Labels \"com.docker.compose.service\"}}",
        &ps,
    ])?;
    let parts: Vec<&str> = out.split('|').collect();
    assert_eq!(parts[3], "web", "compose's service label");
    let envs = parts[1];
    let var = |k: &str| {
        envs.split(';')
            .find_map(|e| e.strip_prefix(&format!("{k}=")))
            .unwrap_or_default()
            .to_owned()
    };
    Ok(Some((
        parts[0].to_owned(),
        format!("{}/{}", var("DEVICE"), var("SITE")),
        parts[2].to_owned(),
    )))
}

#[actix_web::test]
async fn a_stack_reaches_a_dynamic_group_of_real_devices_and_leaves_an_untagged_one() {
    let engines = [
        Engine::start_isolated(),
        Engine::start_isolated(),
        Engine::start_isolated(),
    ];
    let data = tempfile::tempdir().unwrap();
    let tunnel = format!("127.0.0.1:{}", testkit::free_port());
    let cp = CpProcess::spawn(data.path(), &["--tunnel-addr", &tunnel]).await;

    let tag = post(&cp, "/api/tags", json!({"name": "site=north"})).await["id"]
        .as_u64()
        .unwrap();
    let mut envs = Vec::new();
    for (i, name) in ["kiosk-a", "kiosk-b", "kiosk-c"].iter().enumerate() {
        let body = if i == 2 {
            json!({"name": name, "mode": "async", "tagIds": [tag],
                   "pingInterval": INTERVAL, "snapshotInterval": 60, "commandInterval": INTERVAL})
        } else {
            json!({"name": name, "tagIds": [tag], "checkinInterval": INTERVAL})
        };
        let v = post(&cp, "/api/endpoints", body).await;
        envs.push((
            v["id"].as_u64().unwrap(),
            v["edgeKey"].as_str().unwrap().to_owned(),
        ));
    }
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let agents: Vec<Agent> = (0..3)
        .map(|i| agent(&envs[i].1, &engines[i], dirs[i].path(), i == 2))
        .collect();
    let group = post(
        &cp,
        "/api/edge_groups",
        json!({"name": "north", "dynamic": true, "tagIds": [tag], "match": "any"}),
    )
    .await["id"]
        .as_u64()
        .unwrap();

    // Version 1 runs everywhere, rendered per device.
    let created = post(
        &cp,
        "/api/edge_stacks",
        json!({"name": "signage", "compose": compose("sleep 3600", IMAGE), "edgeGroupIds": [group]}),
    )
    .await;
    let id = created["id"].as_u64().unwrap();
    assert_eq!(created["version"], 1);
    all_at(&cp, id, 1, "running", 3).await;
    for (i, name) in ["kiosk-a", "kiosk-b", "kiosk-c"].iter().enumerate() {
        let (state, vars, version) = container(&engines[i], "signage").unwrap();
        assert_eq!(state, "running");
        assert_eq!(vars, format!("{name}/north"));
        assert_eq!(version, "1");
        // Compose's network and volume names.
        assert!(engines[i]
            .docker(&["network", "ls", "--format", "{{.Name}}"])
            .contains("edge_signage_front"));
        assert!(engines[i]
            .docker(&["volume", "ls", "--format", "{{.Name}}"])
            .contains("edge_signage_data"));
    }
    let (status, page, total) = admin_get(
        &http(),
        &cp.api(&format!("/api/edge_stacks/{id}/status?status=running")),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(total, Some(3), "{page}");

    // Version 2, staged: batches of one, 6 s apart (the checks of a settled batch fit in
    // the wait). It reaches the devices one by one.
    let (status, v) = admin_json(
        &http(),
        Method::PUT,
        &cp.api(&format!("/api/edge_stacks/{id}")),
        &json!({"compose": compose("sleep 7200", IMAGE),
                "rollout": {"batchSize": 1, "waitSecs": 6, "onFailure": "pause"}}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    for batch in 1..=2u64 {
        let v = eventually(WITHIN, &format!("batch {batch} settled"), || async {
            let v = stack(&cp, id).await;
            (v["rollout"]["batch"] == batch && v["counts"]["running"] == batch).then_some(v)
        })
        .await;
        assert_eq!(v["rollout"]["state"], "rolling", "{v}");
        assert_eq!(v["rollout"]["released"], batch, "{v}");
        let on_two = versions(&engines).iter().filter(|v| *v == "2").count();
        assert_eq!(on_two as u64, batch, "one more device per batch: {v}");
    }
    all_at(&cp, id, 2, "running", 3).await;
    let v = eventually(WITHIN, "rollout done", || async {
        let v = stack(&cp, id).await;
        (v["rollout"]["state"] == "done").then_some(v)
    })
    .await;
    assert_eq!(v["rollout"]["batch"], 3, "{v}");
    assert_eq!(versions(&engines), vec!["2", "2", "2"]);

    // Version 3's image does not exist: the first batch fails with the engine's message,
    // the rollout pauses, the other devices stay on version 2 (and the failed one keeps
    // version 2's container running).
    let (status, v) = admin_json(
        &http(),
        Method::PUT,
        &cp.api(&format!("/api/edge_stacks/{id}")),
        &json!({"compose": compose("sleep 7200", "localhost/edgeplane/missing:3")}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let v = eventually(WITHIN, "rollout paused", || async {
        let v = stack(&cp, id).await;
        (v["rollout"]["state"] == "paused").then_some(v)
    })
    .await;
    assert_eq!(v["rollout"]["batch"], 1, "{v}");
    assert_eq!(v["counts"]["error"], 1, "{v}");
    assert!(
        v["rollout"]["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("failed"),
        "{v}"
    );
    let (_, page, _) = admin_get(
        &http(),
        &cp.api(&format!("/api/edge_stacks/{id}/status?status=error")),
    )
    .await;
    let error = page[0]["error"].as_str().unwrap_or_default().to_owned();
    assert!(
        error.contains("localhost/edgeplane/missing:3"),
        "the engine's message names the image: {page}"
    );
    // Paused means paused: no second batch.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let v = stack(&cp, id).await;
    assert_eq!(
        (v["rollout"]["state"].clone(), v["rollout"]["batch"].clone()),
        (json!("paused"), json!(1)),
        "{v}"
    );
    for e in &engines {
        let (state, _, version) = container(e, "signage").unwrap();
        assert_eq!((state.as_str(), version.as_str()), ("running", "2"));
    }

    // Rollback (to the version the rollout started from): all run version 2 again.
    let (status, v) = admin_json(
        &http(),
        Method::POST,
        &cp.api(&format!("/api/edge_stacks/{id}/rollback")),
        &json!({}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["targetVersion"], 2, "{v}");
    all_at(&cp, id, 2, "running", 3).await;
    eventually(WITHIN, "rollback done", || async {
        (stack(&cp, id).await["rollout"]["state"] == "done").then_some(())
    })
    .await;
    assert_eq!(versions(&engines), vec!["2", "2", "2"]);

    // Untagged, kiosk-b leaves the group: the stack goes from its device, and from its
    // counts.
    let (status, v) = admin_json(
        &http(),
        Method::PATCH,
        &cp.api(&format!("/api/endpoints/{}", envs[1].0)),
        &json!({"tagIds": []}),
    )
    .await;
    assert!(status.is_success(), "{status} {v}");
    eventually(WITHIN, "the stack removed from kiosk-b", || async {
        container(&engines[1], "signage").is_none().then_some(())
    })
    .await;
    all_at(&cp, id, 2, "running", 2).await;
    assert!(container(&engines[0], "signage").is_some());
    assert!(
        !engines[1]
            .docker(&["network", "ls", "--format", "{{.Name}}"])
            .contains("edge_signage_front"),
        "its network went with it"
    );

    for a in agents {
        a.stop().await;
    }
}
