//! Async mode's bytes on the wire: the real control plane (in-process), the real edge agent
//! with `EDGE_ASYNC=1` at the default intervals (60 s each), an engine with 20 containers
//! (an HTTP server here that answers like Docker), and a TCP proxy between agent and control
//! plane that counts every byte both ways (TLS records, HTTP heads, TCP payload; not the
//! TCP/IP headers).
//!
//!     cargo bench -p control-plane --bench async_bytes
//!
//! Phases: the first tick (full snapshot), then idle ticks for `DURATION` seconds (bytes per
//! day extrapolated from them), then one container stops on the engine and the next tick
//! carries the delta. Also printed: the payloads alone (the signed request frames) for an
//! unchanged tick and a one-container delta, and the same snapshot as full JSON for contrast.
//! Settings: `ASYNC_BENCH_DURATION` (seconds of idle ticks, default 300),
//! `ASYNC_BENCH_CONTAINERS` (20). The last line is one JSON object with every figure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use proto::async_mode::{AsyncRequest, SnapshotReport};
use proto::wire::CheckinRequest;
use serde_json::{json, Value};
use testkit::agent::AgentThread;
use testkit::bench::on_thread;
use testkit::{ControlPlane, ADMIN_KEY};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(format!("ASYNC_BENCH_{name}"))
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

// ---------------------------------------------------------------------------------------------
// The engine: answers the snapshot calls like Docker, for `n` containers; `stopped` turns the
// first container's state to `exited`.

const SERVICES: [&str; 4] = ["web", "api", "db", "cache"];

fn engine_answers(n: usize, stopped: bool) -> BTreeMap<&'static str, Value> {
    let containers: Vec<Value> = (0..n)
        .map(|i| {
            let state = if i == 0 && stopped { "exited" } else { "running" };
            let service = SERVICES[i % 4];
            json!({
                "Id": format!("{:064x}", 0xc0ffee_u64 * (i as u64 + 1)),
                "Names": [format!("/shop-{service}-{i}")],
                "Image": format!("registry.example.com/shop/{service}:1.{}", i % 3),
                "ImageID": format!("sha256:{:064x}", 0xbeef_u64 * (i as u64 % 4 + 1)),
                "Command": "/docker-entrypoint.sh run",
                "Created": 1_760_000_000 + i as i64,
                "State": state,
                "Status": if state == "running" { "Up 3 days" } else { "Exited (0) 1 second ago" },
                "Ports": [{"IP": "0.0.0.0", "PrivatePort": 8080 + i, "PublicPort": 18080 + i, "Type": "tcp"}],
                "Labels": {
                    "com.docker.compose.project": "shop",
                    "com.docker.compose.service": service,
                    "com.docker.compose.version": "2.29.1",
                    "maintainer": "ops@example.com"
                }
            })
        })
        .collect();
    let images: Vec<Value> = (0..4)
        .map(|i| {
            json!({
                "Id": format!("sha256:{:064x}", 0xbeef_u64 * (i + 1)),
                "RepoTags": [format!("registry.example.com/shop/{}:1.0", SERVICES[i as usize])],
                "Size": 50_000_000 + i,
                "Created": 1_750_000_000 + i
            })
        })
        .collect();
    BTreeMap::from([
        (
            "/version",
            json!({"Version": "27.3.1", "ApiVersion": "1.47", "Os": "linux", "Arch": "arm64", "KernelVersion": "6.1.0-rpi"}),
        ),
        (
            "/info",
            json!({"OperatingSystem": "Debian GNU/Linux 12", "NCPU": 4, "MemTotal": 4_000_000_000u64, "ServerVersion": "27.3.1"}),
        ),
        ("/containers/json", Value::Array(containers)),
        ("/images/json", Value::Array(images)),
        (
            "/volumes",
            json!({"Volumes": [{"Name": "shop_db", "Driver": "local", "Mountpoint": "/var/lib/docker/volumes/shop_db/_data"}]}),
        ),
        (
            "/networks",
            json!([{"Id": format!("{:064x}", 7), "Name": "shop_default", "Driver": "bridge", "Scope": "local"},
                   {"Id": format!("{:064x}", 8), "Name": "bridge", "Driver": "bridge", "Scope": "local"}]),
        ),
    ])
}

fn start_engine(n: usize, stopped: Arc<AtomicBool>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    listener.set_nonblocking(true).unwrap();
    on_thread("engine", move || async move {
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                continue;
            };
            let stopped = Arc::clone(&stopped);
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                        let answers = engine_answers(n, stopped.load(Ordering::Relaxed));
                        let body = answers
                            .get(req.uri().path())
                            .map_or_else(|| json!({"message": "page not found"}), Clone::clone);
                        async move {
                            Ok::<_, Infallible>(
                                Response::builder()
                                    .header("content-type", "application/json")
                                    .body(Full::new(Bytes::from(body.to_string())))
                                    .unwrap(),
                            )
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(sock), service)
                    .await;
            });
        }
    });
    addr
}

// ---------------------------------------------------------------------------------------------
// The counting proxy between the agent and the control plane

#[derive(Default)]
struct Counters {
    up: AtomicU64,
    down: AtomicU64,
    connections: AtomicU64,
}

impl Counters {
    fn read(&self) -> (u64, u64, u64) {
        (
            self.up.load(Ordering::Relaxed),
            self.down.load(Ordering::Relaxed),
            self.connections.load(Ordering::Relaxed),
        )
    }
}

fn start_proxy(listener: TcpListener, upstream: SocketAddr, counters: Arc<Counters>) {
    listener.set_nonblocking(true).unwrap();
    on_thread("proxy", move || async move {
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        loop {
            let Ok((client, _)) = listener.accept().await else {
                continue;
            };
            counters.connections.fetch_add(1, Ordering::Relaxed);
            let counters = Arc::clone(&counters);
            tokio::spawn(async move {
                let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                    return;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let c1 = Arc::clone(&counters);
                let up = async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    while let Ok(n) = cr.read(&mut buf).await {
                        if n == 0 || sw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                        c1.up.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    let _ = sw.shutdown().await;
                };
                let down = async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    while let Ok(n) = sr.read(&mut buf).await {
                        if n == 0 || cw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                        counters.down.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    let _ = cw.shutdown().await;
                };
                tokio::join!(up, down);
            });
        }
    });
}

/// Waits for the next burst of traffic and returns its bytes (up, down) and the connections
/// opened meanwhile, once the link has been quiet for `quiet`.
fn next_burst(c: &Counters, quiet: Duration, give_up: Duration) -> Option<(u64, u64, u64)> {
    let start = c.read();
    let deadline = Instant::now() + give_up;
    while c.read() == start {
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut last = c.read();
    let mut still_since = Instant::now();
    while still_since.elapsed() < quiet {
        std::thread::sleep(Duration::from_millis(20));
        let now = c.read();
        if now != last {
            last = now;
            still_since = Instant::now();
        }
    }
    Some((last.0 - start.0, last.1 - start.1, last.2 - start.2))
}

// ---------------------------------------------------------------------------------------------
// Payload sizes, computed with the protocol's own functions

fn snapshot_of(n: usize, stopped: bool) -> proto::snapshot::Snapshot {
    let a = engine_answers(n, stopped);
    let mut s = edge_agent::docker::map_snapshot(&edge_agent::docker::EngineAnswers {
        version: a["/version"].clone(),
        info: a["/info"].clone(),
        containers: a["/containers/json"].clone(),
        images: a["/images/json"].clone(),
        volumes: a["/volumes"].clone(),
        networks: a["/networks"].clone(),
    });
    s.taken_ms = 1_764_547_200_000;
    s
}

fn signed_frame(report: Option<SnapshotReport>) -> usize {
    let secret = proto::token::JoinSecret::generate();
    let edge = uuid::Uuid::new_v4();
    let ts = 1_764_547_200_000u64;
    let req = AsyncRequest {
        checkin: CheckinRequest {
            endpoint_id: 1234,
            edge_id: None,
            timestamp_lo: proto::wire::timestamp_lo(ts),
            timestamp_hi: None,
            interval_secs: 60,
            agent: None,
        },
        snapshot: report,
        results: Vec::new(),
        done_through: Some(17),
    };
    proto::proof::sign(
        &req,
        proto::proof::Route::Async,
        &proto::proof::ProofKey::derive(&secret, None),
        &edge,
        ts,
    )
    .unwrap()
    .len()
}

fn main() {
    if !testkit::bench::measuring() {
        return;
    }
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let duration = Duration::from_secs(setting("DURATION", 300));
    let n = setting("CONTAINERS", 20) as usize;

    // Payloads.
    let before = snapshot_of(n, false);
    let after = snapshot_of(n, true);
    let digest = proto::snapshot::digest(&before).unwrap();
    let full = proto::snapshot::compress(&before).unwrap();
    let delta =
        proto::snapshot::compress_delta(&proto::snapshot::diff(&before, &after).unwrap()).unwrap();
    let json_full = serde_json::to_vec(&before).unwrap();
    let json_zstd = zstd::bulk::compress(&json_full, 3).unwrap();
    let payload = json!({
        "unchanged_tick_frame": signed_frame(Some(SnapshotReport::Unchanged { digest })),
        "ping_only_frame": signed_frame(None),
        "one_container_delta_frame": signed_frame(Some(SnapshotReport::Delta(delta.clone()))),
        "one_container_delta_compressed": delta.len(),
        "full_snapshot_frame": signed_frame(Some(SnapshotReport::Full(full.clone()))),
        "full_snapshot_compressed": full.len(),
        "full_snapshot_json": json_full.len(),
        "full_snapshot_json_zstd": json_zstd.len(),
    });
    println!("async bytes: {n} containers, default intervals (60 s each)");
    println!("payloads (signed request frames, before HTTP and TLS):");
    for (k, v) in payload.as_object().unwrap() {
        println!("  {k:<34} {v} B");
    }

    // The wire.
    let dir = tempfile::tempdir().unwrap();
    let api = TcpListener::bind("127.0.0.1:0").unwrap();
    let api_addr = api.local_addr().unwrap();
    let proxy = TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy_url = format!("https://{}", proxy.local_addr().unwrap());
    let cp = ControlPlane::builder()
        .in_dir(dir.path())
        .api_listener(api)
        .public_url(proxy_url)
        .spawn();
    let counters = Arc::new(Counters::default());
    start_proxy(proxy, api_addr, Arc::clone(&counters));
    let stopped = Arc::new(AtomicBool::new(false));
    let engine = start_engine(n, Arc::clone(&stopped));

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let key = rt.block_on(async {
        let c = reqwest::Client::builder()
            .danger_accept_invalid_certs(true)
            .build()
            .unwrap();
        let v: Value = c
            .post(format!("{}/api/endpoints", cp.url))
            .header("X-API-Key", ADMIN_KEY)
            .json(&json!({"name": "metered-kiosk", "mode": "async"}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["edgeKey"].as_str().unwrap().to_owned()
    });
    let agent = AgentThread::start(
        "agent",
        edge_agent::Args {
            edge_key: Some(key),
            docker_host: Some(format!("tcp://{engine}")),
            async_mode: Some("1".into()),
            ..Default::default()
        },
    );

    let quiet = Duration::from_secs(3);
    let tick_wait = Duration::from_secs(75);
    let first = next_burst(&counters, quiet, Duration::from_secs(30)).expect("first tick");
    println!(
        "first tick (full snapshot, command fetch): {} B up, {} B down, {} connection(s)",
        first.0, first.1, first.2
    );
    let t0 = Instant::now();
    let base = counters.read();
    let mut ticks = Vec::new();
    while t0.elapsed() < duration {
        match next_burst(&counters, quiet, tick_wait) {
            Some(t) => {
                println!(
                    "  idle tick at +{:>3} s: {} B up, {} B down, {} new connection(s)",
                    t0.elapsed().as_secs(),
                    t.0,
                    t.1,
                    t.2
                );
                ticks.push(t);
            }
            None => break,
        }
    }
    // The window ends a whole number of intervals after the first tick.
    let end = counters.read();
    let idle_bytes = (end.0 - base.0) + (end.1 - base.1);
    let window = Duration::from_secs(60 * ticks.len() as u64);
    let per_day = idle_bytes as f64 / window.as_secs_f64().max(1.0) * 86_400.0;
    println!(
        "idle: {} ticks, {} B in {} s -> {:.0} B per day ({:.1} KiB), {:.1} B per tick",
        ticks.len(),
        idle_bytes,
        window.as_secs(),
        per_day,
        per_day / 1024.0,
        idle_bytes as f64 / ticks.len().max(1) as f64
    );

    stopped.store(true, Ordering::Relaxed);
    let change = next_burst(&counters, quiet, tick_wait).expect("change tick");
    println!(
        "tick after one container stopped (delta): {} B up, {} B down, {} new connection(s)",
        change.0, change.1, change.2
    );

    agent.stop(Duration::from_secs(30));
    cp.stop_blocking(Duration::from_secs(30));
    let report = json!({
        "bench": "async_bytes",
        "containers": n,
        "intervals_s": 60,
        "payload": payload,
        "wire": {
            "first_tick": {"up": first.0, "down": first.1, "connections": first.2},
            "idle_ticks": ticks.iter().map(|t| json!({"up": t.0, "down": t.1, "connections": t.2})).collect::<Vec<_>>(),
            "idle_bytes_per_day": per_day.round(),
            "idle_bytes_per_tick": (idle_bytes as f64 / ticks.len().max(1) as f64).round(),
            "one_container_change_tick": {"up": change.0, "down": change.1, "connections": change.2},
        }
    });
    println!("{report}");
}
