//! The admin API at fleet scale (issue 11): the real `control-plane` binary on a real
//! `redis-server`, `ENVS` environments created through the bulk route (timed), heartbeats
//! written to Redis as replicas' write-behind would (60 % of the fleet `up` and kept up, 20 %
//! `down`, 20 % `never`), then each kind of list, filter and count asked `QUERIES` times in
//! a row from one kept-alive HTTPS client: latency as the client sees it (TLS and loopback
//! included).
//!
//!     cargo bench -p control-plane --bench admin_scale            # ADMIN_ENVS=100000
//!     ADMIN_ENVS=25000 ADMIN_QUERIES=100 cargo bench -p control-plane --bench admin_scale
//!
//! The first list builds the replica's index (reported apart); the figures after it are the
//! steady state. Then fleet operations (issue 12): a dynamic edge group selecting every
//! tagged environment (half the fleet), a static one of 1,000, an edge stack targeting both,
//! statuses for 60 % of its targets recorded as replicas would (running; error for ids ending
//! in 01), and the stack's counts, its error page and the group's members asked the same
//! way; then the web console's screens as a browser asks them (the overview's calls at once,
//! a filtered page of environments). The last line is one JSON object with every figure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use store::EnvironmentStore as _;
use testkit::bench::{measuring, number, settings};
use testkit::{CpProcess, RedisServer, ADMIN_KEY};

const GROUPS: u64 = 10;
const TAGS: u64 = 20;
const BULK: u64 = 1000;

async fn admin(client: &reqwest::Client, cp: &CpProcess, path: &str, body: Value) -> Value {
    let (status, answer) =
        testkit::api::admin_json(client, reqwest::Method::POST, &cp.api(path), &body).await;
    assert!(status.is_success(), "{path}: {status}");
    answer
}

/// Times `n` GETs of `path`: the samples (ms) and the last answer's total count (or body).
async fn measure(
    client: &reqwest::Client,
    cp: &CpProcess,
    path: &str,
    n: u64,
) -> (Vec<f64>, String) {
    let mut samples = Vec::with_capacity(n as usize);
    let mut last = String::new();
    for _ in 0..n {
        let t = Instant::now();
        let r = client
            .get(cp.api(path))
            .header("X-API-Key", ADMIN_KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
        let total = r
            .headers()
            .get("x-total-count")
            .map(|v| v.to_str().unwrap().to_owned());
        let body = r.bytes().await.unwrap();
        samples.push(t.elapsed().as_secs_f64() * 1000.0);
        last = total.unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
    }
    (samples, last)
}

fn main() {
    if !measuring() {
        return;
    }
    let given = settings("ADMIN_");
    let envs = number(&given, "envs", 100_000);
    let queries = number(&given, "queries", 200);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(envs, queries));
}

async fn run(envs: u64, queries: u64) {
    testkit::api::install_crypto();
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let cp = CpProcess::spawn(
        dir.path(),
        &["--redis-url", &redis.url(), "--no-embedded-gateway"],
    )
    .await;
    let client = testkit::http();

    for g in 0..GROUPS {
        admin(
            &client,
            &cp,
            "/api/groups",
            json!({"name": format!("site-{g}")}),
        )
        .await;
    }
    for t in 0..TAGS {
        admin(
            &client,
            &cp,
            "/api/tags",
            json!({"name": format!("tag-{t}")}),
        )
        .await;
    }
    // Environment i: group i % 10 + 1 (none for every 11th), tag i % 20 + 1 on every other
    // one, async every 10th.
    let started = Instant::now();
    let mut ids = Vec::with_capacity(envs as usize);
    let mut i = 0u64;
    while i < envs {
        let batch: Vec<Value> = (i..(i + BULK).min(envs))
            .map(|i| {
                let mut e = json!({"name": format!("shop-{i:06}")});
                if i % 11 != 0 {
                    e["groupId"] = json!(i % GROUPS + 1);
                }
                if i % 2 == 0 {
                    e["tagIds"] = json!([i % TAGS + 1]);
                }
                if i % 10 == 9 {
                    e["mode"] = json!("async");
                }
                e
            })
            .collect();
        let created = admin(&client, &cp, "/api/endpoints/bulk", Value::Array(batch)).await;
        ids.extend(
            created
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["id"].as_u64().unwrap()),
        );
        i += BULK;
    }
    let create_secs = started.elapsed().as_secs_f64();
    eprintln!("created {envs} environments in {create_secs:.1} s");

    // Heartbeats as the replicas' write-behind writes them: 60 % up (kept up meanwhile),
    // 20 % down (ten minutes ago), 20 % never.
    let store = Arc::new(
        store::redis::RedisStore::connect(&redis.url(), "edgeplane:")
            .await
            .unwrap(),
    );
    let now = proto::clock::now_ms();
    let up: Vec<u64> = ids.iter().copied().filter(|id| id % 10 < 6).collect();
    let down: Vec<(u64, u64)> = ids
        .iter()
        .filter(|id| (6..8).contains(&(*id % 10)))
        .map(|&id| (id, now - 600_000))
        .collect();
    store.record_heartbeats(&down).await.unwrap();
    let keep_up = tokio::spawn({
        let store = Arc::clone(&store);
        async move {
            loop {
                let now = proto::clock::now_ms();
                let beats: Vec<(u64, u64)> = up.iter().map(|&id| (id, now)).collect();
                store.record_heartbeats(&beats).await.unwrap();
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;

    let t = Instant::now();
    let (_, total) = measure(&client, &cp, "/api/endpoints?limit=1", 1).await;
    let build_ms = t.elapsed().as_secs_f64() * 1000.0;
    eprintln!("first list (builds the index): {build_ms:.1} ms, total {total}");

    let kinds = [
        (
            "page of 100",
            "/api/endpoints?start=50000&limit=100".to_owned(),
        ),
        (
            "status=down",
            "/api/endpoints?status=down&limit=100".to_owned(),
        ),
        (
            "status=up, one group",
            "/api/endpoints?status=up&groupId=3&limit=100".to_owned(),
        ),
        ("one tag", "/api/endpoints?tagIds=7&limit=100".to_owned()),
        (
            "search",
            "/api/endpoints?search=shop-0420&limit=100".to_owned(),
        ),
        (
            "async, never",
            "/api/endpoints?mode=async&status=never&limit=100".to_owned(),
        ),
        (
            "count (limit=1)",
            "/api/endpoints?status=up&limit=1".to_owned(),
        ),
        ("summary", "/api/endpoints/summary".to_owned()),
        ("page of 1000", "/api/endpoints?limit=1000".to_owned()),
    ];
    let mut figures = serde_json::Map::new();

    // Fleet operations over the same fleet.
    let dynamic = admin(
        &client,
        &cp,
        "/api/edge_groups",
        json!({"name": "tagged", "dynamic": true, "tagIds": (1..=TAGS).collect::<Vec<u64>>()}),
    )
    .await["id"]
        .as_u64()
        .unwrap();
    // Untagged ones: the static group adds to the dynamic one.
    let few: Vec<u64> = ids
        .iter()
        .copied()
        .filter(|id| id % 2 == 0)
        .take(1000)
        .collect();
    let few_set: std::collections::HashSet<u64> = few.iter().copied().collect();
    let fixed = admin(
        &client,
        &cp,
        "/api/edge_groups",
        json!({"name": "pilot", "environmentIds": few}),
    )
    .await["id"]
        .as_u64()
        .unwrap();
    let stack = admin(
        &client,
        &cp,
        "/api/edge_stacks",
        json!({"name": "signage", "compose": "services:\n  web:\n    image: nginx:1.27\n", "edgeGroupIds": [dynamic, fixed]}),
    )
    .await["id"]
        .as_u64()
        .unwrap();
    let targets: Vec<u64> = ids
        .iter()
        .copied()
        .filter(|id| (id - 1) % 2 == 0 || few_set.contains(id))
        .collect();
    let reports: Vec<store::StackStatus> = targets
        .iter()
        .filter(|id| *id % 10 < 6)
        .map(|&env| store::StackStatus {
            env,
            status: if env % 100 == 1 {
                store::DeployStatus::Error
            } else {
                store::DeployStatus::Running
            },
            version: 1,
            error: (env % 100 == 1).then(|| "pull access denied".to_owned()),
            updated_ms: now,
        })
        .collect();
    let started = Instant::now();
    for chunk in reports.chunks(1000) {
        store::StackStatusStore::record_stack_statuses(&*store, stack, chunk)
            .await
            .unwrap();
    }
    eprintln!(
        "{} statuses of {} targets recorded in {:.2} s",
        reports.len(),
        targets.len(),
        started.elapsed().as_secs_f64()
    );
    let fleet_ops = [
        ("stack with counts", format!("/api/edge_stacks/{stack}")),
        (
            "stack errors page",
            format!("/api/edge_stacks/{stack}/status?status=error&limit=100"),
        ),
        (
            "dynamic group members",
            format!("/api/edge_groups/{dynamic}/environments?start=10000&limit=100"),
        ),
    ];
    let kinds: Vec<(&str, String)> = kinds.into_iter().chain(fleet_ops).collect();
    for (name, path) in &kinds {
        let (samples, last) = measure(&client, &cp, path, queries).await;
        let s = testkit::stats::summary(&samples);
        let shown: String = last.chars().take(120).collect();
        eprintln!("{name:>22}: {} -> {shown}", testkit::stats::line(&s));
        figures.insert(
            (*name).to_owned(),
            json!({"path": path, "latency": s, "answer": shown}),
        );
    }
    // The web console's screens (issue 13): the overview asks its calls at once, the
    // environment list one filtered page; timed as the page waits for them.
    let overview = [
        "/api/endpoints/summary".to_owned(),
        "/api/groups".to_owned(),
        "/api/tags".to_owned(),
        "/api/edge_stacks?start=0&limit=200".to_owned(),
        format!("/api/edge_stacks/{stack}"),
    ];
    let screens: [(&str, &[String]); 3] = [
        ("console overview", &overview),
        (
            "console environments",
            &["/api/endpoints?start=0&limit=50&status=up&groupId=3".to_owned()],
        ),
        (
            "console search",
            &["/api/endpoints?start=0&limit=50&search=shop-0420".to_owned()],
        ),
    ];
    for (name, paths) in screens {
        let mut samples = Vec::with_capacity(queries as usize);
        for _ in 0..queries {
            let t = Instant::now();
            let calls = paths.iter().map(|p| measure(&client, &cp, p, 1));
            futures_util::future::join_all(calls).await;
            samples.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        let s = testkit::stats::summary(&samples);
        eprintln!("{name:>22}: {}", testkit::stats::line(&s));
        figures.insert(name.to_owned(), json!({"paths": paths, "latency": s}));
    }
    keep_up.abort();
    println!(
        "{}",
        json!({
            "environments": envs,
            "create_secs": testkit::stats::round3(create_secs),
            "first_list_ms": testkit::stats::round3(build_ms),
            "queries": figures,
            "server_rss_bytes": testkit::bench::rss_bytes(cp.pid()),
        })
    );
}
