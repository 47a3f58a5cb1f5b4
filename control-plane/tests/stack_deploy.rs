//! Edge stacks end to end, as an operator sees them: the real `control-plane` binary, three
//! real agents (two standard, one async), each with an engine of its own (Podman, isolated
//! storage, like three devices), a dynamic edge group over a tag, and the admin API.
//! A stack runs on all three (compose's names and labels, per-device variables); a new version
//! replaces it; a version whose image does not exist fails with the engine's message and
//! leaves the running version alone; going back to the old file brings all back; untagging an
//! environment removes the stack from its device.
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

/// Waits until every target of stack `id` reports `status` for `version`.
async fn all_at(cp: &CpProcess, id: u64, version: u64, status: &str, targets: u64) -> Value {
    eventually(
        WITHIN,
        &format!("stack {id} v{version}: {targets} {status}"),
        || async {
            let v = stack(cp, id).await;
            (v["version"] == version && v["targets"] == targets && v["counts"][status] == targets)
                .then_some(v)
        },
    )
    .await
}

/// The stack's container on `engine`: (state, the DEVICE and SITE it got, version label).
fn container(engine: &Engine, name: &str) -> Option<(String, String, String)> {
    let ps = engine.docker(&[
        "ps",
        "-a",
        "--filter",
        &format!("label=com.docker.compose.project=edge_{name}"),
        "--format",
        "{{.Names}}",
    ]);
    if ps.is_empty() {
        return None;
    }
    assert_eq!(
        ps,
        format!("edge_{name}-web-1"),
        "one container, compose's name"
    );
    let out = engine.docker(&[
        "inspect",
        "--format",
        "{{.State.Status}}|{{range .Config.Env}}{{.}};{{end}}|{{index .Config.Labels \"io.edgeplane.stack.version\"}}|{{index .Config.Labels \"com.docker.compose.service\"}}",
        &ps,
    ]);
    let parts: Vec<&str> = out.split('|').collect();
    assert_eq!(parts[3], "web", "compose's service label");
    let envs = parts[1];
    let var = |k: &str| {
        envs.split(';')
            .find_map(|e| e.strip_prefix(&format!("{k}=")))
            .unwrap_or_default()
            .to_owned()
    };
    Some((
        parts[0].to_owned(),
        format!("{}/{}", var("DEVICE"), var("SITE")),
        parts[2].to_owned(),
    ))
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

    // Version 2 replaces it.
    let (status, v) = admin_json(
        &http(),
        Method::PUT,
        &cp.api(&format!("/api/edge_stacks/{id}")),
        &json!({"compose": compose("sleep 7200", IMAGE)}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    all_at(&cp, id, 2, "running", 3).await;
    for e in &engines {
        assert_eq!(container(e, "signage").unwrap().2, "2");
    }

    // Version 3's image does not exist: an error with the engine's message, and version 2
    // keeps running.
    let (status, v) = admin_json(
        &http(),
        Method::PUT,
        &cp.api(&format!("/api/edge_stacks/{id}")),
        &json!({"compose": compose("sleep 7200", "localhost/edgeplane/missing:3")}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    all_at(&cp, id, 3, "error", 3).await;
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
    for e in &engines {
        let (state, _, version) = container(e, "signage").unwrap();
        assert_eq!((state.as_str(), version.as_str()), ("running", "2"));
    }

    // Back to version 2's file: all run it again.
    let (status, v) = admin_json(
        &http(),
        Method::PUT,
        &cp.api(&format!("/api/edge_stacks/{id}")),
        &json!({"compose": compose("sleep 7200", IMAGE)}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    all_at(&cp, id, 4, "running", 3).await;

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
    all_at(&cp, id, 4, "running", 2).await;
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
