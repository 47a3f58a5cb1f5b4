//! Faults under load (issue 11), as scenarios that the test suite runs small and a bench runs
//! at fleet scale (`control-plane/benches/faults.rs`, `scripts/faults`): the real
//! `control-plane` binaries, a real `redis-server`, the `loadtest` binary's agents with held
//! check-ins, and what the fleet went through second by second (the load test's timeline, the
//! admin summary of a replica that stays).
//!
//! Each scenario returns an [`Outcome`]: its figures, and the problems it saw against its
//! goal (empty when the goal held), so a test asserts and a bench reports the same thing.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::Deserialize;
use serde_json::{json, Value};
use store::EnvironmentStore as _;
use tokio::process::{Child, Command};

use crate::api::{http, ADMIN_KEY};
use crate::cert::TestCert;
use crate::control_plane::CpProcess;
use crate::gateway::{GatewayArgs, GatewayProcess};
use crate::process::bin;
use crate::redis::RedisServer;
use crate::wait::free_port;

/// How big a run is.
#[derive(Clone, Copy, Debug)]
pub struct Scale {
    pub agents: u64,
    /// The agents' check-in interval, seconds.
    pub interval: u64,
    /// How long the agents take to connect at first.
    pub ramp: Duration,
    /// How long the fleet is watched after the fault (or its end).
    pub observe: Duration,
}

impl Scale {
    /// A test's size: a few hundred agents at 2 s.
    pub fn small() -> Self {
        Self {
            agents: 300,
            interval: 2,
            ramp: Duration::from_secs(2),
            observe: Duration::from_secs(12),
        }
    }

    fn interval(&self) -> Duration {
        Duration::from_secs(self.interval)
    }
}

/// What a scenario measured, and what went against its goal.
#[derive(Debug)]
pub struct Outcome {
    pub name: &'static str,
    pub figures: Value,
    pub problems: Vec<String>,
}

impl Outcome {
    pub fn to_json(&self) -> Value {
        json!({"scenario": self.name, "figures": self.figures, "problems": self.problems})
    }
}

/// One line of the load test's `--timeline`.
#[derive(Clone, Debug, Deserialize)]
pub struct Point {
    pub unix_ms: u64,
    pub phase: String,
    pub connected: i64,
    pub polls_total: u64,
    pub errors: u64,
    pub refused: u64,
}

/// The `loadtest` binary running agents in the background.
pub struct Load {
    child: Child,
    timeline: PathBuf,
    report: PathBuf,
    dir: tempfile::TempDir,
}

impl Load {
    /// Agents with held check-ins against `target` for `run` after their ramp (the load test
    /// creates their environments first and deletes them at the end).
    pub fn start(target: &str, scale: Scale, run: Duration) -> Self {
        Self::start_with(target, scale, run, &[])
    }

    /// [`Self::start`] with more `loadtest` arguments (`--tunnel-engine ...`).
    pub fn start_with(target: &str, scale: Scale, run: Duration, extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir for the load test");
        let timeline = dir.path().join("timeline.jsonl");
        let report = dir.path().join("report.json");
        let log = std::fs::File::create(dir.path().join("loadtest.log")).expect("load test log");
        let child = Command::new(bin("loadtest"))
            .args([
                "--target",
                target,
                "--api-key",
                ADMIN_KEY,
                "--insecure",
                "--held",
            ])
            .args(["--agents", &scale.agents.to_string()])
            .args(["--interval", &scale.interval.to_string()])
            .args(["--ramp", &scale.ramp.as_secs().max(1).to_string()])
            .args(["--duration", &run.as_secs().max(1).to_string()])
            // Many sources: a fleet is many addresses (the per-source bounds are not the
            // point here).
            .args(["--sources", "64"])
            .args(extra)
            .arg("--timeline")
            .arg(&timeline)
            .arg("--report")
            .arg(&report)
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn loadtest");
        Self {
            child,
            timeline,
            report,
            dir,
        }
    }

    /// [`Self::start`], then waits until every agent is connected (within the ramp and two
    /// minutes) and for three intervals more, so every agent holds a check-in on its replica.
    pub async fn steady(target: &str, scale: Scale, run: Duration) -> Self {
        Self::steady_with(target, scale, run, &[]).await
    }

    /// [`Self::steady`] with more `loadtest` arguments.
    pub async fn steady_with(target: &str, scale: Scale, run: Duration, extra: &[&str]) -> Self {
        let load = Self::start_with(target, scale, run, extra);
        let n = scale.agents as i64;
        load.until(
            scale.ramp + Duration::from_secs(120),
            "every agent connected",
            |p| p.connected == n,
        )
        .await;
        tokio::time::sleep(scale.interval() * 3).await;
        load
    }

    /// The last `n` lines of the load test's log (its agents' warnings).
    pub fn log_tail(&self, n: usize) -> Vec<String> {
        tail(&self.dir.path().join("loadtest.log"), n)
    }

    /// The timeline so far.
    pub fn points(&self) -> Vec<Point> {
        read_points(&self.timeline)
    }

    /// The newest point.
    pub fn last(&self) -> Option<Point> {
        self.points().pop()
    }

    /// Waits (at most `within`) until the newest point satisfies `want`.
    pub async fn until(
        &self,
        within: Duration,
        what: &str,
        want: impl Fn(&Point) -> bool,
    ) -> Point {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(p) = self.last().filter(|p| want(p)) {
                return p;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "load test: timed out after {within:?} waiting for {what}; last point {:?}",
                self.last()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits for the load test to end; its report.
    pub async fn finish(mut self) -> Value {
        let status = tokio::time::timeout(Duration::from_secs(600), self.child.wait())
            .await
            .expect("load test ends")
            .expect("load test status");
        assert!(status.success(), "load test failed: {status}");
        serde_json::from_slice(&std::fs::read(&self.report).expect("load test report"))
            .expect("report JSON")
    }
}

/// The last `n` lines of the file at `path`.
fn tail(path: &Path, n: usize) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| (*l).to_owned())
        .collect()
}

fn read_points(path: &Path) -> Vec<Point> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// When a summary was read (ms), and its status counts (`None`: it could not be read).
type Samples = Arc<Mutex<Vec<(u64, Option<Value>)>>>;

/// Samples `/api/endpoints/summary` of one replica twice a second, for flickers.
struct Watch {
    samples: Samples,
    task: tokio::task::JoinHandle<()>,
}

impl Watch {
    fn start(url: String) -> Self {
        let samples: Samples = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn({
            let samples = Arc::clone(&samples);
            async move {
                let client = http();
                loop {
                    let r = client
                        .get(format!("{url}/api/endpoints/summary"))
                        .header("X-API-Key", ADMIN_KEY)
                        .timeout(Duration::from_secs(2))
                        .send()
                        .await;
                    let status = match r {
                        Ok(r) if r.status().is_success() => {
                            r.json::<Value>().await.ok().map(|v| v["status"].clone())
                        }
                        _ => None,
                    };
                    samples.lock().push((proto::clock::now_ms(), status));
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        });
        Self { samples, task }
    }

    /// The most `down` and `never` seen, and how many samples could not be read.
    fn worst(&self, since_ms: u64) -> (u64, u64, usize) {
        let samples = self.samples.lock();
        let mut worst = (0, 0, 0);
        for (_, status) in samples.iter().filter(|(at, _)| *at >= since_ms) {
            match status {
                Some(s) => {
                    worst.0 = worst.0.max(s["down"].as_u64().unwrap_or(0));
                    worst.1 = worst.1.max(s["never"].as_u64().unwrap_or(0));
                }
                None => worst.2 += 1,
            }
        }
        worst
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Replicas of one node sharing an API port (`--reuse-port`) and a Redis.
struct Node {
    port: u16,
    cert: TestCert,
    redis_url: String,
    dirs: Vec<tempfile::TempDir>,
}

impl Node {
    fn new(redis: &RedisServer) -> Self {
        Self {
            port: free_port(),
            cert: TestCert::generate(),
            redis_url: redis.url(),
            dirs: Vec::new(),
        }
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    fn args(&self) -> Vec<String> {
        vec![
            "--reuse-port".into(),
            "--no-embedded-gateway".into(),
            "--redis-url".into(),
            self.redis_url.clone(),
            "--tls-cert".into(),
            self.cert.cert.display().to_string(),
            "--tls-key".into(),
            self.cert.key.display().to_string(),
        ]
    }

    fn next_dir(&mut self) -> PathBuf {
        self.dirs
            .push(tempfile::tempdir().expect("replica data dir"));
        self.dirs.last().expect("just pushed").path().to_path_buf()
    }

    async fn replica(&mut self) -> CpProcess {
        let args = self.args();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let dir = self.next_dir();
        CpProcess::spawn_at(&dir, self.port, &args).await
    }

    fn launch(&mut self) -> CpProcess {
        let args = self.args();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let dir = self.next_dir();
        CpProcess::launch(&dir, self.port, &args)
    }
}

/// Environments bound to an Edge ID, read from Redis directly.
async fn bound(redis_url: &str) -> usize {
    let store = store::redis::RedisStore::connect(redis_url, "edgeplane:")
        .await
        .expect("connect to redis");
    store
        .list_environments()
        .await
        .expect("list")
        .iter()
        .filter(|e| e.edge_id.is_some())
        .count()
}

/// The first point at or after `at_ms`.
fn point_at(points: &[Point], at_ms: u64) -> Option<&Point> {
    points.iter().find(|p| p.unix_ms >= at_ms)
}

fn secs(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}

/// kill -9 one of `replicas` sharing a port: its agents reconnect to the others within two
/// intervals, no binding is lost, no agent is refused, no environment flickers `down`.
pub async fn replica_kill(scale: Scale, replicas: usize) -> Outcome {
    let redis = RedisServer::start();
    let mut node = Node::new(&redis);
    let mut procs = Vec::new();
    for _ in 0..replicas {
        procs.push(node.replica().await);
    }
    let run = scale.ramp + scale.observe * 2 + Duration::from_secs(10);
    let load = Load::steady(&node.url(), scale, run).await;
    let n = scale.agents as i64;
    let bound_before = bound(&node.redis_url).await;
    let watch = Watch::start(procs[0].url.clone());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = load.last().expect("a point");
    let killed_at = proto::clock::now_ms();
    let t = Instant::now();
    procs.pop().expect("a replica").kill();
    // Every agent checking in again (the killed replica's ones through the others).
    let mut recovered = None;
    let mut dipped = n;
    while t.elapsed() < scale.observe {
        let p = load.last().expect("a point");
        if p.unix_ms > killed_at {
            dipped = dipped.min(p.connected);
            if recovered.is_none() && dipped < n && p.connected == n {
                recovered = Some(Duration::from_millis(p.unix_ms - killed_at));
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let after = load.last().expect("a point");
    let (down, never, unread) = watch.worst(killed_at);
    drop(watch);
    let bound_after = bound(&node.redis_url).await;
    let report = load.finish().await;

    let mut problems = Vec::new();
    match recovered {
        Some(d) if d <= scale.interval() * 2 + Duration::from_secs(1) => {}
        Some(d) => problems.push(format!(
            "agents all back after {d:?}, more than two intervals"
        )),
        None if dipped == n => {
            problems.push("no agent noticed the kill (the killed replica held none?)".to_owned())
        }
        None => problems.push(format!(
            "not every agent back within {:?}: {} of {n}",
            scale.observe, after.connected
        )),
    }
    if after.refused > before.refused {
        problems.push(format!(
            "{} check-ins refused after the kill",
            after.refused - before.refused
        ));
    }
    if down > 0 || never > 0 {
        problems.push(format!(
            "environments flickered: up to {down} down and {never} never"
        ));
    }
    if bound_after != bound_before {
        problems.push(format!(
            "bindings {bound_before} before, {bound_after} after"
        ));
    }
    if unread > 0 {
        problems.push(format!(
            "{unread} summaries of the surviving replica failed"
        ));
    }
    Outcome {
        name: "replica_kill",
        figures: json!({
            "agents": scale.agents,
            "interval_secs": scale.interval,
            "replicas": replicas,
            "agents_cut_off": n - dipped,
            "all_back_after_secs": recovered.map(secs),
            "errors_after_kill": after.errors - before.errors,
            "refused_after_kill": after.refused - before.refused,
            "most_down": down,
            "most_never": never,
            "bound_before": bound_before,
            "bound_after": bound_after,
            "load_test": {"errors": report["errors"], "errors_by_kind": report["errors_by_kind"],
                          "hold_overshoot_ms": report["hold_overshoot_ms"]},
        }),
        problems,
    }
}

/// Redis stopped for `outage`, then started again (with its append-only file): check-ins of
/// bound agents keep being answered meanwhile, admin writes fail with a clear 503, a replica
/// started meanwhile waits and becomes ready when Redis returns, and heartbeats, bindings and
/// queued commands are all there afterwards.
pub async fn redis_outage(scale: Scale, outage: Duration) -> Outcome {
    let mut redis = RedisServer::start_with_aof();
    let mut node = Node::new(&redis);
    let procs = [node.replica().await, node.replica().await];
    let run = scale.ramp + outage + scale.observe * 2 + Duration::from_secs(20);
    let load = Load::steady(&node.url(), scale, run).await;

    // Commands queued for an async environment before the outage.
    let client = http();
    let created: Value = client
        .post(format!("{}/api/endpoints", node.url()))
        .header("X-API-Key", ADMIN_KEY)
        .json(&json!({"name": "sat-outage", "mode": "async"}))
        .send()
        .await
        .expect("create")
        .json()
        .await
        .expect("created");
    let sat = created["id"].as_u64().expect("id");
    let mut queued = Vec::new();
    for target in ["web", "db", "cache"] {
        let c: Value = client
            .post(format!("{}/api/endpoints/{sat}/commands", node.url()))
            .header("X-API-Key", ADMIN_KEY)
            .json(&json!({"type": "containerStop", "target": target}))
            .send()
            .await
            .expect("queue")
            .json()
            .await
            .expect("queued");
        queued.push(c["id"].clone());
    }
    let bound_before = bound(&node.redis_url).await;
    let before = load.last().expect("a point");

    let stopped_at = proto::clock::now_ms();
    redis.stop();
    // Meanwhile: an admin write, and a replica that starts.
    let write = client
        .post(format!("{}/api/endpoints", node.url()))
        .header("X-API-Key", ADMIN_KEY)
        .json(&json!({"name": "during-outage"}))
        .timeout(Duration::from_secs(30))
        .send()
        .await;
    let (write_status, write_body) = match write {
        Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
        Err(e) => (0, e.to_string()),
    };
    let mut late = node.launch();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let late_live_during = late.probe("/healthz").await;
    let late_ready_during = late.probe("/readyz").await;
    let elapsed = Duration::from_millis(proto::clock::now_ms() - stopped_at);
    tokio::time::sleep(outage.saturating_sub(elapsed)).await;
    let during = load.last().expect("a point");
    redis.restart();
    let restarted_at = Instant::now();
    let late_ready = late.ready_within(Duration::from_secs(60)).await;
    let late_ready_after = restarted_at.elapsed();

    // Afterwards: every queued command and every binding there, every heartbeat written
    // (everyone `up` on every replica).
    let commands: Value = client
        .get(format!("{}/api/endpoints/{sat}/commands", node.url()))
        .header("X-API-Key", ADMIN_KEY)
        .send()
        .await
        .expect("list commands")
        .json()
        .await
        .expect("commands");
    let kept: Vec<Value> = commands
        .as_array()
        .map(|a| a.iter().map(|c| c["id"].clone()).collect())
        .unwrap_or_default();
    // (It has no agent: it would count as `never` below.)
    let _ = client
        .delete(format!("{}/api/endpoints/{sat}", node.url()))
        .header("X-API-Key", ADMIN_KEY)
        .send()
        .await;
    let bound_after = bound(&node.redis_url).await;
    let watch = Watch::start(procs[0].url.clone());
    tokio::time::sleep(scale.observe).await;
    let (down, never, unread) = watch.worst(proto::clock::now_ms() - 2_000);
    drop(watch);
    let after = load.last().expect("a point");
    let summary: Value = client
        .get(format!("{}/api/endpoints/summary", late.url))
        .header("X-API-Key", ADMIN_KEY)
        .send()
        .await
        .expect("summary")
        .json()
        .await
        .unwrap_or(Value::Null);
    let report = load.finish().await;

    let mut problems = Vec::new();
    if during.errors > before.errors {
        problems.push(format!(
            "{} check-ins failed while Redis was down",
            during.errors - before.errors
        ));
    }
    if during.polls_total <= before.polls_total {
        problems.push("no check-in answered while Redis was down".to_owned());
    }
    if write_status != 503 || !write_body.contains("message") {
        problems.push(format!(
            "an admin write while Redis was down answered {write_status}: {write_body}"
        ));
    }
    if late_live_during != Some(200) || late_ready_during != Some(503) {
        problems.push(format!(
            "a replica started while Redis was down answered /healthz {late_live_during:?}, /readyz {late_ready_during:?}"
        ));
    }
    if !late_ready {
        problems.push("the replica started meanwhile never became ready".to_owned());
    }
    if after.errors > during.errors {
        problems.push(format!(
            "{} check-ins failed after Redis came back",
            after.errors - during.errors
        ));
    }
    if down > 0 || never > 0 || unread > 0 {
        problems.push(format!(
            "after Redis came back: up to {down} down, {never} never, {unread} summaries failed"
        ));
    }
    if summary["status"]["up"].as_u64() != Some(scale.agents) {
        problems.push(format!(
            "the replica started meanwhile counts {} up of {}",
            summary["status"], scale.agents
        ));
    }
    if bound_after != bound_before {
        problems.push(format!(
            "bindings {bound_before} before, {bound_after} after"
        ));
    }
    let mut kept_sorted = kept.clone();
    kept_sorted.sort_by_key(|v| v.as_u64());
    let mut queued_sorted = queued.clone();
    queued_sorted.sort_by_key(|v| v.as_u64());
    if kept_sorted != queued_sorted {
        problems.push(format!("commands {queued:?} queued, {kept:?} kept"));
    }
    Outcome {
        name: "redis_outage",
        figures: json!({
            "agents": scale.agents,
            "interval_secs": scale.interval,
            "outage_secs": secs(outage),
            "checkins_answered_during_outage": during.polls_total - before.polls_total,
            "errors_during_outage": during.errors - before.errors,
            "errors_after": after.errors - during.errors,
            "admin_write_during": {"status": write_status, "body": write_body},
            "late_replica_during": {"healthz": late_live_during, "readyz": late_ready_during},
            "late_replica_ready_after_secs": late_ready.then_some(secs(late_ready_after)),
            "up_after": summary["status"],
            "bound_before": bound_before,
            "bound_after": bound_after,
            "commands_queued": queued.len(),
            "commands_kept": kept.len(),
            "load_test": {"errors": report["errors"], "errors_by_kind": report["errors_by_kind"]},
        }),
        problems,
    }
}

/// A control plane (the single-node default: embedded store and gateway) restarted under
/// its agents: all `up` again within two intervals, and the reconnections cost no error
/// beyond the restart itself (no check-in fails once the new process is ready).
pub async fn restart(scale: Scale) -> Outcome {
    let dir = tempfile::tempdir().expect("data dir");
    let port = free_port();
    // Its embedded gateway on a port of its own (the default, 8000, is anyone's).
    let tunnel = format!("127.0.0.1:{}", free_port());
    let args = ["--tunnel-addr", tunnel.as_str()];
    let cp = CpProcess::spawn_at(dir.path(), port, &args).await;
    let run = scale.ramp + scale.observe * 2 + Duration::from_secs(20);
    let load = Load::steady(&cp.url, scale, run).await;
    let n = scale.agents as i64;
    let before = load.last().expect("a point");
    let stop_at = Instant::now();
    let stopped_ms = proto::clock::now_ms();
    cp.stop();
    let stopped_in = stop_at.elapsed();
    let mut cp = CpProcess::launch(dir.path(), port, &args);
    assert!(cp.ready_within(Duration::from_secs(30)).await, "restarted");
    let ready_ms = proto::clock::now_ms();
    let down_for = Duration::from_millis(ready_ms - stopped_ms);
    let watch = Watch::start(cp.url.clone());
    let t = Instant::now();
    let mut recovered = None;
    while t.elapsed() < scale.observe {
        let p = load.last().expect("a point");
        if recovered.is_none() && p.unix_ms > ready_ms && p.connected == n {
            recovered = Some(Duration::from_millis(p.unix_ms - ready_ms));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let points = load.points();
    let after = load.last().expect("a point");
    // A check-in that started before the new process was ready may still fail a moment
    // after: count errors from a second after it.
    let at_ready = point_at(&points, ready_ms + 1_000)
        .cloned()
        .unwrap_or(after.clone());
    let (down, never, unread) = watch.worst(ready_ms + scale.interval * 1_000 * 2);
    drop(watch);
    // What the new process refused, let go or timed out while the fleet came back.
    let server: serde_json::Map<String, Value> = crate::api::metric_samples(&cp.metrics_url)
        .await
        .into_iter()
        .filter(|(k, v)| {
            *v > 0.0
                && [
                    "edgeplane_api_connections_refused_total",
                    "edgeplane_connections_evicted_total",
                    "edgeplane_api_connections_timed_out_total",
                    "edgeplane_api_pending_bodies_dropped_total",
                ]
                .iter()
                .any(|p| k.starts_with(p))
        })
        .map(|(k, v)| (k, json!(v)))
        .collect();
    let report = load.finish().await;
    drop(cp);

    let mut problems = Vec::new();
    if stopped_in > scale.interval() {
        problems.push(format!(
            "stopping took {stopped_in:?}, more than an interval (the held check-ins waited)"
        ));
    }
    match recovered {
        Some(d) if d <= scale.interval() * 2 => {}
        Some(d) => problems.push(format!("all agents back {d:?} after the restart")),
        None => problems.push(format!(
            "not every agent back within {:?}: {} of {n}",
            scale.observe, after.connected
        )),
    }
    if after.errors > at_ready.errors {
        problems.push(format!(
            "{} check-ins failed after the restarted process was ready",
            after.errors - at_ready.errors
        ));
    }
    if after.refused > before.refused {
        problems.push(format!(
            "{} check-ins refused",
            after.refused - before.refused
        ));
    }
    if down > 0 || never > 0 || unread > 0 {
        problems.push(format!(
            "two intervals after the restart: up to {down} down, {never} never, {unread} summaries failed"
        ));
    }
    Outcome {
        name: "restart",
        figures: json!({
            "agents": scale.agents,
            "interval_secs": scale.interval,
            "stop_took_secs": secs(stopped_in),
            "unavailable_secs": secs(down_for),
            "all_back_after_ready_secs": recovered.map(secs),
            "errors_during_restart": at_ready.errors - before.errors,
            "errors_after_ready": after.errors - at_ready.errors,
            "refused": after.refused - before.refused,
            "server_refusals": server,
            "load_test": {"errors": report["errors"], "errors_by_kind": report["errors_by_kind"]},
        }),
        problems,
    }
}

/// How the tunnels of `ids` look in the store: how many are held by `gateway`, and how many
/// have no live location at all.
async fn tunnels_at(
    store: &store::redis::RedisStore,
    ids: &[u64],
    gateway: &str,
) -> (usize, usize) {
    use store::TunnelStore as _;
    let Ok(locations) = store.tunnel_locations(ids).await else {
        return (0, ids.len());
    };
    let held = locations
        .iter()
        .filter(|l| l.as_ref().is_some_and(|l| l.gateway_id == gateway))
        .count();
    let none = locations.iter().filter(|l| l.is_none()).count();
    (held, none)
}

/// `GET /_ping` through the control plane to each of `ids`, 64 at a time: the answers that
/// were not `200 OK`, and the latency of each call (ms, sorted).
async fn ping_all(url: &str, ids: &[u64]) -> (Vec<String>, Vec<f64>) {
    let client = http();
    let gate = Arc::new(tokio::sync::Semaphore::new(64));
    let mut calls = tokio::task::JoinSet::new();
    for &id in ids {
        let (client, gate) = (client.clone(), Arc::clone(&gate));
        let url = format!("{url}/api/endpoints/{id}/docker/_ping");
        calls.spawn(async move {
            let _turn = gate.acquire_owned().await.expect("semaphore");
            let t = Instant::now();
            let r = client.get(&url).header("X-API-Key", ADMIN_KEY).send().await;
            let ms = t.elapsed().as_secs_f64() * 1000.0;
            let failure = match r {
                Ok(r) if r.status().is_success() => match r.text().await {
                    Ok(body) if body == "OK" => None,
                    Ok(body) => Some(format!("{id}: answered {body:?}")),
                    Err(e) => Some(format!("{id}: {e}")),
                },
                Ok(r) => Some(format!(
                    "{id}: {} {}",
                    r.status(),
                    r.text().await.unwrap_or_default()
                )),
                Err(e) => Some(format!("{id}: {e}")),
            };
            (failure, ms)
        });
    }
    let mut failures = Vec::new();
    let mut latencies = Vec::new();
    while let Some(done) = calls.join_next().await {
        let (failure, ms) = done.expect("ping task");
        failures.extend(failure);
        latencies.push(ms);
    }
    latencies.sort_by(f64::total_cmp);
    (failures, latencies)
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    (sorted[i] * 10.0).round() / 10.0
}

/// kill -9 a gateway holding `tunnels` open tunnels (of agents of the `loadtest` binary, which
/// run the real agent's tunnel supervisor, under `scale.agents` agents with held check-ins on
/// two replicas): the tunnels are back through the other gateway within two intervals, every
/// one of them carries a Docker call again, and the check-ins never noticed.
pub async fn gateway_kill(scale: Scale, tunnels: usize) -> Outcome {
    let redis = RedisServer::start();
    let mut node = Node::new(&redis);
    let (cert, key) = (node.cert.cert.clone(), node.cert.key.clone());
    let gateway = |id: &str| GatewayArgs {
        id: id.to_owned(),
        port: 0,
        redis_url: redis.url(),
        redis_prefix: "edgeplane:".to_owned(),
        cert: cert.clone(),
        key: key.clone(),
        // The production default: the killed gateway stays registered (and its agents may try
        // it first) until this runs out.
        lease: "15s".to_owned(),
        rust_log: "warn".to_owned(),
    };
    // Only one gateway at first, so that it holds every tunnel.
    let mut first = GatewayProcess::start(&gateway("gw-a")).await;
    let procs = [node.replica().await, node.replica().await];
    let engine = crate::mini_engine::start();
    let run = scale.ramp + scale.observe * 2 + Duration::from_secs(30);
    let load = Load::steady_with(
        &node.url(),
        scale,
        run,
        &["--tunnel-engine", &format!("tcp://{engine}")],
    )
    .await;
    let url = procs[0].url.clone();
    let observer = store::redis::RedisStore::connect(&node.redis_url, "edgeplane:")
        .await
        .expect("connect to redis");

    // The operator's Docker calls open the tunnels.
    let listed: Vec<Value> = http()
        .get(format!("{url}/api/endpoints?start=0&limit={tunnels}"))
        .header("X-API-Key", ADMIN_KEY)
        .send()
        .await
        .expect("list environments")
        .json()
        .await
        .expect("environments JSON");
    let ids: Vec<u64> = listed.iter().filter_map(|e| e["id"].as_u64()).collect();
    assert_eq!(ids.len(), tunnels, "environments to open tunnels to");
    let t = Instant::now();
    let (open_failures, open_ms) = ping_all(&url, &ids).await;
    let opened_in = t.elapsed();
    let (held_before, _) = tunnels_at(&observer, &ids, "gw-a").await;

    // A second gateway, known to every replica (they list live gateways every 2 s).
    let second = GatewayProcess::start(&gateway("gw-b")).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let before = load.last().expect("a point");

    let killed_at = proto::clock::now_ms();
    let t = Instant::now();
    first.kill();
    let mut back = None;
    let mut most_missing = 0;
    let (mut held_after, mut missing) = (0, ids.len());
    while t.elapsed() < scale.observe {
        (held_after, missing) = tunnels_at(&observer, &ids, "gw-b").await;
        most_missing = most_missing.max(ids.len() - held_after);
        if held_after == ids.len() {
            back = Some(t.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Every tunnel carries a call again.
    let (after_failures, after_ms) = ping_all(&url, &ids).await;
    let after = load.last().expect("a point");
    let second_open = metric_at(second.metrics, "edgeplane_gateway_tunnels_open").await;
    let logs = json!({
        // Every agent of the killed gateway says it lost its tunnel: the rest is news.
        "loadtest": load
            .log_tail(usize::MAX)
            .into_iter()
            .filter(|l| !l.contains("tunnel lost"))
            .take(60)
            .collect::<Vec<_>>(),
        "gw-a": tail(first.log_path(), 30),
        "gw-b": tail(second.log_path(), 30),
    });
    let report = load.finish().await;

    let mut problems = Vec::new();
    if !open_failures.is_empty() {
        problems.push(format!(
            "{} calls failed while opening the tunnels, e.g. {:?}",
            open_failures.len(),
            &open_failures[..open_failures.len().min(3)]
        ));
    }
    if held_before != tunnels {
        problems.push(format!(
            "gw-a held {held_before} of {tunnels} tunnels before the kill"
        ));
    }
    match back {
        Some(d) if d <= scale.interval() * 2 => {}
        Some(d) => problems.push(format!(
            "tunnels all back after {d:?}, more than two intervals"
        )),
        None => problems.push(format!(
            "within {:?} only {held_after} of {tunnels} tunnels were back on gw-b ({missing} had no location)",
            scale.observe
        )),
    }
    if !after_failures.is_empty() {
        problems.push(format!(
            "{} calls failed after the tunnels came back, e.g. {:?}",
            after_failures.len(),
            &after_failures[..after_failures.len().min(3)]
        ));
    }
    if after.errors > before.errors {
        problems.push(format!(
            "{} check-ins failed after the kill (the gateway is not on their path)",
            after.errors - before.errors
        ));
    }
    let mut figures = json!({
            "agents": scale.agents,
            "interval_secs": scale.interval,
            "tunnels": tunnels,
            "opened_in_secs": secs(opened_in),
            "open_call_ms": {"p50": quantile(&open_ms, 0.5), "p99": quantile(&open_ms, 0.99)},
            "held_by_killed_gateway": held_before,
            "all_back_after_secs": back.map(secs),
            "most_missing": most_missing,
            "back_on_other_gateway": held_after,
            "other_gateway_tunnels_open": second_open,
            "call_after_ms": {"p50": quantile(&after_ms, 0.5), "p99": quantile(&after_ms, 0.99)},
            "calls_failed_after": after_failures.len(),
            "checkin_errors_after_kill": after.errors - before.errors,
            "killed_at_ms": killed_at,
            "load_test": {"errors": report["errors"], "errors_by_kind": report["errors_by_kind"]},
    });
    if !problems.is_empty() {
        figures["logs"] = logs;
    }
    Outcome {
        name: "gateway_kill",
        figures,
        problems,
    }
}

/// One sample of a gateway's metrics listener.
async fn metric_at(metrics: std::net::SocketAddr, name: &str) -> Option<f64> {
    let text = http()
        .get(format!("http://{metrics}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}
