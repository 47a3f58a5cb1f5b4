//! The web console end to end, as an operator uses it: the real `control-plane` binary serving
//! its embedded console, a real headless Chromium (Debian's `chromium`, driven by
//! `control-plane/ui/e2e/console.mjs` with playwright-core; no browser is downloaded), real
//! agents and real Podman engines. The browser signs in, creates an environment; this harness
//! starts a real agent with the join key the page showed; the page sees it turn `up`, lists
//! its containers through the tunnel, runs `echo hello` in a shell in the browser and reads
//! `hello` back, stops a container and sees it stopped; then, for an async environment, queues
//! a stop from the snapshot and sees the command succeed.
//!
//! `SCREENSHOTS=<dir>` makes the script save the main screens (docs/screenshots comes from it).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::json;
use testkit::api::create_env_key;
use testkit::{eventually, http, Agent, CpProcess, Engine, ADMIN_KEY, IMAGE};

const STANDARD_NAME: &str = "kiosk-lobby";
const CONTAINER: &str = "signage-player";
const ASYNC_CONTAINER: &str = "pos-sync";
/// The whole browser run; each step has its own, shorter, limits in the script.
const SCRIPT_LIMIT: Duration = Duration::from_secs(300);

fn ui_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("ui")
}

/// The browser and Node.js the script needs: a clear failure (never a silent pass) when they
/// are missing. `scripts/test` installs them from Debian's packages.
fn chromium() -> String {
    let path = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".to_owned());
    assert!(
        Path::new(&path).exists(),
        "no browser at {path}: install Debian's chromium package (scripts/test does), or set CHROMIUM"
    );
    let node = Command::new("node").arg("--version").output();
    assert!(
        node.is_ok_and(|o| o.status.success()),
        "node not found: install Node.js (Debian's nodejs and npm packages; scripts/test does)"
    );
    path
}

/// playwright-core and the console's other packages, from the lock file (npm's registry).
fn npm_ci() {
    let ui = ui_dir();
    if ui
        .join("node_modules/playwright-core/package.json")
        .exists()
    {
        return;
    }
    let out = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
        .current_dir(&ui)
        .output()
        .expect("npm (install Debian's npm package; scripts/test does)");
    assert!(
        out.status.success(),
        "npm ci in {}: {}",
        ui.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[actix_web::test]
async fn an_operator_works_a_fleet_from_the_browser() {
    let browser = chromium();
    npm_ci();
    let standard_engine = Engine::start_isolated();
    let async_engine = Engine::start_isolated();
    for (engine, name) in [
        (&standard_engine, CONTAINER),
        (&async_engine, ASYNC_CONTAINER),
    ] {
        engine.docker(&["run", "-d", "--name", name, IMAGE, "sleep", "100000"]);
    }

    let data = tempfile::tempdir().unwrap();
    let tunnel = format!("127.0.0.1:{}", testkit::free_port());
    let cp = CpProcess::spawn(data.path(), &["--tunnel-addr", &tunnel]).await;

    // The async environment, up with a snapshot that lists its container.
    let (async_id, async_key) = create_env_key(
        &cp.url,
        json!({"name": "pos-terminal-7", "mode": "async", "pingInterval": 2,
               "snapshotInterval": 2, "commandInterval": 2}),
    )
    .await;
    let async_dir = tempfile::tempdir().unwrap();
    let _async_agent = Agent::start(edge_agent::Args {
        edge_key: Some(async_key),
        data_dir: Some(async_dir.path().to_owned()),
        docker_host: Some(async_engine.docker_host()),
        async_mode: Some("1".to_owned()),
        ..Default::default()
    });
    let snapshot_url = cp.api(&format!("/api/endpoints/{async_id}/snapshot"));
    eventually(
        Duration::from_secs(60),
        "the async environment's snapshot lists its container",
        || async {
            let r = http()
                .get(&snapshot_url)
                .header("X-API-Key", ADMIN_KEY)
                .send()
                .await
                .ok()?;
            let text = r.text().await.ok()?;
            text.contains(ASYNC_CONTAINER).then_some(())
        },
    )
    .await;

    let artifacts = tempfile::tempdir().unwrap();
    let mut script = Command::new("node")
        .arg(ui_dir().join("e2e/console.mjs"))
        .env("EDGEPLANE_URL", &cp.url)
        .env("EDGEPLANE_API_KEY", ADMIN_KEY)
        .env("STANDARD_ENV_NAME", STANDARD_NAME)
        .env("CONTAINER_NAME", CONTAINER)
        .env("ASYNC_ENV_ID", async_id.to_string())
        .env("ASYNC_CONTAINER_NAME", ASYNC_CONTAINER)
        .env("CHROMIUM", &browser)
        .env("E2E_ARTIFACTS", artifacts.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("node console.mjs");
    let mut stdin = script.stdin.take().expect("stdin");
    let stdout = script.stdout.take().expect("stdout");
    // The script's lines, read on a thread: the agent must start on this runtime when the
    // key arrives.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });

    let mut standard_agent = None;
    let agent_dir = tempfile::tempdir().unwrap();
    let mut steps = Vec::new();
    let outcome = tokio::time::timeout(SCRIPT_LIMIT, async {
        while let Some(line) = rx.recv().await {
            eprintln!("[console.mjs] {line}");
            if let Some(key) = line.strip_prefix("EDGE_KEY ") {
                standard_agent = Some(Agent::start(edge_agent::Args {
                    edge_key: Some(key.trim().to_owned()),
                    data_dir: Some(agent_dir.path().to_owned()),
                    docker_host: Some(standard_engine.docker_host()),
                    ..Default::default()
                }));
                writeln!(stdin, "AGENT_STARTED").expect("tell the script");
                stdin.flush().expect("flush");
            } else if let Some(step) = line.strip_prefix("STEP ") {
                steps.push(step.to_owned());
                if step.contains(" FAILED") {
                    return Err(step.to_owned());
                }
            } else if line == "DONE" {
                return Ok(());
            }
        }
        Err("the script ended without DONE".to_owned())
    })
    .await;
    let status = script.wait().expect("script exit");
    let kept = artifacts.keep();
    match outcome {
        Ok(Ok(())) => assert!(status.success(), "script exited with {status}"),
        Ok(Err(why)) => panic!(
            "the console failed: {why}\nsteps: {steps:#?}\nscreenshots and page dumps: {}",
            kept.display()
        ),
        Err(_) => {
            let _ = script.kill();
            panic!(
                "the browser run took more than {SCRIPT_LIMIT:?}; steps: {steps:#?}; artifacts: {}",
                kept.display()
            )
        }
    }
    let _ = std::fs::remove_dir_all(&kept);

    // What the page did, seen from the engines: the container it stopped is stopped, and so
    // is the one the async command stopped.
    let state = |engine: &Engine, name: &str| {
        engine.docker(&["inspect", "--format", "{{.State.Status}}", name])
    };
    assert_eq!(state(&standard_engine, CONTAINER), "exited");
    assert_eq!(state(&async_engine, ASYNC_CONTAINER), "exited");
    for step in [
        "sign-in",
        "create-environment",
        "environment-up",
        "list-containers",
        "shell",
        "stop-container",
        "async-queue-stop",
        "async-command-succeeded",
    ] {
        assert!(
            steps.iter().any(|s| s.starts_with(step)),
            "step {step} ran: {steps:#?}"
        );
    }
    if let Some(agent) = standard_agent {
        agent.stop().await;
    }
}
