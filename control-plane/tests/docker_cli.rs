//! The Docker API through the tunnel, end to end, as an operator uses it: the real
//! `control-plane` binary (embedded gateway), the edge agent, Podman's Docker API service as
//! the engine (`scripts/podman-engine`) and the real `docker` CLI pointed at
//! `tcp://<control plane>/api/endpoints/{id}/docker` with `--tlsverify` and the admin key as
//! an HTTP header in its config.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Stdio;
use std::time::Duration;

use serde_json::{json, Value};
use testkit::api::create_env_key;
use testkit::docker_cli::text;
use testkit::{eventually, free_port, get_env, http, Agent, CpProcess, DockerCli, Engine};
use testkit::{ADMIN_KEY, IMAGE};
use tokio::io::AsyncBufReadExt;

async fn create_env(cp: &CpProcess, name: &str) -> (u64, String) {
    create_env_key(&cp.url, json!({ "name": name, "checkinInterval": 5 })).await
}

async fn tunnel_state(cp: &CpProcess, id: u64) -> String {
    get_env(&cp.url, id).await["tunnel"]["state"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[actix_web::test]
async fn the_docker_cli_works_through_the_tunnel() {
    let engine = Engine::start();
    // Podman's containers outlive an engine: a failed run may have left these behind.
    for name in ["ep-web", "ep-follow", "ep-raw"] {
        engine.docker(&["rm", "-f", name]);
    }
    let data = tempfile::tempdir().unwrap();
    let tunnel_port = free_port();
    let cp = CpProcess::spawn(
        data.path(),
        &[
            "--tunnel-addr",
            &format!("127.0.0.1:{tunnel_port}"),
            "--tunnel-wait",
            "8s",
            // Short, so the streams below outlive it: a streaming answer is still being
            // served, its connection's next request is not due yet.
            "--keep-alive",
            "2",
        ],
    )
    .await;
    let port = cp.port();
    let (id, key) = create_env(&cp, "podman-host").await;
    let agent = Agent::standard(&key, &engine.docker_host(), "4s");
    eventually(Duration::from_secs(15), "agent up", || async {
        (get_env(&cp.url, id).await["status"] == "up").then_some(())
    })
    .await;
    let docker = DockerCli::new(&data.path().join("tls-cert.pem"), port, id);

    // Everyday commands, the first one opening the tunnel.
    let ps = docker.ok(&["ps"]).await;
    assert!(ps.contains("CONTAINER ID"), "{ps}");
    assert_eq!(tunnel_state(&cp, id).await, "open");
    // Framing: a length the engine announced is kept, never next to chunked encoding (clients
    // would read the chunked terminator as a stray response).
    let r = http()
        .get(cp.api(&format!("/api/endpoints/{id}/docker/version")))
        .header("X-API-Key", ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        !(r.headers().contains_key("content-length")
            && r.headers().contains_key("transfer-encoding")),
        "{:?}",
        r.headers()
    );
    let v: Value = r.json().await.unwrap();
    assert!(v["Version"].as_str().is_some(), "{v}");

    // Calls one after the other reuse one engine connection through the tunnel: no stream
    // opened, no engine connection made on the agent's side per call.
    let engine_connections = |how: &'static str| {
        let url = cp.metrics_url.clone();
        async move {
            testkit::api::metric(
                &url,
                &format!("edgeplane_docker_engine_connections_total{{how=\"{how}\"}}"),
            )
            .await
        }
    };
    let (opened, reused) = (
        engine_connections("opened").await,
        engine_connections("reused").await,
    );
    let client = http();
    for _ in 0..20 {
        let (status, body) = testkit::api::docker_get_with(&client, &cp.url, id, "/_ping").await;
        assert_eq!((status, body.as_str()), (200, "OK"));
    }
    assert!(engine_connections("opened").await - opened <= 1.0);
    assert!(engine_connections("reused").await - reused >= 19.0);
    let out = docker
        .ok(&["run", "--rm", IMAGE, "echo", "hello-through-the-tunnel"])
        .await;
    assert!(out.contains("hello-through-the-tunnel"), "{out}");
    let cid = docker
        .ok(&[
            "run",
            "-d",
            "--name",
            "ep-web",
            IMAGE,
            "sh",
            "-c",
            "echo started; sleep 300",
        ])
        .await;
    assert!(!cid.trim().is_empty());
    let logs = eventually(Duration::from_secs(10), "logs", || async {
        let l = docker.ok(&["logs", "ep-web"]).await;
        l.contains("started").then_some(l)
    })
    .await;
    assert!(logs.contains("started"));
    let out = docker.ok(&["exec", "ep-web", "echo", "from-exec"]).await;
    assert!(out.contains("from-exec"), "{out}");
    let out = docker
        .run_with(&["exec", "-i", "ep-web", "cat"], Some(b"piped stdin\n"))
        .await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("piped stdin"), "{}", text(&out));
    let ps = docker.ok(&["ps"]).await;
    assert!(ps.contains("ep-web"), "{ps}");

    // Streaming answers, longer than the keep-alive: logs -f follows until the container
    // ends; events stream live.
    let mut events = docker
        .command(&[
            "events",
            "--filter",
            "type=container",
            "--format",
            "{{.Action}} {{.Actor.Attributes.name}}",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut event_lines = tokio::io::BufReader::new(events.stdout.take().unwrap()).lines();
    docker
        .ok(&[
            "run",
            "-d",
            "--name",
            "ep-follow",
            IMAGE,
            "sh",
            "-c",
            "for i in 1 2 3 4; do echo line$i; sleep 1; done",
        ])
        .await;
    let followed = docker.ok(&["logs", "-f", "ep-follow"]).await;
    assert!(
        followed.contains("line1") && followed.contains("line4"),
        "{followed}"
    );
    let saw_start = tokio::time::timeout(Duration::from_secs(20), async {
        while let Ok(Some(line)) = event_lines.next_line().await {
            if line.contains("start") && line.contains("ep-follow") {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(saw_start, Ok(true), "docker events streamed the start");
    let _ = events.kill().await;
    docker.ok(&["rm", "-f", "ep-follow"]).await;

    // A bodiless answer (204 to DELETE) is followed by nothing but the next answer on the same
    // connection: no chunked terminator in between.
    docker
        .ok(&["create", "--name", "ep-raw", IMAGE, "true"])
        .await;
    let delete = format!(
        "DELETE /api/endpoints/{id}/docker/containers/ep-raw?force=1 HTTP/1.1\r\nHost: cp\r\n\
         X-API-Key: {ADMIN_KEY}\r\n\r\n\
         GET /api/endpoints/{id}/docker/_ping HTTP/1.1\r\nHost: cp\r\nX-API-Key: {ADMIN_KEY}\r\n\
         Connection: close\r\n\r\n"
    );
    let answer = testkit::api::raw_https(&cp.url, delete.as_bytes()).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 204"), "{answer}");
    let (_, after_head) = answer.split_once("\r\n\r\n").expect("a complete head");
    assert!(
        after_head.starts_with("HTTP/1.1 200"),
        "bytes between the 204 and the next answer: {after_head:?}"
    );
    assert!(after_head.ends_with("OK"), "{after_head:?}");

    docker.ok(&["stop", "-t", "1", "ep-web"]).await;
    docker.ok(&["rm", "ep-web"]).await;
    let all = docker.ok(&["ps", "-a"]).await;
    assert!(!all.contains("ep-web"), "{all}");

    // Idle engine connections are let go after `--engine-idle-timeout` (5 s), which lets
    // the tunnel count as idle ...
    eventually(
        Duration::from_secs(15),
        "idle engine connections let go",
        || async {
            (testkit::api::metric(&cp.metrics_url, "edgeplane_docker_engine_connections_idle")
                .await
                == 0.0)
                .then_some(())
        },
    )
    .await;
    // ... and the agent sends a snapshot and closes the tunnel after the inactivity timeout ...
    eventually(
        Duration::from_secs(30),
        "tunnel closed after inactivity",
        || async { (tunnel_state(&cp, id).await == "closed").then_some(()) },
    )
    .await;
    let url = cp.api(&format!("/api/endpoints/{id}/snapshot?section=engine"));
    let (status, snap, _) = testkit::api::admin_get(&http(), &url).await;
    assert_eq!(status, reqwest::StatusCode::OK, "{snap}");
    assert!(
        snap["snapshot"]["engine"]["version"]
            .as_str()
            .is_some_and(|v| !v.is_empty()),
        "{snap}"
    );
    // ... and the next request opens it again.
    let ps = docker.ok(&["ps", "-a"]).await;
    assert!(ps.contains("CONTAINER ID"), "{ps}");
    assert_eq!(tunnel_state(&cp, id).await, "open");

    // Faults end in a clear error, never a hang.
    // An unknown environment:
    let unknown = DockerCli::new(&data.path().join("tls-cert.pem"), port, 9999);
    let out = unknown.run(&["ps"]).await;
    assert!(!out.status.success());
    assert!(text(&out).contains("does not exist"), "{}", text(&out));
    // An environment whose agent never comes: 504 after --tunnel-wait.
    let (silent, _) = create_env(&cp, "never-connects").await;
    let out = DockerCli::new(&data.path().join("tls-cert.pem"), port, silent)
        .run(&["ps"])
        .await;
    assert!(!out.status.success());
    assert!(
        text(&out).contains("did not open its tunnel"),
        "{}",
        text(&out)
    );
    // An agent whose Docker socket is missing.
    let (broken, broken_key) = create_env(&cp, "no-engine").await;
    let broken_agent = Agent::standard(&broken_key, "unix:///nonexistent/docker.sock", "1m");
    let out = DockerCli::new(&data.path().join("tls-cert.pem"), port, broken)
        .run(&["ps"])
        .await;
    assert!(!out.status.success());
    assert!(text(&out).contains("DOCKER_HOST"), "{}", text(&out));
    // The async mode has no tunnel.
    let r = http()
        .post(cp.api("/api/endpoints"))
        .header("X-API-Key", ADMIN_KEY)
        .json(&json!({ "name": "metered", "mode": "async" }))
        .send()
        .await
        .unwrap();
    let async_id = r.json::<Value>().await.unwrap()["id"].as_u64().unwrap();
    let r = http()
        .get(cp.api(&format!("/api/endpoints/{async_id}/docker/_ping")))
        .header("X-API-Key", ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    assert!(r.text().await.unwrap().contains("async mode"));

    broken_agent.stop().await;
    agent.stop().await;
    cp.stop();
    drop(engine);
}
