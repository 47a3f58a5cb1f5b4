//! Worker processes: above [`crate::cli::MAX_AGENTS_PER_PROCESS`] agents the parent re-runs
//! this binary with the hidden `--worker-spec FILE`, one child per slice of agents. A worker
//! prints JSON lines on stdout: `{"progress": ...}` now and then, then one `{"result": ...}`
//! carrying its counters and its latency histogram (HdrHistogram V2, base64), which the parent
//! merges.

use std::net::IpAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use parking_lot::Mutex;
use proto::JoinToken;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::process::Command;
use tokio::time::Instant;

use crate::cli::Tunnels;
use crate::report::{SimResult, SimResultWire};
use crate::sim::{self, Live, Progress, SimPlan, Timeline};

/// What a worker simulates. Written to a temporary file by the parent.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerSpec {
    pub edge_keys: Vec<String>,
    pub interval_ms: u64,
    /// The run starts at this wall-clock time (ms since the Unix epoch), the same for every
    /// worker, so all slices share one ramp and one steady window.
    pub start_unix_ms: u64,
    pub ramp_ms: u64,
    pub duration_ms: u64,
    pub sources: Vec<IpAddr>,
    pub first_index: usize,
    /// Held check-ins (`--held`).
    #[serde(default)]
    pub held: bool,
    /// `--mode async`.
    #[serde(default)]
    pub async_mode: bool,
    /// `--tunnel-engine` (with `--tunnel-inactivity`): agents keep tunnels.
    #[serde(default)]
    pub tunnel_engine: Option<String>,
    #[serde(default)]
    pub tunnel_inactivity_ms: u64,
    /// `--stack-deploy-ms`.
    #[serde(default)]
    pub stack_deploy_ms: u64,
}

/// One line of worker output.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerLine {
    Progress(Progress),
    Result(SimResultWire),
}

/// The `Instant` of a wall-clock time in the (near) future.
pub fn instant_of_unix_ms(unix_ms: u64) -> Instant {
    let now_ms = edge_agent::clock::unix_now_ms();
    let now = Instant::now();
    if unix_ms >= now_ms {
        now + Duration::from_millis(unix_ms - now_ms)
    } else {
        now.checked_sub(Duration::from_millis(now_ms - unix_ms))
            .unwrap_or(now)
    }
}

/// Worker side: simulate the slice in `spec_path`, reporting on stdout.
pub async fn run_worker(spec_path: &Path) -> anyhow::Result<()> {
    let text = tokio::fs::read_to_string(spec_path)
        .await
        .with_context(|| format!("cannot read worker spec {}", spec_path.display()))?;
    let spec: WorkerSpec = serde_json::from_str(&text).context("malformed worker spec")?;
    let tokens = spec
        .edge_keys
        .iter()
        .map(|k| JoinToken::parse(k))
        .collect::<Result<Vec<_>, _>>()
        .context("worker spec holds an invalid edge key")?;
    let start = instant_of_unix_ms(spec.start_unix_ms);
    let plan = SimPlan {
        tokens,
        interval: Duration::from_millis(spec.interval_ms),
        timeline: Timeline::new(
            start,
            Duration::from_millis(spec.ramp_ms),
            Duration::from_millis(spec.duration_ms),
        ),
        sources: spec.sources,
        first_index: spec.first_index,
        held: spec.held,
        async_mode: spec.async_mode,
        stack_deploy: Duration::from_millis(spec.stack_deploy_ms),
        tunnels: spec.tunnel_engine.map(|engine| Tunnels {
            engine,
            inactivity: Duration::from_millis(spec.tunnel_inactivity_ms),
        }),
    };
    let live = Arc::new(Live::default());
    let reporter = {
        let live = live.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tick.tick().await;
                if emit(&WorkerLine::Progress(live.progress())).await.is_err() {
                    return;
                }
            }
        })
    };
    let result = sim::simulate(plan, live).await;
    reporter.abort();
    let wire = result?.to_wire().map_err(anyhow::Error::msg)?;
    emit(&WorkerLine::Result(wire)).await?;
    Ok(())
}

async fn emit(line: &WorkerLine) -> anyhow::Result<()> {
    let mut text = serde_json::to_string(line)?;
    text.push('\n');
    let mut out = tokio::io::stdout();
    out.write_all(text.as_bytes()).await?;
    out.flush().await?;
    Ok(())
}

/// Parent side: start one worker per slice and merge their results. `progress` holds the
/// latest progress of each worker, for the progress bar.
pub async fn run_workers(
    specs: Vec<WorkerSpec>,
    progress: Arc<Mutex<Vec<Progress>>>,
) -> anyhow::Result<SimResult> {
    let exe = std::env::current_exe().context("cannot locate the loadtest executable")?;
    let dir = tempfile::Builder::new()
        .prefix("loadtest-workers-")
        .tempdir()?;
    let mut children = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        let path = dir.path().join(format!("worker-{i}.json"));
        tokio::fs::write(&path, serde_json::to_vec(spec)?).await?;
        let mut child = Command::new(&exe)
            .arg("--worker-spec")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start worker {i}"))?;
        let stdout = child
            .stdout
            .take()
            .context("worker stdout was not captured")?;
        children.push((i, child, stdout));
    }
    let mut handles = Vec::new();
    for (i, mut child, stdout) in children {
        let progress = progress.clone();
        handles.push(tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            let mut result = None;
            while let Some(line) = lines.next_line().await? {
                match serde_json::from_str::<WorkerLine>(&line) {
                    Ok(WorkerLine::Progress(p)) => {
                        if let Some(slot) = progress.lock().get_mut(i) {
                            *slot = p;
                        }
                    }
                    Ok(WorkerLine::Result(r)) => result = Some(r),
                    Err(e) => tracing::warn!(worker = i, error = %e, "unreadable worker line"),
                }
            }
            let status = child.wait().await?;
            match result {
                Some(r) if status.success() => r.into_result().map_err(anyhow::Error::msg),
                _ => bail!("worker {i} failed ({status}) without a result"),
            }
        }));
    }
    let mut merged: Option<SimResult> = None;
    for handle in handles {
        let result = handle.await.context("worker monitor task failed")??;
        match merged.as_mut() {
            None => merged = Some(result),
            Some(m) => m.merge(&result).map_err(anyhow::Error::msg)?,
        }
    }
    merged.context("no workers ran")
}

/// Splits `keys` into `workers` slices of nearly equal size.
pub fn split(keys: &[String], workers: u32, base: &WorkerSpec) -> Vec<WorkerSpec> {
    let n = keys.len();
    let w = (workers.max(1) as usize).min(n.max(1));
    let mut out = Vec::with_capacity(w);
    let mut start = 0;
    for i in 0..w {
        let len = n / w + usize::from(i < n % w);
        out.push(WorkerSpec {
            edge_keys: keys[start..start + len].to_vec(),
            first_index: start,
            ..base.clone()
        });
        start += len;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> WorkerSpec {
        WorkerSpec {
            edge_keys: Vec::new(),
            interval_ms: 5000,
            start_unix_ms: 0,
            ramp_ms: 0,
            duration_ms: 0,
            sources: Vec::new(),
            first_index: 0,
            held: true,
            async_mode: false,
            tunnel_engine: None,
            tunnel_inactivity_ms: 0,
            stack_deploy_ms: 1000,
        }
    }

    #[test]
    fn split_is_even_and_complete() {
        let keys: Vec<String> = (0..10).map(|i| i.to_string()).collect();
        let parts = split(&keys, 3, &base());
        let sizes: Vec<usize> = parts.iter().map(|p| p.edge_keys.len()).collect();
        assert_eq!(sizes, [4, 3, 3]);
        let firsts: Vec<usize> = parts.iter().map(|p| p.first_index).collect();
        assert_eq!(firsts, [0, 4, 7]);
        assert!(parts.iter().all(|p| p.held));
        let all: Vec<String> = parts.into_iter().flat_map(|p| p.edge_keys).collect();
        assert_eq!(all, keys);
    }

    #[test]
    fn worker_lines_round_trip() {
        let line = WorkerLine::Progress(Progress {
            connected: 1,
            polls_total: 2,
            errors: 3,
            refused: 1,
            p99_ms: 4.5,
        });
        let text = serde_json::to_string(&line).unwrap();
        assert!(text.starts_with("{\"progress\":"));
        let back: WorkerLine = serde_json::from_str(&text).unwrap();
        assert!(matches!(back, WorkerLine::Progress(p) if p.errors == 3));
    }

    #[test]
    fn future_wall_clock_maps_to_future_instant() {
        let now = edge_agent::clock::unix_now_ms();
        let i = instant_of_unix_ms(now + 2000);
        let ahead = i.saturating_duration_since(Instant::now());
        assert!(ahead > Duration::from_millis(1500) && ahead <= Duration::from_millis(2000));
        assert!(instant_of_unix_ms(now - 1000) <= Instant::now());
    }
}
