//! Every hostile client of issue 10, one scenario after another, against the real
//! `control-plane` binary (embedded store and gateway), with the real `edge-agent` binary
//! on a real engine (Podman) holding a tunnel:
//!
//!     cargo bench -p control-plane --bench attack        # or scripts/attack
//!
//! Scenarios (`scenarios::ALL`): idle TCP connections and unfinished TLS handshakes on the API
//! port and on the tunnel port, slow request heads, stalled bodies (a head announcing 1 MiB
//! to the upload route, then one byte), trickled uploads (32 KiB every 2 s of a 1 MiB one, against
//! the budget of pending bodies), oversized bodies (1 MiB announced to a check-in's
//! route, refused at once: a flood of handshakes and refusals), garbage check-ins and uploads
//! aimed at the real agent's environment, and
//! zstd bombs (without and with the key). Each runs for `ATTACK_SECONDS` (30) from
//! `ATTACK_SOURCES` (40) loopback sources with `ATTACK_CONNECTIONS` (4000) connections, or
//! `ATTACK_FLOODS` (32) request senders; `ATTACK_ONLY` picks scenarios (comma-separated, run
//! in that order, repeats allowed).
//!
//! While it runs, once a second, from 127.0.0.1 on fresh connections: the real agent's last
//! check-in must be fresh, an admin call must answer, a Docker call through the tunnel must
//! answer. After it stops, the control plane's RSS must come back within 10 % of where it was
//! before (waited for up to `ATTACK_SETTLE` s, 120). Prints a table and, as the last line,
//! one JSON object with every figure (`scripts/attack` keeps it in `bench-results/`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod probes;
mod scenarios;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use testkit::agent::AgentProcess;
use testkit::api::allocator_bytes;
use testkit::bench::{open_fds, rss_bytes, rss_parts};
use testkit::{CpProcess, Engine};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use scenarios::{Sizes, Tally, Target};

/// The real agent's check-in interval; a check-in older than three of them is not fresh.
const INTERVAL: u64 = 5;

fn setting<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(format!("ATTACK_{name}"))
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    if !testkit::bench::measuring() {
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    // The attackers run on threads of their own: thousands of attacking tasks on the probes'
    // runtime would delay the probes themselves, and a real admin is not queued behind an
    // attacker's tasks (only behind its packets, and the server's work).
    let attackers = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("attacker")
        .enable_all()
        .build()
        .expect("attackers' runtime");
    let report = runtime.block_on(run(attackers.handle().clone()));
    println!("{report}");
    attackers.shutdown_background();
}

async fn run(attackers: tokio::runtime::Handle) -> Value {
    let seconds: u64 = setting("SECONDS", 30);
    let settle: u64 = setting("SETTLE", 120);
    let sizes = Sizes {
        connections: setting("CONNECTIONS", 4000),
        sources: setting("SOURCES", 40),
        floods: setting("FLOODS", 32),
    };
    // In the order given, repeats allowed: `slow_head,slow_head` shows whether a second round
    // of the same attack leaves more behind than the first.
    let chosen: Vec<String> = match std::env::var("ATTACK_ONLY") {
        Ok(only) => only.split(',').map(|s| s.trim().to_owned()).collect(),
        Err(_) => scenarios::ALL.iter().map(|s| (*s).to_owned()).collect(),
    };
    if let Some(unknown) = chosen
        .iter()
        .find(|s| !scenarios::ALL.contains(&s.as_str()))
    {
        panic!("no scenario {unknown:?}; known: {:?}", scenarios::ALL);
    }

    let engine = Engine::start();
    let data = tempfile::tempdir().expect("data dir");
    let tunnel_port = testkit::free_port();
    let cp = CpProcess::spawn(
        data.path(),
        &[
            "--tunnel-addr",
            &format!("127.0.0.1:{tunnel_port}"),
            "--tunnel-wait",
            "10s",
        ],
    )
    .await;
    let (env, key) = testkit::api::create_env_key(
        &cp.url,
        json!({"name": "attacked", "checkinInterval": INTERVAL}),
    )
    .await;
    let edge_id = Uuid::new_v4();
    // Idle tunnels close after a minute: probes once a second keep it open, as an operator's
    // session would.
    let agent = AgentProcess::standard(&key, edge_id, &engine.docker_host(), "60s");
    let target = Arc::new(Target {
        url: cp.url.clone(),
        api: SocketAddr::from(([127, 0, 0, 1], cp.port())),
        tunnel: SocketAddr::from(([127, 0, 0, 1], tunnel_port)),
        token: proto::JoinToken::parse(&key).expect("join key"),
        edge_id,
    });
    let freshness = Duration::from_secs(3 * INTERVAL);
    testkit::eventually(Duration::from_secs(60), "agent and tunnel up", || async {
        let r = probes::round(&cp.url, env, freshness).await;
        (r.agent_fresh && r.admin.is_some() && r.docker.is_some()).then_some(())
    })
    .await;
    // Warm: a few rounds, then the baseline.
    for _ in 0..5 {
        let _ = probes::round(&cp.url, env, freshness).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pid = cp.pid();
    let rss_start = rss_bytes(pid).expect("control plane alive");

    let mut rows = Vec::new();
    for name in chosen {
        let before = rss_bytes(pid).expect("control plane alive");
        let parts_before = rss_parts(pid);
        let allocator_before = allocator(&cp).await;
        let refused_before = refusals(&cp).await;
        let stop = CancellationToken::new();
        let tally = Arc::new(Tally::default());
        let attack = attackers.spawn(scenarios::run(
            name.clone(),
            Arc::clone(&target),
            sizes,
            stop.clone(),
            Arc::clone(&tally),
        ));
        let started = Instant::now();
        let (mut rounds, mut fresh, mut admin_ok, mut docker_ok) = (0u32, 0u32, 0u32, 0u32);
        let (mut admin_max, mut docker_max) = (Duration::ZERO, Duration::ZERO);
        let mut failures: Vec<String> = Vec::new();
        let (mut rss_peak, mut fds_peak, mut open_peak, mut pending_peak) = (before, 0, 0.0, 0.0);
        while started.elapsed() < Duration::from_secs(seconds) {
            let tick = Instant::now();
            let r = probes::round(&cp.url, env, freshness).await;
            rounds += 1;
            fresh += u32::from(r.agent_fresh);
            let at = started.elapsed().as_secs_f64();
            failures.extend(r.failures.iter().map(|f| format!("{at:.1} s: {f}")));
            if let Some(t) = r.admin {
                admin_ok += 1;
                admin_max = admin_max.max(t);
            }
            if let Some(t) = r.docker {
                docker_ok += 1;
                docker_max = docker_max.max(t);
            }
            rss_peak = rss_peak.max(rss_bytes(pid).unwrap_or(0));
            fds_peak = fds_peak.max(open_fds(pid).unwrap_or(0));
            let samples = metrics(&cp).await;
            open_peak = f64::max(open_peak, sample(&samples, "edgeplane_connections_open"));
            pending_peak = f64::max(
                pending_peak,
                sample(&samples, "edgeplane_connections_pending"),
            );
            if let Some(rest) = Duration::from_secs(1).checked_sub(tick.elapsed()) {
                tokio::time::sleep(rest).await;
            }
        }
        stop.cancel();
        let _ = attack.await;
        // Memory back: within 10 % of where it was, waited for.
        let settled_at = Instant::now();
        let mut after = rss_bytes(pid).unwrap_or(0);
        while after as f64 > before as f64 * 1.10
            && settled_at.elapsed() < Duration::from_secs(settle)
        {
            tokio::time::sleep(Duration::from_secs(1)).await;
            after = rss_bytes(pid).unwrap_or(0);
        }
        let settle_secs = settled_at.elapsed().as_secs_f64();
        let parts_after = rss_parts(pid);
        let allocator_after = allocator(&cp).await;
        let refused_after = refusals(&cp).await;
        let answers: serde_json::Map<String, Value> = tally
            .answers
            .lock()
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect();
        let row = json!({
            "scenario": name,
            "seconds": seconds,
            "attack": {
                "connects": tally.connects.load(Ordering::Relaxed),
                "closed_by_server": tally.closed.load(Ordering::Relaxed),
                "answers": answers,
            },
            "server": {
                "connections_open_peak": open_peak,
                "connections_pending_peak": pending_peak,
                "fds_peak": fds_peak,
                "refused_or_let_go": diff(&refused_before, &refused_after),
            },
            "probes": {
                "rounds": rounds,
                "agent_fresh": fresh,
                "admin_ok": admin_ok,
                "admin_max_ms": admin_max.as_secs_f64() * 1e3,
                "docker_ok": docker_ok,
                "docker_max_ms": docker_max.as_secs_f64() * 1e3,
                "failures": failures,
            },
            "rss": {
                "before_mib": mib(before),
                "peak_mib": mib(rss_peak),
                "after_mib": mib(after),
                "settle_secs": settle_secs,
                "within_10_percent": after as f64 <= before as f64 * 1.10,
                // `null` where /proc could not be read.
                "anon_before_mib": parts_before.map(|p| mib(p.0)),
                "anon_after_mib": parts_after.map(|p| mib(p.0)),
                "file_before_mib": parts_before.map(|p| mib(p.1)),
                "file_after_mib": parts_after.map(|p| mib(p.1)),
            },
            // What the program holds against what the allocator keeps, before and after.
            "allocator_mib": { "before": allocator_before, "after": allocator_after },
        });
        print_row(&row);
        rows.push(row);
    }
    // And over the whole run: where memory ended, against where the first attack started.
    let rss_end = rss_bytes(pid).unwrap_or(0);
    println!(
        "rss over the whole run: {} MiB before the first attack, {} MiB after the last",
        mib(rss_start),
        mib(rss_end)
    );
    let stopped = agent.stop();
    cp.stop();
    drop(engine);
    json!({ "scenarios": rows, "rss_start_mib": mib(rss_start), "rss_end_mib": mib(rss_end), "sizes": {
        "connections": sizes.connections, "sources": sizes.sources, "floods": sizes.floods,
    }, "agent_stopped_cleanly": stopped })
}

fn mib(bytes: u64) -> f64 {
    (bytes as f64 / 1048576.0 * 10.0).round() / 10.0
}

async fn metrics(cp: &CpProcess) -> std::collections::BTreeMap<String, f64> {
    // A probe must not panic: a failed scrape counts as no samples.
    testkit::api::try_metric_samples(&testkit::http(), &cp.metrics_url)
        .await
        .unwrap_or_default()
}

/// jemalloc's counts from `/metrics` (`edgeplane_allocator_<kind>_bytes`), in MiB by kind.
async fn allocator(cp: &CpProcess) -> Value {
    let kinds: serde_json::Map<String, Value> = allocator_bytes(&metrics(cp).await)
        .into_iter()
        .map(|(kind, v)| (kind.to_owned(), json!(mib(v as u64))))
        .collect();
    Value::Object(kinds)
}

fn sample(samples: &std::collections::BTreeMap<String, f64>, name: &str) -> f64 {
    samples.get(name).copied().unwrap_or(0.0)
}

/// Every counter of connections refused, let go at a deadline or evicted, and of check-ins by
/// result.
async fn refusals(cp: &CpProcess) -> std::collections::BTreeMap<String, f64> {
    metrics(cp)
        .await
        .into_iter()
        .filter(|(k, _)| {
            k.starts_with("edgeplane_api_connections_")
                || k.starts_with("edgeplane_gateway_connections_refused")
                || k.starts_with("edgeplane_gateway_handshakes_total")
                || k.starts_with("edgeplane_connections_evicted")
                || k.starts_with("edgeplane_checkin_requests_total")
        })
        .collect()
}

fn diff(
    before: &std::collections::BTreeMap<String, f64>,
    after: &std::collections::BTreeMap<String, f64>,
) -> Value {
    let moved: serde_json::Map<String, Value> = after
        .iter()
        .filter_map(|(k, v)| {
            let d = v - before.get(k).copied().unwrap_or(0.0);
            (d > 0.0).then(|| (k.clone(), json!(d)))
        })
        .collect();
    Value::Object(moved)
}

fn print_row(r: &Value) {
    let p = &r["probes"];
    let m = &r["rss"];
    println!(
        "{:<22} agent fresh {}/{}  admin {}/{} (max {:.0} ms)  docker {}/{} (max {:.0} ms)  \
         open<= {}  pending<= {}  rss {} -> {} -> {} MiB ({:.0} s){}",
        r["scenario"].as_str().unwrap_or_default(),
        p["agent_fresh"],
        p["rounds"],
        p["admin_ok"],
        p["rounds"],
        p["admin_max_ms"].as_f64().unwrap_or(0.0),
        p["docker_ok"],
        p["rounds"],
        p["docker_max_ms"].as_f64().unwrap_or(0.0),
        r["server"]["connections_open_peak"],
        r["server"]["connections_pending_peak"],
        m["before_mib"],
        m["peak_mib"],
        m["after_mib"],
        m["settle_secs"].as_f64().unwrap_or(0.0),
        if m["within_10_percent"] == true {
            ""
        } else {
            "  NOT BACK"
        },
    );
    let a = &r["allocator_mib"];
    println!(
        "    of rss: anonymous {} -> {} MiB, file-backed {} -> {} MiB; jemalloc: allocated {} -> {} \
         MiB, resident {} -> {} MiB, metadata {} -> {} MiB",
        m["anon_before_mib"],
        m["anon_after_mib"],
        m["file_before_mib"],
        m["file_after_mib"],
        a["before"]["allocated"],
        a["after"]["allocated"],
        a["before"]["resident"],
        a["after"]["resident"],
        a["before"]["metadata"],
        a["after"]["metadata"],
    );
    for f in p["failures"].as_array().into_iter().flatten().take(5) {
        println!("    ! {}", f.as_str().unwrap_or_default());
    }
}
