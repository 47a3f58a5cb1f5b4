//! The server under test: reading its memory and CPU from `/proc`, and optionally starting it.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context as _};
use tokio::process::{Child, Command};

/// Linux reports `/proc/<pid>/stat` times in clock ticks of `USER_HZ`, which is 100 on every
/// architecture Linux supports today (it is fixed by the user-space ABI, not `CONFIG_HZ`).
const CLOCK_TICKS_PER_SEC: f64 = 100.0;

/// Resident memory of several processes together (`None` when none can be read; a process
/// that cannot be read counts 0).
pub fn rss_sum(pids: &[u32]) -> Option<u64> {
    let each: Vec<u64> = pids.iter().filter_map(|&p| rss_bytes(p)).collect();
    (!each.is_empty()).then(|| each.iter().sum())
}

/// CPU time of several processes together, as [`rss_sum`] reads memory.
pub fn cpu_sum(pids: &[u32]) -> Option<f64> {
    let each: Vec<f64> = pids.iter().filter_map(|&p| cpu_seconds(p)).collect();
    (!each.is_empty()).then(|| each.iter().sum())
}

/// Resident memory of a process, in bytes (`VmRSS` of `/proc/<pid>/status`).
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_vm_rss(&status)
}

fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut parts = line.split_whitespace().skip(1);
    let value: u64 = parts.next()?.parse().ok()?;
    match parts.next() {
        Some("kB") | None => Some(value * 1024),
        Some(_) => None,
    }
}

/// CPU time (user + system) a process has used, in seconds.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_cpu_ticks(&stat).map(|ticks| ticks as f64 / CLOCK_TICKS_PER_SEC)
}

/// utime + stime: fields 14 and 15 of `/proc/<pid>/stat`. The command name (field 2) may hold
/// spaces and parentheses, so count fields after its last `)`.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    // after_comm starts at field 3 (state): field n is at index n - 3.
    let utime: u64 = fields.get(14 - 3)?.parse().ok()?;
    let stime: u64 = fields.get(15 - 3)?.parse().ok()?;
    Some(utime + stime)
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A control plane started by the load test (`--spawn-server`). Killed when dropped.
#[derive(Debug)]
pub struct SpawnedServer {
    pub target: String,
    pub api_key: String,
    pub pid: u32,
    child: Child,
    pub log_path: PathBuf,
    _data_dir: tempfile::TempDir,
}

/// The `control-plane` binary next to the running executable.
pub fn default_server_path() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot locate the loadtest executable")?;
    let dir = exe
        .parent()
        .context("the loadtest executable has no parent directory")?;
    Ok(dir.join("control-plane"))
}

impl SpawnedServer {
    /// Starts `path` on free loopback ports and waits (at most `ready_within`) for its
    /// `/readyz` to answer 200.
    pub async fn start(path: &Path, ready_within: Duration) -> anyhow::Result<Self> {
        let data_dir = tempfile::Builder::new()
            .prefix("loadtest-cp-")
            .tempdir()
            .context("cannot create a data directory for the control plane")?;
        let api_key = uuid::Uuid::new_v4().simple().to_string();
        let api_port = free_port()?;
        let metrics_port = free_port()?;
        let tunnel_port = free_port()?;
        let target = format!("https://127.0.0.1:{api_port}");
        let log_path = data_dir.path().join("control-plane.log");
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("cannot create {}", log_path.display()))?;
        let log_err = log.try_clone()?;
        let child = Command::new(path)
            .arg("--data-dir")
            .arg(data_dir.path())
            .args(["--api-addr", &format!("127.0.0.1:{api_port}")])
            .args(["--public-url", &target])
            .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
            .args(["--tunnel-addr", &format!("127.0.0.1:{tunnel_port}")])
            .env("EDGEPLANE_ADMIN_API_KEY", &api_key)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", path.display()))?;
        let pid = child.id().context("the control plane exited at once")?;
        let mut server = Self {
            target,
            api_key,
            pid,
            child,
            log_path,
            _data_dir: data_dir,
        };
        server
            .wait_ready(
                &format!("http://127.0.0.1:{metrics_port}/readyz"),
                ready_within,
            )
            .await?;
        Ok(server)
    }

    async fn wait_ready(&mut self, url: &str, within: Duration) -> anyhow::Result<()> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()?;
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "the control plane exited with {status} before it was ready; last log lines:\n{}",
                    self.log_tail()
                );
            }
            if let Ok(resp) = http.get(url).send().await {
                if resp.status().is_success() {
                    return Ok(());
                }
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "the control plane was not ready within {within:?} ({url}); last log lines:\n{}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Asks the server to stop (SIGTERM), then kills it if it has not within 10 s.
    pub async fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status()
            .await;
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_vm_rss() {
        let status = "Name:\tcp\nVmPeak:\t  1000 kB\nVmRSS:\t   2048 kB\nThreads:\t4\n";
        assert_eq!(parse_vm_rss(status), Some(2048 * 1024));
        assert_eq!(parse_vm_rss("Name: x\n"), None);
    }

    #[test]
    fn parses_cpu_ticks_even_with_odd_names() {
        let stat = "1234 (control plane) (x) S 1 1234 1234 0 -1 4194560 500 0 0 0 150 25 0 0 20 0 8 0 100 0 0";
        assert_eq!(parse_cpu_ticks(stat), Some(175));
        assert_eq!(parse_cpu_ticks("garbage"), None);
    }

    #[test]
    fn reads_our_own_process() {
        let pid = std::process::id();
        assert!(rss_bytes(pid).is_some_and(|b| b > 1024 * 1024));
        assert!(cpu_seconds(pid).is_some());
        assert_eq!(rss_bytes(u32::MAX), None);
    }
}
