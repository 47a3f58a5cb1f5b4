#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `/api/openapi.json` against real tools, and the server against its document both ways.
//!
//! A control plane runs in process on the embedded store, with a little of everything in it
//! (a tag, a group, a standard and an async environment, a static and a dynamic edge group, an
//! edge stack), so that ids the tester draws (small ones first) name real objects as well as
//! missing ones. Then, from a virtualenv of pinned PyPI packages kept under
//! `target/py-openapi/` (made once, with `python3 -m venv`):
//!
//! - `openapi-spec-validator` must accept the document (OpenAPI 3.1);
//! - Schemathesis generates requests from it, valid ones and invalid ones, every phase
//!   (examples, coverage, fuzzing, stateful through the document's links), a bounded number
//!   per operation, with a fixed seed and its example database under `target/py-openapi/`, and
//!   runs every check: no 5xx; every status, content type, header and body as documented;
//!   valid data accepted (2xx, or a refusal for what it names: 404, 409, 422); invalid data
//!   refused with a documented 4xx; 405 with `Allow` for other methods; auth enforced. Any
//!   failure fails the test with Schemathesis' report.
//!
//! Nothing is left out. The Docker proxy's operations and the exec terminal are run against
//! an environment that does not exist (the config below pins their `{id}`): an existing one
//! has no agent, and every call would wait the tunnel's deadline (15 s) for one to connect.
//! What they answer with a tunnel is `docker_cli.rs`'s and `console.rs`'s to test.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{json, Value};
use testkit::api::{admin_get, admin_json};
use testkit::{http, ControlPlane, ADMIN_KEY};

/// The PyPI packages, pinned: a new version is a deliberate change (it may check more).
const REQUIREMENTS: &[&str] = &["schemathesis==4.32.5", "openapi-spec-validator==0.9.0"];
/// Test cases per operation and phase: about 90 s for the whole run on a debug build.
const EXAMPLES: u32 = 20;
const SEED: u32 = 1;
/// The whole run may take this long before it is stopped and the test fails.
const RUN_WITHIN: Duration = Duration::from_secs(600);

/// Which statuses the data checks take, and the Docker proxy's pinned environment.
const CONFIG: &str = r#"# Written by control-plane/tests/openapi_conformance.rs on every run.

# Valid data is served, or refused for what it names: 404 (a path id that names nothing), 409
# (a conflict with what it changes), 422 (it fits the document, but names an object that does
# not exist or holds a compose file that does not check out). Never 400: a request that fits
# the document is never malformed. Never 5xx.
[checks.positive_data_acceptance]
expected-statuses = ["2xx", "404", "409", "422"]

# Invalid data is refused with a documented 4xx; 413 where a list is over what one call takes,
# 405 where an id that is not one names another route (GET /api/endpoints/bulk).
[checks.negative_data_rejection]
expected-statuses = ["400", "404", "405", "409", "413", "422"]

# The sign-in routes check credentials of their own: a key that is not the admin key, a
# missing session cookie, is 401 whatever the data.
[[operations]]
include-path = "/api/auth/session"
checks.positive_data_acceptance.expected-statuses = ["2xx", "401"]
checks.negative_data_rejection.expected-statuses = ["400", "401", "413"]

# An environment that does not exist: an existing one has no agent, and each call would wait
# the tunnel's deadline for one.
[[operations]]
include-path-regex = "/docker/|/exec/"
parameters = { "path.id" = 999999999 }
"#;

/// `<target>` of the running test (`<target>/<profile>/deps/<test>`).
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    exe.ancestors()
        .nth(3)
        .expect("the test executable sits in <target>/<profile>/deps")
        .to_owned()
}

fn work_dir() -> PathBuf {
    target_dir().join("py-openapi")
}

/// The virtualenv with [`REQUIREMENTS`], made or brought up to date once per test binary.
fn venv() -> &'static Path {
    static VENV: OnceLock<PathBuf> = OnceLock::new();
    VENV.get_or_init(|| {
        let dir = work_dir().join("venv");
        let python = dir.join("bin/python");
        if !python.exists() {
            let found = std::process::Command::new("python3")
                .arg("--version")
                .output();
            assert!(
                found.as_ref().is_ok_and(|o| o.status.success()),
                "python3 is not installed (scripts/test installs Debian's python3 and \
                 python3-venv): {found:?}"
            );
            std::fs::create_dir_all(work_dir()).unwrap();
            let out = std::process::Command::new("python3")
                .args(["-m", "venv"])
                .arg(&dir)
                .output()
                .expect("python3 -m venv");
            assert!(
                out.status.success(),
                "python3 -m venv {} failed (Debian needs python3-venv):\n{}{}",
                dir.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let marker = dir.join("edgeplane-requirements.txt");
        let wanted = REQUIREMENTS.join("\n");
        if std::fs::read_to_string(&marker).ok().as_deref() != Some(wanted.as_str()) {
            let out = std::process::Command::new(&python)
                .args([
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                ])
                .args(REQUIREMENTS)
                .output()
                .expect("pip");
            assert!(
                out.status.success(),
                "pip install {} failed (is PyPI reachable? does the venv have pip?):\n{}{}",
                REQUIREMENTS.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            std::fs::write(&marker, wanted).unwrap();
        }
        dir
    })
}

async fn create(cp: &ControlPlane, path: &str, body: Value) -> u64 {
    let (status, v) = admin_json(&http(), Method::POST, &cp.api(path), &body).await;
    assert!(status.is_success(), "{path} {body}: {status} {v}");
    v["id"].as_u64().unwrap()
}

/// A little of everything, with small ids.
async fn seed(cp: &ControlPlane) {
    let tag = create(cp, "/api/tags", json!({"name": "eu"})).await;
    let group = create(
        cp,
        "/api/groups",
        json!({"name": "stores", "tagIds": [tag]}),
    )
    .await;
    let kiosk = create(cp, "/api/endpoints", json!({"name": "kiosk"})).await;
    let sign = create(
        cp,
        "/api/endpoints",
        json!({"name": "sign", "mode": "async", "groupId": group, "tagIds": [tag],
               "variables": {"TZ": "UTC"}}),
    )
    .await;
    let both = create(
        cp,
        "/api/edge_groups",
        json!({"name": "both", "environmentIds": [kiosk, sign]}),
    )
    .await;
    create(
        cp,
        "/api/edge_groups",
        json!({"name": "tagged", "dynamic": true, "tagIds": [tag]}),
    )
    .await;
    create(
        cp,
        "/api/edge_stacks",
        json!({"name": "web", "compose": "services:\n  web:\n    image: nginx:${TZ}\n",
               "edgeGroupIds": [both], "rollout": {"batchSize": 1}}),
    )
    .await;
    create(
        cp,
        &format!("/api/endpoints/{sign}/commands"),
        json!({"type": "containerStop", "target": "web", "timeoutSecs": 5}),
    )
    .await;
}

/// Runs `program` with `args` until it ends (or [`RUN_WITHIN`] passes): its exit and its
/// output, stdout then stderr.
async fn run(program: &Path, args: &[String]) -> (bool, String) {
    let child = tokio::process::Command::new(program)
        .args(args)
        // What the tools keep of their own (Schemathesis' crash cache) stays there too.
        .current_dir(work_dir())
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e}", program.display()));
    let out = tokio::time::timeout(RUN_WITHIN, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{} ran over {RUN_WITHIN:?}", program.display()))
        .expect("its output");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[actix_web::test]
async fn the_document_is_valid_and_the_server_keeps_to_it_both_ways() {
    let venv = tokio::task::spawn_blocking(venv).await.unwrap();
    let cp = ControlPlane::start().await;
    seed(&cp).await;
    let started = Instant::now();

    // The document, as served, through the validator.
    let (status, doc, _) = admin_get(&http(), &cp.api("/api/openapi.json")).await;
    assert_eq!(status, reqwest::StatusCode::OK, "{doc}");
    let file = work_dir().join("openapi.json");
    std::fs::write(&file, serde_json::to_vec_pretty(&doc).unwrap()).unwrap();
    let (valid, report) = run(
        &venv.join("bin/openapi-spec-validator"),
        &[file.display().to_string()],
    )
    .await;
    assert!(
        valid,
        "openapi-spec-validator refuses the document:\n{report}"
    );

    // The server against the document.
    let config = work_dir().join("schemathesis.toml");
    std::fs::write(&config, CONFIG).unwrap();
    let args: Vec<String> = [
        "--config-file",
        &config.display().to_string(),
        "run",
        &cp.api("/api/openapi.json"),
        "--header",
        &format!("X-API-Key: {ADMIN_KEY}"),
        "--tls-verify",
        "false",
        "--checks",
        "all",
        "--mode",
        "all",
        "--max-examples",
        &EXAMPLES.to_string(),
        "--seed",
        &SEED.to_string(),
        "--workers",
        "1",
        "--generation-database",
        &work_dir().join("hypothesis-db").display().to_string(),
        "--request-timeout",
        "20",
        "--no-color",
    ]
    .iter()
    .map(ToString::to_string)
    .collect();
    let (passed, report) = run(&venv.join("bin/schemathesis"), &args).await;
    println!("{report}");
    println!(
        "openapi_conformance: validator and schemathesis took {:.0?}",
        started.elapsed()
    );
    assert!(
        passed,
        "Schemathesis found the server and its document at odds (report above):\n{report}"
    );
    cp.stop().await;
}
