//! The tunnel, measured end to end in one process: a real control plane (embedded store and
//! gateway, on its own actix system thread), real edge agents (each on its own current-thread
//! runtime, as the agent binary runs), and a tiny HTTP/1.1 "engine" written here
//! (`GET /_ping`, `GET /bulk?bytes=N`, and just enough for the agent's snapshot).
//!
//!     cargo bench -p control-plane --bench tunnel
//!
//! Phases (`TUNNEL_BENCH_PHASES`, default all, comma-separated):
//! - `wake`: time from sending `GET /api/endpoints/{id}/docker/_ping` to the complete answer
//!   while the environment's tunnel is closed, at a random point of the check-in cycle: first
//!   `ROUNDS` per agent sent 0 to 1 interval after the tunnel closed ("anywhere"), then
//!   `SETTLED_ROUNDS` sent at least one interval after the agent's previous wake-up (as with
//!   the default 5 min inactivity timeout, where a tunnel never closes within one interval);
//! - `overhead`: sequential pings through an open tunnel versus directly to the engine, each on
//!   one kept-alive connection;
//! - `throughput`: one large `GET /bulk` through the tunnel versus directly, with the CPU time
//!   of every thread during the proxied transfer;
//! - `hops`: the tunnel's layers alone, one byte pipe each, agent side writing and gateway side
//!   reading on their own threads: TCP, TLS, `proto::mux` over TCP and over TLS, the agent's
//!   copy from the engine into the tunnel, and yamux with other knobs (frame size, a write
//!   buffer under yamux, growing stream windows), to show which hop costs what.
//!
//! Sizes: environment variables or `--name value` arguments (`--agents 5` is
//! `TUNNEL_BENCH_AGENTS=5`): `AGENTS` (20), `ROUNDS` (10), `SETTLED_ROUNDS` (5), `INTERVAL`
//! (5, seconds), `INACTIVITY` (`1s`, the agents' `EDGE_INACTIVITY_TIMEOUT` in the wake
//! phase), `PINGS` (5000), `BYTES` (2147483648), `BULK_RUNS` (2), `HOP_BYTES` (268435456),
//! `HOP_RUNS` (3), `HOPS` (names of hop variants; default all), `WORKERS` (the control plane's
//! API workers; default one per core), `PHASES`.
//!
//! Prints a human summary and, as the last line, one JSON object with every figure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rand::Rng as _;
use serde_json::{json, Value};
use testkit::agent::AgentThread;
use testkit::bench::on_thread;
use testkit::{ControlPlane, ADMIN_KEY};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

const CHUNK: usize = 256 * 1024;

// ---------------------------------------------------------------------------------------------
// Settings

struct Settings {
    agents: usize,
    rounds: usize,
    settled_rounds: usize,
    interval: u32,
    inactivity: String,
    pings: usize,
    bytes: u64,
    bulk_runs: usize,
    hop_bytes: u64,
    hop_runs: usize,
    workers: usize,
    phases: Vec<String>,
    /// Only these hop variants (all when empty).
    hops: Vec<String>,
}

fn list(s: &str) -> Vec<String> {
    s.split(',')
        .map(|p| p.trim().to_owned())
        .filter(|p| !p.is_empty())
        .collect()
}

impl Settings {
    fn load() -> Self {
        let mut given: BTreeMap<String, String> = std::env::vars()
            .filter_map(|(k, v)| {
                k.strip_prefix("TUNNEL_BENCH_")
                    .map(|n| (n.to_ascii_lowercase(), v))
            })
            .collect();
        let mut args = std::env::args().skip(1);
        while let Some(a) = args.next() {
            // `cargo bench` passes `--bench`; libtest-style filters are ignored.
            let Some(name) = a.strip_prefix("--") else {
                continue;
            };
            if name == "bench" {
                continue;
            }
            let (name, value) = match name.split_once('=') {
                Some((n, v)) => (n.to_owned(), v.to_owned()),
                None => match args.next() {
                    Some(v) => (name.to_owned(), v),
                    None => continue,
                },
            };
            given.insert(name.replace('-', "_").to_ascii_lowercase(), value);
        }
        let num = |name: &str, default: u64| -> u64 {
            given.get(name).map_or(default, |v| {
                v.trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("{name}: {v:?} is not a number"))
            })
        };
        let default_workers = control_plane::config::Limits::default().workers as u64;
        Self {
            agents: num("agents", 20) as usize,
            rounds: num("rounds", 10) as usize,
            settled_rounds: num("settled_rounds", 5) as usize,
            interval: num("interval", 5) as u32,
            inactivity: given
                .get("inactivity")
                .cloned()
                .unwrap_or_else(|| "1s".into()),
            pings: num("pings", 5000) as usize,
            bytes: num("bytes", 2 * 1024 * 1024 * 1024),
            bulk_runs: num("bulk_runs", 2).max(1) as usize,
            hop_bytes: num("hop_bytes", 256 * 1024 * 1024),
            hop_runs: num("hop_runs", 3).max(1) as usize,
            workers: num("workers", default_workers).max(1) as usize,
            phases: list(
                given
                    .get("phases")
                    .map_or("wake,overhead,throughput,hops", String::as_str),
            ),
            hops: list(given.get("hops").map_or("", String::as_str)),
        }
    }

    fn has(&self, phase: &str) -> bool {
        self.phases.iter().any(|p| p == phase)
    }

    fn json(&self) -> Value {
        json!({
            "agents": self.agents, "rounds": self.rounds, "settled_rounds": self.settled_rounds, "interval_s": self.interval,
            "inactivity": self.inactivity, "pings": self.pings, "bytes": self.bytes,
            "bulk_runs": self.bulk_runs, "hop_bytes": self.hop_bytes, "hop_runs": self.hop_runs, "workers": self.workers,
            "phases": self.phases, "hops": self.hops,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Statistics

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

/// p50/p90/p99/max/mean of samples in milliseconds.
fn summary(samples: &[f64]) -> Value {
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    let mean = s.iter().sum::<f64>() / s.len().max(1) as f64;
    json!({
        "n": s.len(),
        "p50_ms": round3(percentile(&s, 0.50)),
        "p90_ms": round3(percentile(&s, 0.90)),
        "p99_ms": round3(percentile(&s, 0.99)),
        "max_ms": round3(s.last().copied().unwrap_or(f64::NAN)),
        "min_ms": round3(s.first().copied().unwrap_or(f64::NAN)),
        "mean_ms": round3(mean),
    })
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn mb_per_s(bytes: u64, d: Duration) -> f64 {
    (bytes as f64 / 1e6 / d.as_secs_f64() * 10.0).round() / 10.0
}

fn line(s: &Value) -> String {
    format!(
        "p50 {} ms, p90 {} ms, p99 {} ms, max {} ms (n={})",
        s["p50_ms"], s["p90_ms"], s["p99_ms"], s["max_ms"], s["n"]
    )
}

// ---------------------------------------------------------------------------------------------
// Per-thread CPU time (from /proc; no profiler needed)

/// `tid -> (name, ns on CPU)` of every thread of this process.
fn thread_cpu() -> BTreeMap<u32, (String, u64)> {
    let mut out = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for entry in dir.flatten() {
        let Ok(tid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let p = entry.path();
        let name = std::fs::read_to_string(p.join("comm"))
            .map(|s| s.trim().to_owned())
            .unwrap_or_default();
        let ns = std::fs::read_to_string(p.join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0);
        out.insert(tid, (name, ns));
    }
    out
}

/// CPU seconds per thread between two [`thread_cpu`] readings, busiest first (threads that
/// used less than 1 ms left out), names made unique with the thread id.
fn cpu_delta(
    before: &BTreeMap<u32, (String, u64)>,
    after: &BTreeMap<u32, (String, u64)>,
) -> Vec<(String, f64)> {
    let mut v: Vec<(String, f64)> = after
        .iter()
        .map(|(tid, (name, ns))| {
            let was = before.get(tid).map_or(0, |(_, b)| *b);
            (format!("{name}#{tid}"), ns.saturating_sub(was) as f64 / 1e9)
        })
        .filter(|(_, s)| *s >= 0.001)
        .collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1));
    v
}

// ---------------------------------------------------------------------------------------------
// The engine: a minimal Docker Engine API on plain TCP

fn start_engine() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind engine");
    let addr = listener.local_addr().expect("engine addr");
    listener.set_nonblocking(true).expect("nonblocking");
    on_thread("engine", move || async move {
        let listener = tokio::net::TcpListener::from_std(listener).expect("engine listener");
        loop {
            match listener.accept().await {
                Ok((sock, _)) => {
                    tokio::spawn(async move {
                        let _ = engine_connection(sock).await;
                    });
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    });
    addr
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

async fn engine_connection(mut sock: TcpStream) -> io::Result<()> {
    sock.set_nodelay(true)?;
    let zeros = vec![0u8; CHUNK];
    let mut buf = BytesMut::with_capacity(16 * 1024);
    loop {
        let end = loop {
            if let Some(i) = find(&buf, b"\r\n\r\n") {
                break i + 4;
            }
            if buf.len() > 64 * 1024 || sock.read_buf(&mut buf).await? == 0 {
                return Ok(());
            }
        };
        let head = buf.split_to(end);
        let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
        let mut lines = head.split("\r\n");
        let request = lines.next().unwrap_or_default().to_owned();
        let mut close = false;
        let mut body_len = 0usize;
        for l in lines {
            if let Some((name, value)) = l.split_once(':') {
                match name.trim() {
                    "connection" => close |= value.contains("close"),
                    "content-length" => body_len = value.trim().parse().unwrap_or(0),
                    _ => {}
                }
            }
        }
        // Discard a request body (none expected).
        while body_len > 0 {
            if buf.is_empty() && sock.read_buf(&mut buf).await? == 0 {
                return Ok(());
            }
            let n = body_len.min(buf.len());
            let _ = buf.split_to(n);
            body_len -= n;
        }
        let target = request.split(' ').nth(1).unwrap_or("/").to_owned();
        let (path, query) = target.split_once('?').unwrap_or((target.as_str(), ""));
        // The proxy may prefix an API version (`/v1.47/_ping`).
        let path = match path.strip_prefix("/v1.") {
            Some(rest) => rest.find('/').map_or(path, |i| &rest[i..]),
            None => path,
        };
        match path {
            "/_ping" => {
                sock.write_all(
                    b"HTTP/1.1 200 OK\r\nApi-Version: 1.47\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 2\r\n\r\nOK",
                )
                .await?;
            }
            "/bulk" => {
                let n: u64 = query
                    .split('&')
                    .find_map(|kv| kv.strip_prefix("bytes="))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {n}\r\n\r\n"
                );
                sock.write_all(head.as_bytes()).await?;
                let mut left = n;
                while left > 0 {
                    let k = (left as usize).min(CHUNK);
                    sock.write_all(&zeros[..k]).await?;
                    left -= k as u64;
                }
            }
            _ => {
                let (status, body) = match path {
                    "/version" => (
                        "200 OK",
                        r#"{"Version":"27.0.0-bench","ApiVersion":"1.47","Os":"linux","Arch":"amd64"}"#,
                    ),
                    "/info" => ("200 OK", r#"{"Name":"bench-engine","NCPU":2}"#),
                    "/containers/json" | "/images/json" | "/networks" => ("200 OK", "[]"),
                    "/volumes" => ("200 OK", r#"{"Volumes":[]}"#),
                    _ => ("404 Not Found", r#"{"message":"page not found"}"#),
                };
                let answer = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                sock.write_all(answer.as_bytes()).await?;
            }
        }
        if close {
            let _ = sock.shutdown().await;
            return Ok(());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Threads with their own current-thread runtime

// ---------------------------------------------------------------------------------------------
// Agents, each on its own thread and current-thread runtime (as the agent binary runs)

fn start_agent(name: &str, key: &str, docker_host: &str, inactivity: &str) -> AgentThread {
    AgentThread::start(
        name,
        edge_agent::Args {
            edge_key: Some(key.to_owned()),
            docker_host: Some(docker_host.to_owned()),
            inactivity_timeout: Some(inactivity.to_owned()),
            ..Default::default()
        },
    )
}

// ---------------------------------------------------------------------------------------------
// Operator-side HTTP

fn client(pool: usize) -> reqwest::Client {
    reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .http1_only()
        .pool_max_idle_per_host(pool)
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(60))
        .build()
        .expect("reqwest client")
}

async fn create_env(
    api: &reqwest::Client,
    cp: &ControlPlane,
    name: &str,
    interval: u32,
) -> (u64, String) {
    let r = api
        .post(format!("{}/api/endpoints", cp.url))
        .header("X-API-Key", ADMIN_KEY)
        .json(&json!({ "name": name, "checkinInterval": interval }))
        .send()
        .await
        .expect("create environment");
    assert_eq!(r.status(), 201, "create environment {name}");
    let v: Value = r.json().await.expect("environment JSON");
    (
        v["id"].as_u64().expect("id"),
        v["edgeKey"].as_str().expect("edgeKey").to_owned(),
    )
}

async fn get_env(api: &reqwest::Client, cp: &ControlPlane, id: u64) -> Option<Value> {
    api.get(format!("{}/api/endpoints/{id}", cp.url))
        .header("X-API-Key", ADMIN_KEY)
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()
}

async fn wait_up(api: &reqwest::Client, cp: &ControlPlane, ids: &[u64]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    for &id in ids {
        loop {
            if let Some(v) = get_env(api, cp, id).await {
                if v["status"] == "up" {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "environment {id} never came up");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Metric samples by full name including labels, e.g. `edgeplane_tunnel_wait_seconds_bucket{le="1"}`.
async fn metrics(cp: &ControlPlane) -> BTreeMap<String, f64> {
    testkit::api::metric_samples(&cp.metrics_url).await
}

fn metric_delta(
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
    prefix: &str,
) -> BTreeMap<String, f64> {
    after
        .iter()
        .filter(|(k, _)| k.starts_with(prefix))
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .collect()
}

fn metric_sum(m: &BTreeMap<String, f64>, prefix: &str) -> f64 {
    m.iter()
        .filter(|(k, _)| k.starts_with(prefix))
        .map(|(_, v)| v)
        .sum()
}

// ---------------------------------------------------------------------------------------------
// Phase 1: wake-up

/// One timed wake-up: (ms from send to the complete answer, or the error).
async fn wake_once(api: &reqwest::Client, cp: &ControlPlane, id: u64) -> (f64, Result<(), String>) {
    let t0 = Instant::now();
    let answer = async {
        let r = api
            .get(format!("{}/api/endpoints/{id}/docker/_ping", cp.url))
            .header("X-API-Key", ADMIN_KEY)
            .send()
            .await
            .map_err(|e| format!("send: {e}"))?;
        let status = r.status();
        let body = r.bytes().await.map_err(|e| format!("body: {e}"))?;
        if status != 200 || &body[..] != b"OK" {
            return Err(format!("{status}: {}", String::from_utf8_lossy(&body)));
        }
        Ok(())
    }
    .await;
    (ms(t0.elapsed()), answer)
}

/// A wake-up sample: its time, and how long after this environment's previous wake-up
/// answer it was sent (`None` for the first).
struct WakeSample {
    id: u64,
    /// Seconds since the start of the rounds when the request went out.
    at_s: f64,
    ms: f64,
    since_previous_s: Option<f64>,
}

/// `rounds` wake-ups per environment, all environments concurrently. Each round waits for the
/// tunnel to be closed; with `settled`, also until one check-in interval has passed since the
/// previous wake-up answer (the agent's next held check-in is out by then); then a random
/// delay of 0 to one interval, then the timed request.
async fn wake_rounds(
    s: &Settings,
    cp: &ControlPlane,
    api: &reqwest::Client,
    ids: &[u64],
    rounds: usize,
    settled: bool,
    previous: &mut BTreeMap<u64, Instant>,
) -> Value {
    let interval = Duration::from_secs(u64::from(s.interval));
    let before = metrics(cp).await;
    let started = Instant::now();
    let carried = previous.clone();
    let tasks = ids.iter().map(|&id| {
        let mut previous: Option<Instant> = carried.get(&id).copied();
        async move {
            let mut samples = Vec::new();
            let mut errors = Vec::new();
            for _ in 0..rounds {
                // The agent closes an idle tunnel after its inactivity timeout and a snapshot.
                let deadline = Instant::now() + Duration::from_secs(60);
                loop {
                    let state = get_env(api, cp, id)
                        .await
                        .map(|v| v["tunnel"]["state"].clone());
                    if state.as_ref().and_then(Value::as_str) == Some("closed") {
                        break;
                    }
                    if Instant::now() > deadline {
                        errors.push(format!("env {id}: tunnel still {state:?} after 60 s"));
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                if settled {
                    if let Some(p) = previous {
                        tokio::time::sleep_until((p + interval).into()).await;
                    }
                }
                let delay = rand::thread_rng().gen_range(0.0..interval.as_secs_f64());
                tokio::time::sleep(Duration::from_secs_f64(delay)).await;
                let since_previous_s = previous.map(|p| p.elapsed().as_secs_f64());
                let at_s = started.elapsed().as_secs_f64();
                let (took, answer) = wake_once(api, cp, id).await;
                previous = Some(Instant::now());
                match answer {
                    Ok(()) => samples.push(WakeSample {
                        id,
                        at_s,
                        ms: took,
                        since_previous_s,
                    }),
                    Err(e) => errors.push(format!("env {id}: {e} after {took:.0} ms")),
                }
            }
            (id, previous, samples, errors)
        }
    });
    let results = futures_util::future::join_all(tasks).await;
    let elapsed = started.elapsed();
    let after = metrics(cp).await;
    let mut samples = Vec::new();
    let mut errors = Vec::new();
    for (id, last, s, e) in results {
        if let Some(t) = last {
            previous.insert(id, t);
        }
        samples.extend(s);
        errors.extend(e);
    }
    let all: Vec<f64> = samples.iter().map(|w| w.ms).collect();
    let interval_s = interval.as_secs_f64();
    // Split by whether the agent's held check-in had been renewed since the previous wake-up.
    let recent: Vec<f64> = samples
        .iter()
        .filter(|w| w.since_previous_s.is_some_and(|g| g < interval_s))
        .map(|w| w.ms)
        .collect();
    let later: Vec<f64> = samples
        .iter()
        .filter(|w| !w.since_previous_s.is_some_and(|g| g < interval_s))
        .map(|w| w.ms)
        .collect();
    let wait = metric_delta(&before, &after, "edgeplane_tunnel_wait_seconds");
    let wait_count = metric_sum(&wait, "edgeplane_tunnel_wait_seconds_count");
    let wait_sum = metric_sum(&wait, "edgeplane_tunnel_wait_seconds_sum");
    let buckets: BTreeMap<String, f64> = wait
        .iter()
        .filter_map(|(k, v)| {
            let le = k.split("le=\"").nth(1)?.trim_end_matches("\"}");
            Some((le.to_owned(), *v))
        })
        .collect();
    // Held check-ins are not timed by the check-in histogram; plain ones are.
    let checkins = metric_delta(&before, &after, "edgeplane_checkin");
    let total = metric_sum(&checkins, "edgeplane_checkin_requests_total");
    let timed = metric_sum(&checkins, "edgeplane_checkin_duration_seconds_count");
    let (sum, sum_recent, sum_later) = (summary(&all), summary(&recent), summary(&later));
    println!(
        "  {} ({} s): {}",
        if settled {
            "settled: each request >= 1 interval after the previous wake-up"
        } else {
            "anywhere: 0-1 interval after the tunnel closed"
        },
        elapsed.as_secs(),
        line(&sum)
    );
    println!(
        "    of which sent < 1 interval after the previous wake-up: {}",
        line(&sum_recent)
    );
    println!(
        "    of which first or >= 1 interval after the previous one: {}",
        line(&sum_later)
    );
    let mut slowest: Vec<&WakeSample> = samples.iter().collect();
    slowest.sort_by(|a, b| b.ms.total_cmp(&a.ms));
    let slowest: Vec<String> = slowest
        .iter()
        .take(5)
        .map(|w| {
            format!(
                "env {} at +{:.2} s: {:.0} ms ({})",
                w.id,
                w.at_s,
                w.ms,
                w.since_previous_s.map_or("first".to_owned(), |g| format!(
                    "{g:.2} s after the previous answer"
                ))
            )
        })
        .collect();
    println!("    slowest: {}", slowest.join("; "));
    println!("    errors: {}", errors.len());
    for e in errors.iter().take(5) {
        println!("      {e}");
    }
    println!(
        "    server's edgeplane_tunnel_wait_seconds: {} requests, mean {:.1} ms; <= 0.1 s: {}, <= 0.5 s: {}, <= 1 s: {}, <= 2.5 s: {}",
        wait_count,
        wait_sum / wait_count.max(1.0) * 1000.0,
        buckets.get("0.1").copied().unwrap_or(0.0),
        buckets.get("0.5").copied().unwrap_or(0.0),
        buckets.get("1").copied().unwrap_or(0.0),
        buckets.get("2.5").copied().unwrap_or(0.0),
    );
    println!(
        "    check-ins meanwhile: {total} ({timed} plain, answered at once; {} held, on /edge/h)",
        total - timed
    );
    json!({
        "latency": sum,
        "sent_within_1_interval_of_previous": sum_recent,
        "first_or_after_1_interval": sum_later,
        "slowest": slowest,
        "errors": errors.len(),
        "error_samples": errors.iter().take(10).collect::<Vec<_>>(),
        "elapsed_s": round3(elapsed.as_secs_f64()),
        "tunnel_wait_histogram": {
            "count": wait_count,
            "mean_ms": round3(wait_sum / wait_count.max(1.0) * 1000.0),
            "cumulative_buckets_s": buckets,
        },
        "checkins": { "total": total, "plain": timed, "held": total - timed },
    })
}

async fn wake_phase(
    s: &Settings,
    cp: &ControlPlane,
    engine: SocketAddr,
    agents: &mut Vec<AgentThread>,
) -> Value {
    let api = client(usize::MAX);
    let docker_host = format!("tcp://{engine}");
    let mut ids = Vec::new();
    for i in 0..s.agents {
        let (id, key) = create_env(&api, cp, &format!("wake-{i}"), s.interval).await;
        agents.push(start_agent(
            &format!("agent-w{i}"),
            &key,
            &docker_host,
            &s.inactivity,
        ));
        ids.push(id);
    }
    wait_up(&api, cp, &ids).await;
    // Let every agent settle into held check-ins (its first one is a plain one).
    tokio::time::sleep(Duration::from_secs(1)).await;
    println!(
        "wake-up: {} agents at {} s check-ins, inactivity {}; time from sending GET .../docker/_ping to the complete answer",
        s.agents, s.interval, s.inactivity
    );
    let mut previous = BTreeMap::new();
    let anywhere = wake_rounds(s, cp, &api, &ids, s.rounds, false, &mut previous).await;
    let settled = if s.settled_rounds > 0 {
        wake_rounds(s, cp, &api, &ids, s.settled_rounds, true, &mut previous).await
    } else {
        Value::Null
    };
    json!({ "anywhere": anywhere, "settled": settled })
}

// ---------------------------------------------------------------------------------------------
// Phase 2: proxy overhead

async fn overhead_phase(s: &Settings, cp: &ControlPlane, engine: SocketAddr, id: u64) -> Value {
    let proxied = client(1);
    let direct = client(1);
    let front = client(1);
    let via_tunnel = format!("{}/api/endpoints/{id}/docker/_ping", cp.url);
    let missing = format!("{}/api/endpoints/999999/docker/_ping", cp.url);
    let to_engine = format!("http://{engine}/_ping");
    async fn ping(c: &reqwest::Client, url: &str, expect: u16) -> f64 {
        let t0 = Instant::now();
        let r = c
            .get(url)
            .header("X-API-Key", ADMIN_KEY)
            .send()
            .await
            .expect("ping");
        assert_eq!(r.status().as_u16(), expect, "{url}");
        let _ = r.bytes().await.expect("ping body");
        ms(t0.elapsed())
    }
    // Warm-up: the first proxied ping opens the tunnel; connections and caches get warm.
    for _ in 0..200 {
        ping(&proxied, &via_tunnel, 200).await;
        ping(&direct, &to_engine, 200).await;
        ping(&front, &missing, 404).await;
    }
    let mut p = Vec::with_capacity(s.pings);
    let mut d = Vec::with_capacity(s.pings);
    let mut f = Vec::with_capacity(s.pings);
    let started = Instant::now();
    for _ in 0..s.pings {
        // Interleaved, so both series see the same machine.
        d.push(ping(&direct, &to_engine, 200).await);
        p.push(ping(&proxied, &via_tunnel, 200).await);
        f.push(ping(&front, &missing, 404).await);
    }
    let elapsed = started.elapsed();
    let (ps, ds, fs) = (summary(&p), summary(&d), summary(&f));
    let diff50 = round3(ps["p50_ms"].as_f64().unwrap() - ds["p50_ms"].as_f64().unwrap());
    let diff99 = round3(ps["p99_ms"].as_f64().unwrap() - ds["p99_ms"].as_f64().unwrap());
    println!(
        "proxy overhead: {} sequential GET _ping each, interleaved, {:.1} s",
        s.pings,
        elapsed.as_secs_f64()
    );
    println!("  through the tunnel (HTTPS, kept alive): {}", line(&ps));
    println!("  directly to the engine (HTTP, kept alive): {}", line(&ds));
    println!(
        "  API front only (HTTPS, unknown environment, 404): {}",
        line(&fs)
    );
    println!("  overhead: p50 +{diff50} ms, p99 +{diff99} ms");
    json!({
        "proxied": ps, "direct": ds, "front_404": fs,
        "p50_overhead_ms": diff50, "p99_overhead_ms": diff99,
    })
}

// ---------------------------------------------------------------------------------------------
// Phase 3: throughput

/// Reads one `GET` answer to the end; returns (body bytes, time from send to last byte).
async fn bulk(c: &reqwest::Client, url: &str) -> (u64, Duration) {
    let t0 = Instant::now();
    let mut r = c
        .get(url)
        .header("X-API-Key", ADMIN_KEY)
        .send()
        .await
        .expect("bulk");
    assert_eq!(r.status(), 200, "{url}");
    let mut n = 0u64;
    while let Some(chunk) = r.chunk().await.expect("bulk body") {
        n += chunk.len() as u64;
    }
    (n, t0.elapsed())
}

async fn throughput_phase(s: &Settings, cp: &ControlPlane, engine: SocketAddr, id: u64) -> Value {
    let c = client(1);
    let via_tunnel = format!(
        "{}/api/endpoints/{id}/docker/bulk?bytes={}",
        cp.url, s.bytes
    );
    let to_engine = format!("http://{engine}/bulk?bytes={}", s.bytes);
    // Warm: tunnel open, connection up.
    let _ = bulk(
        &c,
        &format!("{}/api/endpoints/{id}/docker/bulk?bytes=1048576", cp.url),
    )
    .await;
    let mut direct = Vec::new();
    let mut proxied = Vec::new();
    let mut cpu = Vec::new();
    for _ in 0..s.bulk_runs {
        let (n, t) = bulk(&c, &to_engine).await;
        assert_eq!(n, s.bytes, "direct body length");
        direct.push(mb_per_s(n, t));
        let before = thread_cpu();
        let (n, t) = bulk(&c, &via_tunnel).await;
        let after = thread_cpu();
        assert_eq!(n, s.bytes, "proxied body length");
        proxied.push(mb_per_s(n, t));
        cpu.push((t.as_secs_f64(), cpu_delta(&before, &after)));
    }
    let best = |v: &[f64]| v.iter().copied().fold(f64::NAN, f64::max);
    println!(
        "throughput: GET /bulk of {} bytes, one stream, {} runs",
        s.bytes, s.bulk_runs
    );
    println!(
        "  through the tunnel: {:?} MB/s (best {})",
        proxied,
        best(&proxied)
    );
    println!(
        "  directly to the engine: {:?} MB/s (best {})",
        direct,
        best(&direct)
    );
    let (wall, threads) = cpu.last().cloned().unwrap_or_default();
    let total: f64 = threads.iter().map(|(_, c)| c).sum();
    println!("  CPU during the last proxied transfer ({wall:.2} s wall, {total:.2} CPU-s in all):");
    for (name, secs) in threads.iter().take(10) {
        println!(
            "    {name:<28} {secs:>6.2} s  ({:>3.0} % of wall)",
            secs / wall * 100.0
        );
    }
    json!({
        "proxied_mb_s": proxied, "direct_mb_s": direct,
        "proxied_best_mb_s": best(&proxied), "direct_best_mb_s": best(&direct),
        "last_proxied_wall_s": round3(wall),
        "last_proxied_cpu_s_by_thread": threads.iter().map(|(n, c)| (n.clone(), round3(*c))).collect::<BTreeMap<_, _>>(),
        "last_proxied_cpu_s_total": round3(total),
    })
}

// ---------------------------------------------------------------------------------------------
// Phase 4: the tunnel's layers alone

type Tls = (
    std::sync::Arc<rustls::ServerConfig>,
    std::sync::Arc<rustls::ClientConfig>,
);

/// The same TLS configurations as the tunnel: the control plane's server side, the agent's
/// pinned client side.
fn tunnel_tls(dir: &Path) -> Tls {
    std::fs::create_dir_all(dir).expect("tls dir");
    let material = control_plane::tls::load(
        &control_plane::config::TlsSource::SelfSigned,
        dir,
        &["127.0.0.1".to_owned()],
    )
    .expect("tls material");
    let mut server = (*material.server_config).clone();
    server.alpn_protocols = Vec::new();
    let client = edge_agent::tls::tunnel_config(material.fingerprint).expect("tunnel tls");
    (std::sync::Arc::new(server), client)
}

/// The multiplexer of a hop.
#[derive(Clone, Copy, Debug)]
enum Mux {
    None,
    /// `proto::mux`, exactly as the product runs it.
    Product,
    /// yamux 0.14 with other knobs, driven by [`spawn_custom_mux`].
    Custom {
        split_send: usize,
        /// Let stream windows grow past 256 KiB (yamux's auto-tuning, no connection cap).
        grow_window: bool,
        /// A write buffer between yamux and TLS, so a frame's header and body leave as one
        /// TLS record and one `write`.
        write_buffer: Option<usize>,
    },
}

/// What the "agent" side sends.
#[derive(Clone, Copy, Debug)]
enum Source {
    /// `write_all` of 256 KiB chunks of zeros.
    Zeros,
    /// The engine's answer to `GET /bulk`, copied with `copy_bidirectional_with_sizes` and
    /// this buffer size (the agent uses `copy_bidirectional`: 8 KiB).
    Engine { copy_buffer: usize },
}

#[derive(Clone, Copy, Debug)]
struct HopCfg {
    name: &'static str,
    what: &'static str,
    tls: bool,
    /// A read buffer under TLS (both sides): rustls reads the socket 4 KiB at a time.
    read_buffer: Option<usize>,
    mux: Mux,
    source: Source,
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

/// CPU time of the calling thread so far.
fn own_cpu() -> Duration {
    let ns = std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0);
    Duration::from_nanos(ns)
}

/// A yamux connection on its own task with `cfg`. The client side opens one stream, the
/// server side accepts the first; either is handed back, and the connection is driven until
/// it ends.
fn spawn_custom_mux<T: Io>(
    io: T,
    mode: yamux::Mode,
    cfg: yamux::Config,
) -> tokio::sync::oneshot::Receiver<yamux::Stream> {
    use tokio_util::compat::TokioAsyncReadCompatExt as _;
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut conn = yamux::Connection::new(io.compat(), cfg, mode);
        let mut tx = Some(tx);
        let client = matches!(mode, yamux::Mode::Client);
        std::future::poll_fn(|cx| {
            if client && tx.is_some() {
                if let std::task::Poll::Ready(r) = conn.poll_new_outbound(cx) {
                    match (r, tx.take()) {
                        (Ok(stream), Some(tx)) => {
                            let _ = tx.send(stream);
                        }
                        _ => return std::task::Poll::Ready(()),
                    }
                }
            }
            loop {
                match conn.poll_next_inbound(cx) {
                    std::task::Poll::Ready(Some(Ok(stream))) => {
                        if let Some(tx) = tx.take() {
                            let _ = tx.send(stream);
                        }
                    }
                    std::task::Poll::Ready(_) => return std::task::Poll::Ready(()),
                    std::task::Poll::Pending => return std::task::Poll::Pending,
                }
            }
        })
        .await;
    });
    rx
}

fn custom_config(split_send: usize, grow_window: bool) -> yamux::Config {
    let mut cfg = yamux::Config::default();
    // As proto::mux: 256 streams, each guaranteed 256 KiB; growing needs room above that.
    cfg.set_max_num_streams(256);
    cfg.set_max_connection_receive_window(if grow_window {
        None
    } else {
        Some(256 * 1024 * 256)
    });
    cfg.set_split_send_size(split_send);
    cfg
}

/// A multiplexed stream over `io` on the side `mode` (client: opens it; server: accepts it),
/// plus whatever keeps its session alive.
async fn mux_stream(io: Box<dyn Io>, mux: Mux, client: bool) -> (Box<dyn Io>, Box<dyn Send>) {
    match mux {
        Mux::None => unreachable!("no mux"),
        Mux::Product => {
            let mode = if client {
                proto::mux::Mode::Client
            } else {
                proto::mux::Mode::Server
            };
            let mut session = proto::mux::spawn(io, mode);
            let stream = if client {
                session.opener.open().await.expect("open stream")
            } else {
                session.inbound.recv().await.expect("inbound stream")
            };
            (Box::new(stream), Box::new(session.opener))
        }
        Mux::Custom {
            split_send,
            grow_window,
            write_buffer,
        } => {
            use tokio_util::compat::FuturesAsyncReadCompatExt as _;
            let mode = if client {
                yamux::Mode::Client
            } else {
                yamux::Mode::Server
            };
            let cfg = custom_config(split_send, grow_window);
            let rx = match write_buffer {
                Some(n) => spawn_custom_mux(tokio::io::BufWriter::with_capacity(n, io), mode, cfg),
                None => spawn_custom_mux(io, mode, cfg),
            };
            let stream = rx.await.expect("custom mux stream");
            (Box::new(stream.compat()), Box::new(()))
        }
    }
}

async fn write_zeros(w: &mut Box<dyn Io>, bytes: u64) {
    let zeros = vec![0u8; CHUNK];
    let mut left = bytes;
    while left > 0 {
        let k = (left as usize).min(CHUNK);
        w.write_all(&zeros[..k]).await.expect("hop write");
        left -= k as u64;
    }
    w.shutdown().await.expect("hop shutdown");
}

struct HopResult {
    bytes: u64,
    elapsed: Duration,
    writer_cpu: Duration,
    reader_cpu: Duration,
}

/// One byte pipe through `cfg`'s layers: the "agent" side (TLS client, yamux server) sends,
/// the "gateway" side (TLS server, yamux client, opener of the stream) reads to the end. Each
/// side on its own thread and current-thread runtime. The time runs from the opener's first
/// write (or the TCP accept) to the last byte read.
fn hop(cfg: HopCfg, bytes: u64, tls: &Tls, engine: SocketAddr) -> HopResult {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind hop");
    let addr = listener.local_addr().unwrap();
    listener.set_nonblocking(true).unwrap();
    let (done_tx, mut done_rx) = tokio::sync::oneshot::channel::<()>();
    let client_tls = tls.1.clone();
    let server_tls = tls.0.clone();
    let agent = on_thread("hop-agent", move || async move {
        let cpu0 = own_cpu();
        let tcp = TcpStream::connect(addr).await.expect("connect hop");
        tcp.set_nodelay(true).unwrap();
        let tcp: Box<dyn Io> = match cfg.read_buffer {
            Some(n) => Box::new(tokio::io::BufReader::with_capacity(n, tcp)),
            None => Box::new(tcp),
        };
        let io: Box<dyn Io> = if cfg.tls {
            let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
            Box::new(
                tokio_rustls::TlsConnector::from(client_tls)
                    .connect(name, tcp)
                    .await
                    .expect("tls connect"),
            )
        } else {
            tcp
        };
        let (mut stream, _session) = match cfg.mux {
            Mux::None => (io, Box::new(()) as Box<dyn Send>),
            mux => mux_stream(io, mux, false).await,
        };
        match cfg.source {
            Source::Zeros => {
                if !matches!(cfg.mux, Mux::None) {
                    let mut one = [0u8; 1];
                    stream.read_exact(&mut one).await.expect("opener's byte");
                }
                write_zeros(&mut stream, bytes).await;
            }
            Source::Engine { copy_buffer } => {
                let mut engine = TcpStream::connect(engine).await.expect("connect engine");
                engine.set_nodelay(true).unwrap();
                tokio::select! {
                    _ = tokio::io::copy_bidirectional_with_sizes(&mut stream, &mut engine, copy_buffer, copy_buffer) => {}
                    _ = &mut done_rx => return own_cpu() - cpu0,
                }
            }
        }
        let _ = done_rx.await;
        own_cpu() - cpu0
    });
    let gateway = on_thread("hop-gateway", move || async move {
        let cpu0 = own_cpu();
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let (tcp, _) = listener.accept().await.expect("accept hop");
        tcp.set_nodelay(true).unwrap();
        let mut t0 = Instant::now();
        let tcp: Box<dyn Io> = match cfg.read_buffer {
            Some(n) => Box::new(tokio::io::BufReader::with_capacity(n, tcp)),
            None => Box::new(tcp),
        };
        let io: Box<dyn Io> = if cfg.tls {
            Box::new(
                tokio_rustls::TlsAcceptor::from(server_tls)
                    .accept(tcp)
                    .await
                    .expect("tls accept"),
            )
        } else {
            tcp
        };
        let (mut stream, session) = match cfg.mux {
            Mux::None => (io, Box::new(()) as Box<dyn Send>),
            mux => {
                let (mut stream, session) = mux_stream(io, mux, true).await;
                t0 = Instant::now();
                match cfg.source {
                    Source::Engine { .. } => {
                        let req = format!(
                            "GET /bulk?bytes={bytes} HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n\r\n"
                        );
                        stream.write_all(req.as_bytes()).await.expect("request");
                    }
                    Source::Zeros => stream.write_all(b"x").await.expect("opener writes first"),
                }
                stream.flush().await.expect("flush");
                (stream, session)
            }
        };
        let mut buf = vec![0u8; CHUNK];
        let mut n = 0u64;
        loop {
            let k = stream.read(&mut buf).await.expect("hop read");
            if k == 0 {
                break;
            }
            n += k as u64;
        }
        let elapsed = t0.elapsed();
        let _ = done_tx.send(());
        drop(session);
        (n, elapsed, own_cpu() - cpu0)
    });
    let (n, elapsed, reader_cpu) = gateway.join().expect("gateway side");
    let writer_cpu = agent.join().expect("agent side");
    HopResult {
        bytes: n,
        elapsed,
        writer_cpu,
        reader_cpu,
    }
}

fn hop_configs() -> Vec<HopCfg> {
    const KIB: usize = 1024;
    let plain = |name, what, tls, read_buffer, mux, source| HopCfg {
        name,
        what,
        tls,
        read_buffer,
        mux,
        source,
    };
    let custom = |split_send, grow_window, write_buffer| Mux::Custom {
        split_send,
        grow_window,
        write_buffer,
    };
    let engine8 = Source::Engine {
        copy_buffer: 8 * KIB,
    };
    let engine64 = Source::Engine {
        copy_buffer: 64 * KIB,
    };
    let zeros = Source::Zeros;
    let rb = Some(64 * KIB);
    vec![
        plain("tcp", "TCP", false, None, Mux::None, zeros),
        plain(
            "tls",
            "TLS 1.3 (the tunnel's configs)",
            true,
            None,
            Mux::None,
            zeros,
        ),
        plain(
            "tls_read_buffer",
            "TLS over a 64 KiB read buffer",
            true,
            rb,
            Mux::None,
            zeros,
        ),
        plain(
            "yamux_tcp",
            "proto::mux over TCP",
            false,
            None,
            Mux::Product,
            zeros,
        ),
        plain(
            "yamux_tls",
            "proto::mux over TLS (the tunnel)",
            true,
            None,
            Mux::Product,
            zeros,
        ),
        plain(
            "agent_copy_8k",
            "engine -> agent copy 8 KiB (as now) -> tunnel",
            true,
            None,
            Mux::Product,
            engine8,
        ),
        plain(
            "agent_copy_64k",
            "engine -> agent copy 64 KiB -> tunnel",
            true,
            None,
            Mux::Product,
            engine64,
        ),
        plain(
            "custom_same",
            "yamux as proto::mux, own driver (control)",
            true,
            None,
            custom(16 * KIB, false, None),
            zeros,
        ),
        plain(
            "custom_write_buffer",
            "+ 64 KiB write buffer under yamux",
            true,
            None,
            custom(16 * KIB, false, Some(64 * KIB)),
            zeros,
        ),
        plain(
            "custom_split_64k",
            "+ 64 KiB yamux frames",
            true,
            None,
            custom(64 * KIB, false, None),
            zeros,
        ),
        plain(
            "custom_grow_window",
            "+ growing stream windows",
            true,
            None,
            custom(16 * KIB, true, None),
            zeros,
        ),
        plain(
            "combined_copy_64k",
            "copy 64 KiB, frames 64 KiB, both buffers",
            true,
            rb,
            custom(64 * KIB, false, Some(64 * KIB)),
            engine64,
        ),
    ]
}

fn hops_phase(s: &Settings, dir: &Path, engine: SocketAddr) -> Value {
    let tls = tunnel_tls(dir);
    let mut out = serde_json::Map::new();
    println!(
        "hops: one stream of {} bytes through each layer alone (writer = agent side, reader = gateway side, each on its own thread)",
        s.hop_bytes
    );
    let configs: Vec<HopCfg> = hop_configs()
        .into_iter()
        .filter(|c| s.hops.is_empty() || s.hops.iter().any(|h| h == c.name))
        .collect();
    // Runs interleaved (all variants, then again), so a burst of other load on the machine
    // does not hit one variant only; the best run is reported.
    let mut runs: Vec<Vec<(HopResult, f64)>> = configs.iter().map(|_| Vec::new()).collect();
    for _ in 0..s.hop_runs {
        for (cfg, results) in configs.iter().zip(runs.iter_mut()) {
            let engine_before = thread_cpu();
            let r = hop(*cfg, s.hop_bytes, &tls, engine);
            let engine_cpu: f64 = cpu_delta(&engine_before, &thread_cpu())
                .iter()
                .filter(|(t, _)| t.starts_with("engine#"))
                .map(|(_, c)| c)
                .sum();
            results.push((r, engine_cpu));
        }
    }
    for (cfg, results) in configs.iter().zip(runs) {
        let rates: Vec<f64> = results
            .iter()
            .map(|(r, _)| mb_per_s(r.bytes, r.elapsed))
            .collect();
        let (best_i, _) = rates
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .expect("one run");
        let (r, engine_cpu) = &results[best_i];
        let rate = rates[best_i];
        let per_gb = |d: Duration| d.as_secs_f64() / (r.bytes as f64 / 1e9);
        println!(
            "  {:<20} {:<46} best {rate:>7.1} MB/s of {:?}; CPU-s per GB: writer {:.2}, reader {:.2}, engine {:.2}",
            cfg.name,
            cfg.what,
            rates,
            per_gb(r.writer_cpu),
            per_gb(r.reader_cpu),
            engine_cpu / (r.bytes as f64 / 1e9),
        );
        out.insert(
            cfg.name.to_owned(),
            json!({
                "what": cfg.what, "best_mb_s": rate, "runs_mb_s": rates,
                "bytes": r.bytes,
                "writer_cpu_s_per_gb": round3(per_gb(r.writer_cpu)),
                "reader_cpu_s_per_gb": round3(per_gb(r.reader_cpu)),
                "engine_cpu_s_per_gb": round3(engine_cpu / (r.bytes as f64 / 1e9)),
            }),
        );
    }
    Value::Object(out)
}

// ---------------------------------------------------------------------------------------------

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn main() {
    if !testkit::bench::measuring() {
        return;
    }
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    // Logs of the control plane and the agents, on request (`RUST_LOG=edge_agent=debug`).
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .with_thread_names(true)
            .init();
    }
    let s = Settings::load();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "tunnel bench: {cores} cores, load average {} at start; settings {}",
        loadavg(),
        s.json()
    );
    let tmp = tempfile::tempdir().expect("tempdir");
    let engine = start_engine();
    let mut report = serde_json::Map::new();
    report.insert("bench".into(), json!("tunnel"));
    report.insert("cores".into(), json!(cores));
    report.insert("loadavg_start".into(), json!(loadavg()));
    report.insert("settings".into(), s.json());

    let needs_cp = s.has("wake") || s.has("overhead") || s.has("throughput");
    let mut agents = Vec::new();
    let cp = needs_cp.then(|| {
        ControlPlane::builder()
            .in_dir(&tmp.path().join("cp"))
            .workers(s.workers)
            .spawn()
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("client runtime");
    if let Some(cp) = &cp {
        runtime.block_on(async {
            if s.has("wake") {
                report.insert("wake".into(), wake_phase(&s, cp, engine, &mut agents).await);
            }
            if s.has("overhead") || s.has("throughput") {
                // A separate environment whose agent keeps its tunnel open.
                let api = client(1);
                let (id, key) = create_env(&api, cp, "open", s.interval).await;
                agents.push(start_agent(
                    "agent-open",
                    &key,
                    &format!("tcp://{engine}"),
                    "30m",
                ));
                wait_up(&api, cp, &[id]).await;
                if s.has("overhead") {
                    report.insert("overhead".into(), overhead_phase(&s, cp, engine, id).await);
                }
                if s.has("throughput") {
                    report.insert(
                        "throughput".into(),
                        throughput_phase(&s, cp, engine, id).await,
                    );
                }
            }
        });
    }
    if s.has("hops") {
        report.insert(
            "hops".into(),
            hops_phase(&s, &tmp.path().join("hops"), engine),
        );
    }
    report.insert("loadavg_end".into(), json!(loadavg()));

    // Stop agents and the control plane, bounded: a stuck shutdown must not hide the report.
    for a in agents {
        a.stop(Duration::from_secs(10));
    }
    if let Some(cp) = cp {
        cp.stop_blocking(Duration::from_secs(10));
    }
    println!("{}", Value::Object(report));
}
