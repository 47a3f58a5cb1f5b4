//! The tunnel, measured end to end in one process: a real control plane (embedded store and
//! gateway, on its own actix system thread), real edge agents (each on its own current-thread
//! runtime, as the agent binary runs), and a tiny HTTP/1.1 engine (`testkit::mini_engine`:
//! `GET /_ping`, `GET /bulk?bytes=N`, and just enough for the agent's snapshot).
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
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::time::{Duration, Instant};

use rand::Rng as _;
use serde_json::{json, Value};
use testkit::agent::AgentThread;
use testkit::bench::on_thread;
use testkit::{ControlPlane, ADMIN_KEY};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

mod hops;
mod operator;
mod proxy;
mod stats;
mod wake;

use hops::*;
use operator::*;
use proxy::*;
use stats::*;
use wake::*;

pub(crate) use testkit::mini_engine::CHUNK;

// ---------------------------------------------------------------------------------------------
// Settings

pub(crate) struct Settings {
    pub(crate) agents: usize,
    pub(crate) rounds: usize,
    pub(crate) settled_rounds: usize,
    pub(crate) interval: u32,
    pub(crate) inactivity: String,
    pub(crate) pings: usize,
    pub(crate) bytes: u64,
    pub(crate) bulk_runs: usize,
    pub(crate) hop_bytes: u64,
    pub(crate) hop_runs: usize,
    pub(crate) workers: usize,
    pub(crate) phases: Vec<String>,
    /// Only these hop variants (all when empty).
    pub(crate) hops: Vec<String>,
}

pub(crate) fn list(s: &str) -> Vec<String> {
    s.split(',')
        .map(|p| p.trim().to_owned())
        .filter(|p| !p.is_empty())
        .collect()
}

impl Settings {
    fn load() -> Self {
        let given = testkit::bench::settings("TUNNEL_BENCH_");
        let num = |name: &str, default: u64| testkit::bench::number(&given, name, default);
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
    let engine = testkit::mini_engine::start();
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
