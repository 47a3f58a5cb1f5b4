//! Async mode end to end, as an operator sees it: the real `control-plane` binary, the edge
//! agent with `EDGE_ASYNC=1`, Podman's Docker API service as the engine, and the admin API.
//! A running container shows in the snapshot; a queued stop stops it and is reported
//! `succeeded`; a command for a container that does not exist ends `failed` with the engine's
//! message; the control plane stopped and restarted under the agent loses and repeats nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use serde_json::{json, Value};
use testkit::Agent;
use testkit::{eventually, get_env, http, CpProcess, ADMIN_KEY};
use testkit::{Engine, IMAGE};

/// Every async interval in these tests (the server's default is 60 s).
const INTERVAL: u64 = 2;
const WITHIN: Duration = Duration::from_secs(40);

fn async_agent(key: &str, engine: &Engine, data_dir: &std::path::Path) -> Agent {
    Agent::start(edge_agent::Args {
        edge_key: Some(key.to_owned()),
        data_dir: Some(data_dir.to_owned()),
        docker_host: Some(engine.docker_host()),
        async_mode: Some("1".to_owned()),
        ..Default::default()
    })
}

async fn admin(method: reqwest::Method, url: String, body: Option<Value>) -> (u16, Value) {
    let mut req = http().request(method, url).header("X-API-Key", ADMIN_KEY);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

async fn create_async_env(cp: &CpProcess, name: &str) -> (u64, String) {
    let (status, v) = admin(
        reqwest::Method::POST,
        cp.api("/api/endpoints"),
        Some(json!({
            "name": name,
            "mode": "async",
            "pingInterval": INTERVAL,
            "snapshotInterval": INTERVAL,
            "commandInterval": INTERVAL,
        })),
    )
    .await;
    assert_eq!(status, 201, "{v}");
    (
        v["id"].as_u64().unwrap(),
        v["edgeKey"].as_str().unwrap().to_owned(),
    )
}

async fn queue(cp: &CpProcess, id: u64, body: Value) -> u64 {
    let (status, v) = admin(
        reqwest::Method::POST,
        cp.api(&format!("/api/endpoints/{id}/commands")),
        Some(body),
    )
    .await;
    assert_eq!(status, 201, "{v}");
    assert_eq!(v["state"], "pending", "{v}");
    v["id"].as_u64().unwrap()
}

async fn commands(cp: &CpProcess, id: u64) -> Vec<Value> {
    let (status, v) = admin(
        reqwest::Method::GET,
        cp.api(&format!("/api/endpoints/{id}/commands?limit=50")),
        None,
    )
    .await;
    assert_eq!(status, 200, "{v}");
    v.as_array().unwrap().clone()
}

/// The command's record once it is finished (`succeeded` or `failed`).
async fn finished(cp: &CpProcess, id: u64, cmd: u64) -> Value {
    eventually(WITHIN, &format!("command {cmd} finished"), || async {
        commands(cp, id)
            .await
            .into_iter()
            .find(|c| c["id"] == cmd && (c["state"] == "succeeded" || c["state"] == "failed"))
    })
    .await
}

/// The container's state in the stored snapshot, once it is `want`.
async fn snapshot_shows(cp: &CpProcess, id: u64, name: &str, want: &str) -> Value {
    eventually(
        WITHIN,
        &format!("{name} {want} in the snapshot"),
        || async {
            let (status, v) = admin(
                reqwest::Method::GET,
                cp.api(&format!("/api/endpoints/{id}/snapshot?section=containers")),
                None,
            )
            .await;
            if status != 200 {
                return None;
            }
            let found = v["snapshot"]["containers"]
                .as_array()?
                .iter()
                .find(|c| {
                    c["names"]
                        .as_array()
                        .is_some_and(|n| n.contains(&json!(name)))
                })?
                .clone();
            (found["state"] == want).then_some(v)
        },
    )
    .await
}

#[actix_web::test]
async fn snapshots_and_commands_against_a_real_engine() {
    let engine = Engine::start();
    let data = tempfile::tempdir().unwrap();
    let tunnel = format!("127.0.0.1:{}", testkit::free_port());
    let cp = CpProcess::spawn(data.path(), &["--tunnel-addr", &tunnel]).await;
    let (id, key) = create_async_env(&cp, "async-podman").await;
    let name = "ep-async-web";
    engine.docker(&["rm", "-f", name]);
    engine.docker(&["run", "-d", "--name", name, IMAGE, "sleep", "600"]);

    let agent_dir = tempfile::tempdir().unwrap();
    let agent = async_agent(&key, &engine, agent_dir.path());
    eventually(WITHIN, "async agent up", || async {
        (get_env(&cp.url, id).await["status"] == "up").then_some(())
    })
    .await;

    // The running container is in the snapshot, with when it was taken.
    let snap = snapshot_shows(&cp, id, name, "running").await;
    assert!(snap["takenAt"].as_str().is_some(), "{snap}");

    // A queued stop stops it on the device and is reported succeeded.
    let stop = queue(
        &cp,
        id,
        json!({"type": "containerStop", "target": name, "timeoutSecs": 1}),
    )
    .await;
    let done = finished(&cp, id, stop).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert!(done["sentAt"].as_str().is_some() && done["finishedAt"].as_str().is_some());
    let state = engine.docker(&["inspect", "-f", "{{.State.Status}}", name]);
    assert_eq!(state, "exited");
    snapshot_shows(&cp, id, name, "exited").await;

    // A command for a container that does not exist: failed with the engine's message, once.
    let ghost = queue(
        &cp,
        id,
        json!({"type": "containerStart", "target": "ep-no-such-container"}),
    )
    .await;
    let failed = finished(&cp, id, ghost).await;
    assert_eq!(failed["state"], "failed", "{failed}");
    let error = failed["error"].as_str().unwrap();
    assert!(error.contains("ep-no-such-container"), "{error}");

    // Bad input at queue time, with reasons.
    let (status, v) = admin(
        reqwest::Method::POST,
        cp.api(&format!("/api/endpoints/{id}/commands")),
        Some(json!({"type": "reboot", "target": name})),
    )
    .await;
    assert_eq!(status, 400, "{v}");
    assert!(v["message"]
        .as_str()
        .unwrap()
        .contains("unknown command type"));
    let (status, v) = admin(
        reqwest::Method::POST,
        cp.api(&format!("/api/endpoints/{id}/commands")),
        Some(json!({"type": "containerStop", "target": "../etc"})),
    )
    .await;
    assert_eq!(status, 400, "{v}");
    // The Docker proxy refuses async environments.
    let (status, v) = admin(
        reqwest::Method::GET,
        cp.api(&format!("/api/endpoints/{id}/docker/containers/json")),
        None,
    )
    .await;
    assert_eq!(status, 409, "{v}");

    // Newest first, paged, with the total.
    let r = http()
        .get(cp.api(&format!("/api/endpoints/{id}/commands?start=0&limit=1")))
        .header("X-API-Key", ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-total-count"], "2");
    let page: Vec<Value> = r.json().await.unwrap();
    assert_eq!(page.len(), 1);
    assert_eq!(page[0]["id"], ghost);

    // A stack from a compose file: deployed, seen in the snapshot, removed.
    let compose = format!(
        "services:\n  web:\n    image: {IMAGE}\n    command: [\"sleep\", \"600\"]\n    environment:\n      MODE: kiosk\n    labels: [tier=front]\n"
    );
    let deploy = queue(
        &cp,
        id,
        json!({"type": "stackDeploy", "target": "ep-shop", "compose": compose}),
    )
    .await;
    let done = finished(&cp, id, deploy).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["services"], json!(["web"]));
    let running = engine.docker(&["inspect", "-f", "{{.State.Status}}", "ep-shop-web-1"]);
    assert_eq!(running, "running");
    eventually(WITHIN, "the stack in the snapshot", || async {
        let (_, v) = admin(
            reqwest::Method::GET,
            cp.api(&format!("/api/endpoints/{id}/snapshot?section=stacks")),
            None,
        )
        .await;
        let stacks = v["snapshot"]["stacks"].as_array()?.clone();
        stacks
            .iter()
            .any(|s| s["name"] == "ep-shop" && s["running"] == 1)
            .then_some(())
    })
    .await;
    let remove = queue(&cp, id, json!({"type": "stackRemove", "target": "ep-shop"})).await;
    assert_eq!(finished(&cp, id, remove).await["state"], "succeeded");
    let (status, v) = admin(
        reqwest::Method::POST,
        cp.api(&format!("/api/endpoints/{id}/commands")),
        Some(json!({"type": "stackDeploy", "target": "ep-shop", "compose": "services:\n  web:\n    build: .\n"})),
    )
    .await;
    assert_eq!(status, 422, "{v}");
    assert!(v["message"].as_str().unwrap().contains("build"), "{v}");

    agent.stop().await;
    engine.docker(&["rm", "-f", name]);
}

#[actix_web::test]
async fn a_control_plane_outage_loses_and_repeats_no_command() {
    let engine = Engine::start();
    let data = tempfile::tempdir().unwrap();
    let tunnel = format!("127.0.0.1:{}", testkit::free_port());
    let cp = CpProcess::spawn(data.path(), &["--tunnel-addr", &tunnel]).await;
    let (id, key) = create_async_env(&cp, "async-outage").await;
    let api_port = url::Url::parse(&cp.url).unwrap().port().unwrap();
    let name = "ep-async-outage";
    engine.docker(&["rm", "-f", name]);
    engine.docker(&["run", "-d", "--name", name, IMAGE, "sleep", "600"]);
    let agent_dir = tempfile::tempdir().unwrap();
    let agent = async_agent(&key, &engine, agent_dir.path());

    // A restart: its effect (a new start time) shows whether it ever runs again.
    let restart = queue(
        &cp,
        id,
        json!({"type": "containerRestart", "target": name, "timeoutSecs": 1}),
    )
    .await;
    assert_eq!(finished(&cp, id, restart).await["state"], "succeeded");
    let started = engine.docker(&["inspect", "-f", "{{.State.StartedAt}}", name]);

    // The link is cut: the control plane stops for several of the agent's intervals.
    cp.stop();
    tokio::time::sleep(Duration::from_secs(4 * INTERVAL)).await;
    let cp = CpProcess::spawn_at(data.path(), api_port, &["--tunnel-addr", &tunnel]).await;

    // A command queued after the outage runs once; the one before is not repeated.
    let stop = queue(
        &cp,
        id,
        json!({"type": "containerStop", "target": name, "timeoutSecs": 1}),
    )
    .await;
    assert_eq!(finished(&cp, id, stop).await["state"], "succeeded");
    let seen = snapshot_shows(&cp, id, name, "exited").await;
    // Two more snapshot ticks (each moves `takenAt`): nothing re-runs the restart, which
    // would start the container again.
    let mut taken = seen["takenAt"].as_str().unwrap().to_owned();
    for tick in 0..2 {
        taken = eventually(WITHIN, &format!("snapshot tick {tick}"), || async {
            let v = snapshot_shows(&cp, id, name, "exited").await;
            let now = v["takenAt"].as_str().unwrap().to_owned();
            (now != taken).then_some(now)
        })
        .await;
    }
    assert_eq!(
        engine.docker(&["inspect", "-f", "{{.State.Status}}", name]),
        "exited"
    );
    assert_eq!(
        engine.docker(&["inspect", "-f", "{{.State.StartedAt}}", name]),
        started,
        "the restart ran again"
    );
    let all = commands(&cp, id).await;
    assert_eq!(all.len(), 2, "{all:?}");
    assert!(all.iter().all(|c| c["state"] == "succeeded"), "{all:?}");

    agent.stop().await;
    engine.docker(&["rm", "-f", name]);
}
