//! Soak: does the control plane's behaviour hold over long uptime? The real binaries, for
//! `--minutes` (30 by default):
//!
//! - the release `control-plane` (embedded store and gateway), through `testkit::CpProcess`;
//! - `AGENTS` (295) simulated standard-mode agents with held check-ins: the `loadtest` binary
//!   (`--held`, the agent crate's own `PollClient`, one kept-alive TLS connection each);
//! - `REAL_AGENTS` (5) real `edge-agent` processes on one Podman engine (`testkit::Engine`),
//!   closing idle tunnels after `INACTIVITY` (`5s`), so every Docker call below wakes a closed
//!   tunnel: each real environment in a loop waits until its tunnel is closed, waits 0 to one
//!   interval, times `GET /api/endpoints/{id}/docker/_ping` (the wake-up), then makes two more
//!   real Docker calls (`/containers/json?all=1`, `/version`) through the open tunnel.
//!
//! Every `SAMPLE` seconds (30) one row: the control plane's RSS, open fds, threads and CPU
//! (`/proc/<pid>`), the real agents' RSS, its `/metrics` gauges (actors, connections,
//! gateway tunnels and streams, held check-ins queued, the fleet's per-environment maps,
//! check-ins in flight) and counter rates (check-ins by result, tunnels opened and closed,
//! Docker proxy answers, store errors, connections refused or timed out), and the wake-ups
//! of the window (n, errors, p50/p90/p99/max). Rows go to `<OUT>.csv` as they come; `<OUT>.json`
//! (rewritten each sample, `"complete": true` at the end) holds the rows, the settings, the
//! load test's own report and the summary: per series first, last, min, max, the
//! least-squares trend after `WARMUP` seconds (120, at most a quarter of the run) and a
//! verdict (see [`report`] for the rules). A last row is taken after the load test has
//! deleted its environments.
//!
//!     cargo build --release --workspace --bins
//!     cargo bench -p control-plane --bench soak -- --minutes 30 --out bench-results/soak-x
//!
//! (`scripts/soak` does both.) Settings: `SOAK_<NAME>` or `--name value`: `MINUTES` (30),
//! `SECONDS` (overrides minutes), `AGENTS` (295), `REAL_AGENTS` (5), `INTERVAL` (5),
//! `INACTIVITY` (`5s`), `SAMPLE` (30), `WARMUP` (120), `OUT` (default
//! `bench-results/soak-<UTC time>` in the workspace).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde_json::{json, Value};
use testkit::agent::AgentProcess;
use testkit::api::{create_env_key, http_with_timeout, try_metric_samples};
use testkit::process::bin;
use testkit::{CpProcess, Engine, ADMIN_KEY};

mod report;
mod sample;
mod wake;

use sample::{Row, Sampler};
use wake::Wakes;

pub(crate) struct Settings {
    pub(crate) seconds: u64,
    pub(crate) agents: usize,
    pub(crate) real_agents: usize,
    pub(crate) interval: u32,
    pub(crate) inactivity: String,
    pub(crate) sample: u64,
    pub(crate) warmup: u64,
    pub(crate) out: PathBuf,
}

impl Settings {
    fn load() -> Self {
        let given = testkit::bench::settings("SOAK_");
        let num = |name: &str, default: u64| testkit::bench::number(&given, name, default);
        let seconds = num("seconds", num("minutes", 30) * 60).max(1);
        let out = given.get("out").map_or_else(
            || {
                let stamp = time::OffsetDateTime::now_utc()
                    .format(time::macros::format_description!(
                        "[year][month][day]-[hour][minute][second]"
                    ))
                    .expect("time format");
                PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                    .join("../bench-results")
                    .join(format!("soak-{stamp}"))
            },
            PathBuf::from,
        );
        Self {
            seconds,
            agents: num("agents", 295) as usize,
            real_agents: num("real_agents", 5).max(1) as usize,
            interval: num("interval", 5).max(1) as u32,
            inactivity: given
                .get("inactivity")
                .cloned()
                .unwrap_or_else(|| "5s".into()),
            sample: num("sample", 30).max(1),
            warmup: num("warmup", 120).min(seconds / 4),
            out,
        }
    }

    fn json(&self) -> Value {
        json!({
            "seconds": self.seconds, "agents_simulated": self.agents, "agents_real": self.real_agents,
            "interval_s": self.interval, "inactivity": self.inactivity, "sample_s": self.sample,
            "warmup_s": self.warmup, "out": self.out.display().to_string(),
        })
    }

    fn path(&self, ext: &str) -> PathBuf {
        let mut p = self.out.clone().into_os_string();
        p.push(ext);
        PathBuf::from(p)
    }
}

fn main() {
    if !testkit::bench::measuring() {
        return;
    }
    testkit::api::install_crypto();
    let s = Settings::load();
    if let Some(dir) = s.out.parent() {
        std::fs::create_dir_all(dir).expect("results directory");
    }
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(run(&s));
}

/// The load test's child process, its report file and its log.
struct LoadTest {
    child: Child,
    report: PathBuf,
}

impl LoadTest {
    fn start(s: &Settings, cp: &CpProcess, duration: u64) -> Self {
        let report = s.path("-loadtest.json");
        let log = std::fs::File::create(s.path("-loadtest.log")).expect("loadtest log");
        let child = Command::new(bin("loadtest"))
            .args([
                "--target",
                &cp.url,
                "--api-key",
                ADMIN_KEY,
                "--insecure",
                "--held",
            ])
            .args(["--agents", &s.agents.to_string()])
            .args(["--duration", &duration.to_string()])
            .args(["--interval", &s.interval.to_string()])
            .args(["--server-pid", &cp.pid().to_string()])
            .arg("--report")
            .arg(&report)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("loadtest log"))
            .stderr(log)
            .spawn()
            .expect("spawn loadtest");
        Self { child, report }
    }

    /// Waits for it to end (at most `within`), then reads its report.
    async fn finish(mut self, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) if status.success() => break,
                Ok(Some(status)) => return json!({ "failed": status.to_string() }),
                Ok(None) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                _ => {
                    let _ = self.child.kill();
                    return json!({ "failed": format!("still running after {within:?}; killed") });
                }
            }
        }
        std::fs::read_to_string(&self.report)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_else(|| json!({ "failed": "no report" }))
    }
}

async fn run(s: &Settings) {
    let tmp = tempfile::tempdir().expect("tempdir");
    println!(
        "soak: {} s, {} simulated + {} real agents at {} s, inactivity {}, a row every {} s; results {}.{{csv,json}}",
        s.seconds,
        s.agents,
        s.real_agents,
        s.interval,
        s.inactivity,
        s.sample,
        s.out.display()
    );
    let engine = Engine::start();
    let tunnel = format!("127.0.0.1:{}", testkit::free_port());
    let cp = CpProcess::spawn(&tmp.path().join("cp"), &["--tunnel-addr", &tunnel]).await;
    let api = http_with_timeout(Duration::from_secs(60));

    let mut agents = Vec::new();
    let mut ids = Vec::new();
    for i in 0..s.real_agents {
        let body = json!({ "name": format!("soak-real-{i}"), "checkinInterval": s.interval });
        let (id, key) = create_env_key(&cp.url, body).await;
        agents.push(AgentProcess::standard(
            &key,
            uuid::Uuid::new_v4(),
            &engine.docker_host(),
            &s.inactivity,
        ));
        ids.push(id);
    }
    // The load test runs a little longer than the sampling, which starts once it is ramped up.
    let loadtest = (s.agents > 0).then(|| LoadTest::start(s, &cp, s.seconds + 30));
    let everyone = (s.agents + s.real_agents) as f64;
    testkit::eventually(Duration::from_secs(120), "every agent checking in", || {
        let (api, url) = (&api, &cp.metrics_url);
        async move {
            let m = try_metric_samples(api, url).await.ok()?;
            (m.get("edgeplane_fleet_agents_recent").copied()? >= everyone).then_some(())
        }
    })
    .await;
    println!("all {everyone} agents checking in; sampling");

    let started = Instant::now();
    let until = started + Duration::from_secs(s.seconds);
    let wakes = Arc::new(Mutex::new(Wakes::default()));
    let probes: Vec<_> = ids
        .iter()
        .map(|&id| {
            tokio::spawn(wake::probe(
                api.clone(),
                cp.url.clone(),
                id,
                Duration::from_secs(u64::from(s.interval)),
                started,
                until,
                Arc::clone(&wakes),
            ))
        })
        .collect();

    let mut sampler = Sampler::new(s, &cp, agents.iter().map(AgentProcess::pid).collect());
    let mut rows: Vec<Row> = Vec::new();
    let mut csv = report::Csv::create(&s.path(".csv"));
    sampler.start().await;
    for k in 1..=(s.seconds / s.sample).max(1) {
        tokio::time::sleep_until((started + Duration::from_secs(k * s.sample)).into()).await;
        let window = std::mem::take(&mut *wakes.lock());
        let row = sampler
            .row(started.elapsed().as_secs_f64(), Some(&window))
            .await;
        csv.write(&row);
        println!("{}", report::human(&row));
        rows.push(row);
        report::write_json(s, &rows, None, &Value::Null, false);
    }

    // Tear down: probes end at `until`, then the real agents, then the load test (which
    // deletes its environments); a last row shows what the control plane keeps afterwards.
    for p in probes {
        let _ = tokio::time::timeout(Duration::from_secs(90), p).await;
    }
    for a in agents {
        a.stop();
    }
    let loadtest_report = match loadtest {
        Some(lt) => lt.finish(Duration::from_secs(240)).await,
        None => Value::Null,
    };
    let after = sampler.row(started.elapsed().as_secs_f64(), None).await;
    println!("after teardown: {}", report::human(&after));
    let summary = report::summary(s, &rows, &after, &loadtest_report);
    report::write_json(s, &rows, Some(&after), &summary, true);
    println!("{}", report::summary_text(&summary));
    println!(
        "results: {} and {}",
        s.path(".csv").display(),
        s.path(".json").display()
    );
    cp.stop();
}

/// Counters by name with labels, for the rates of one window.
pub(crate) type Samples = BTreeMap<String, f64>;
